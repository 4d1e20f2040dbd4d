"""Argument parsing and dispatch for ``gpugate``.

Errors the user can fix (a bad Redis URL, an unknown class, a malformed
duration, a bad argument) print one line and exit 2; nothing prints a
traceback. The operator commands live in :mod:`._status` (status),
:mod:`._ops` (pause, resume, cap, uncap, drain, leases), :mod:`._queues`
(queues) and :mod:`._serve` (metrics).
"""

from __future__ import annotations

import argparse
import contextvars
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

import structlog

from .. import __version__
from .._exceptions import ConfigError, GpugateError, UsageError
from .._units import lifetime_ms, parse_duration

LOG_FORMAT_ENV = "GPUGATE_LOG_FORMAT"
_LOG_FORMATS = ("auto", "json", "console")


def _configure_logging(verbose: bool, *, level: int = logging.ERROR, fmt: str = "auto") -> None:
    """The library never configures structlog; the command does.

    JSON lines (UTC timestamps) unless stderr is a terminal, where events are
    pretty-printed; ``fmt`` (``--log-format`` or ``$GPUGATE_LOG_FORMAT``)
    forces ``json`` or ``console``. A variable set to anything else is a
    :class:`ConfigError`, as the option's bad value is an argument error.
    """
    # Errors reach the user as one line from main(); log events only with -v
    # (or at the level a long-running command asks for).
    if verbose:
        level = logging.DEBUG
    if fmt == "auto":
        raw = os.environ.get(LOG_FORMAT_ENV, "")
        fmt = raw.strip().lower() or "auto"
        if fmt not in _LOG_FORMATS:
            raise ConfigError(
                f'"{raw}" is not a log format; use "json", "console" or "auto" (or unset it)',
                key=LOG_FORMAT_ENV,
                value=raw,
            )
    console = sys.stderr.isatty() if fmt not in ("json", "console") else fmt == "console"
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=not console),
            structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``gpugate: error: …``."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse, noting this parser and its arguments as the innermost command so far."""
        _COMMAND.set((self, tuple(args or ())))
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        """Print one line naming the command and exit 2."""
        if message.endswith("expected one argument"):
            message += _dash_value_hint(_PARSING.get())
        # argparse reports a command's unknown options from the top parser:
        # name the command's own help when they all followed the command.
        prog = self.prog
        command, given = _COMMAND.get() or (self, ())
        if message.startswith("unrecognized arguments: "):
            unknown = message.removeprefix("unrecognized arguments: ").split(" ")
            if all(arg in given for arg in unknown):
                prog = command.prog
        self.exit(2, f"{prog}: error: {message} (see `{prog} --help`)\n")


# The command line being parsed, for _Parser.error's hint.
_PARSING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "gpugate_argv", default=()
)


# The innermost (sub)command parser that parsing reached, for _Parser.error.
_COMMAND: contextvars.ContextVar[tuple[_Parser, tuple[str, ...]] | None] = contextvars.ContextVar(
    "gpugate_command", default=None
)


def _dash_value_hint(args: Sequence[str]) -> str:
    """argparse takes a value such as "-5m" for an option: name the way to pass it."""
    for option, value in itertools.pairwise(args):
        if option.startswith("--") and "=" not in option and value[1:2].isdigit():
            return f" (to give it {value}, write {option}={value})"
    return ""


def _duration(text: str) -> float:
    """A duration longer than zero (an interval, a run time)."""
    try:
        return parse_duration(text, positive=True)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lifetime(text: str) -> float:
    """How long an override lasts: longer than zero, which would mean "no expiry"."""
    try:
        lifetime_ms(text)
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    n = _count(text)
    if n == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return n


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return n


def _port(text: str) -> int:
    n = _count(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a TCP port (0-65535; 0 picks a free one)"
        )
    return n


def _override_options(p: argparse.ArgumentParser, *, duration: bool = True) -> None:
    if duration:
        p.add_argument(
            "--for",
            dest="duration",
            type=_lifetime,
            metavar="DURATION",
            help='revert by itself after this long ("30m", "2h"); without it, until undone',
        )
        p.add_argument("--reason", default="", help="why (shown in status and logs)")
    else:
        p.add_argument("--reason", default="", help="why (logged)")
    p.add_argument("--who", help="who sets it (default: user@host)")


# Where the pool is: options of gpugate and of each command that reads a pool.
_WHERE_OPTIONS = (
    (
        "--redis-url",
        "Redis holding the pool (default: $GPUGATE_REDIS_URL, $REDIS_URL, "
        "else the embedded Redis of this host)",
    ),
    ("--pool", "pool name (default: $GPUGATE_POOL or 'default')"),
    (
        "--asynq-redis-url",
        "Redis holding the Asynq queues of the pool's classes "
        "(default: $GPUGATE_ASYNQ_REDIS_URL, else the pool's Redis)",
    ),
)


_EXAMPLES = """examples:
  gpugate demo                                      two classes, two simulated GPUs
  gpugate --pool ocr status --watch                 the pool, refreshed every 2s
  gpugate --pool ocr pause batch --for 30m --reason "incident 42"
  gpugate --pool ocr cap batch 2 --for 1h           at most 2 batch jobs for an hour
  gpugate --pool ocr resume                         lift every pause
  gpugate --pool ocr policy apply gpugate.toml      replace the pool's policy
  gpugate <command> --help                          each command's options

docs: README.md and docs/ (admission, policy, operations, sampling, asynq)"""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gpugate",
        description="Race-free admission of GPU jobs: admit, defer with a retry-after, or reject.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"gpugate {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug events to stderr")
    p.add_argument(
        "--log-format",
        choices=_LOG_FORMATS,
        default="auto",
        help=f"log lines as JSON or for people (default: ${LOG_FORMAT_ENV}, else by terminal)",
    )
    for option, text in _WHERE_OPTIONS:
        p.add_argument(option, help=text)
    # The same options after the command (`gpugate status --pool p`); SUPPRESS
    # keeps a value given before the command when they are not repeated.
    where = _Parser(add_help=False)
    for option, text in _WHERE_OPTIONS:
        where.add_argument(
            option, default=argparse.SUPPRESS, help=f"{text}; also accepted before the command"
        )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="workers of two classes compete for two simulated GPUs")
    demo.add_argument(
        "--seconds", type=_duration, default=10.0, help="how long to run (default 10s)"
    )
    demo.add_argument(
        "--workers",
        type=_positive,
        default=6,
        help="worker threads, half of each class (default 6)",
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed of the workload (default 7)")

    embedded = sub.add_parser("embedded", help="the embedded Redis of this host (single host only)")
    esub = embedded.add_subparsers(dest="action", required=True, metavar="ACTION")
    esub.add_parser(
        "status", help="say whether it runs and where (exit status 0 if it runs, 1 if not)"
    )
    esub.add_parser("stop", help="stop it (every lease and waiter it holds is lost)")

    policy = sub.add_parser("policy", help="show or apply the pool's policy")
    psub = policy.add_subparsers(dest="action", required=True, metavar="ACTION")
    psub.add_parser("show", parents=[where], help="print the pool's policy as JSON")
    apply = psub.add_parser(
        "apply", parents=[where], help="replace the pool's policy with FILE (TOML)"
    )
    apply.add_argument("file", metavar="FILE", help="a policy file (TOML; see docs/policy.md)")
    check = psub.add_parser("check", help="check a policy FILE without touching Redis")
    check.add_argument("file", metavar="FILE", help="a policy file (TOML; see docs/policy.md)")

    status = sub.add_parser(
        "status",
        parents=[where],
        help="GPUs, classes, queues, overrides and workers of the pool, and a verdict",
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_duration,
        metavar="INTERVAL",
        help=(
            "refresh every INTERVAL (default 2s) until Ctrl-C; with --json, one JSON per line"
            ' (a frame that cannot read the pool: {"error": ...})'
        ),
    )
    status.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colours: on a terminal only (auto, the default), always or never",
    )

    pause = sub.add_parser(
        "pause",
        parents=[where],
        help="pause classes (and their Asynq queues): their requests defer until resumed",
    )
    pause.add_argument("classes", nargs="*", metavar="CLASS", help="classes to pause")
    pause.add_argument("--all", action="store_true", help="pause every class, the highest too")
    _override_options(pause)

    resume = sub.add_parser(
        "resume", parents=[where], help="lift pauses (every pause without a CLASS)"
    )
    resume.add_argument(
        "classes", nargs="*", metavar="CLASS", help="classes to resume (none: every pause)"
    )
    _override_options(resume, duration=False)

    drain = sub.add_parser(
        "drain",
        parents=[where],
        help="pause every class but the highest-priority one(s), or one CLASS",
    )
    drain.add_argument(
        "cls", nargs="?", metavar="CLASS", help="one class to pause (none: all but the highest)"
    )
    _override_options(drain)

    cap = sub.add_parser(
        "cap", parents=[where], help="lower a class's pool-wide cap of concurrent leases"
    )
    cap.add_argument("cls", metavar="CLASS", help="the class to cap")
    cap.add_argument(
        "n", type=_count, metavar="N", help="its most live leases in the pool (0 admits none)"
    )
    _override_options(cap)

    uncap = sub.add_parser(
        "uncap", parents=[where], help="remove a runtime cap: the policy's cap applies again"
    )
    uncap.add_argument("cls", metavar="CLASS", help="the class whose runtime cap goes")
    _override_options(uncap, duration=False)

    queues = sub.add_parser(
        "queues",
        parents=[where],
        help="every Asynq queue (asynq:queues): tasks by state, latency, who paused it",
    )
    queues.add_argument("--json", action="store_true", help="print JSON for scripts")

    leases = sub.add_parser(
        "leases", parents=[where], help="list live leases, or end one (--expire ID)"
    )
    leases.add_argument("--class", dest="cls", metavar="CLASS", help="only this class")
    leases.add_argument("--json", action="store_true", help="print JSON for scripts")
    leases.add_argument("--expire", metavar="ID", help="end lease ID now (its holder loses it)")
    leases.add_argument("--reason", default="", help="why (with --expire; logged)")
    leases.add_argument("--who", help="who ends it (default: user@host)")

    from ..metrics import DEFAULT_PORT

    metrics = sub.add_parser("metrics", parents=[where], help="serve the pool's Prometheus metrics")
    metrics.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"TCP port (default {DEFAULT_PORT}; 0 picks one)",
    )
    metrics.add_argument(
        "--addr", default="0.0.0.0", help="address to listen on (default 0.0.0.0, every interface)"
    )

    config = sub.add_parser("config", help="check a configuration file")
    csub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    ccheck = csub.add_parser("check", help="check a policy FILE without touching Redis")
    ccheck.add_argument("file", metavar="FILE", help="a policy file (TOML; see docs/policy.md)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gpugate``; returns the exit status."""
    given = tuple(sys.argv[1:] if argv is None else argv)
    token = _PARSING.set(given)
    command = _COMMAND.set(None)
    try:
        args = _parser().parse_args(given)
    finally:
        _COMMAND.reset(command)
        _PARSING.reset(token)
    # The metrics command is the pool's long-running watcher: its events are its point.
    level = logging.INFO if args.command == "metrics" else logging.ERROR
    try:
        _configure_logging(args.verbose, level=level, fmt=args.log_format)
        return _dispatch(args)
    except GpugateError as exc:
        print(f"gpugate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`gpugate status | head -3`): stop
        # quietly, with the status of a command that SIGPIPE ended, and keep the
        # interpreter's last flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:
        # A bug, not a mistake of the user's: still one line, the traceback with -v.
        if args.verbose:
            raise
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        at = f" at {where.tb_frame.f_code.co_filename}:{where.tb_lineno}" if where else ""
        print(
            f"gpugate: internal error: {type(exc).__name__}: {exc}{at} "
            "(run with -v for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from ..sim import run_demo

        report = run_demo(
            redis_url=args.redis_url, seconds=args.seconds, workers=args.workers, seed=args.seed
        )
        return 1 if report.ooms else 0
    if args.command == "embedded":
        from ..state._embedded import SOCKET_NAME, embedded_dir, stop_embedded
        from ..state._server import ping

        sock = embedded_dir() / SOCKET_NAME
        if args.action == "stop":
            print("stopped" if stop_embedded() else f"not running ({sock})")
            return 0
        running = ping(str(sock))
        print(f"{'running' if running else 'not running'}: unix://{sock}")
        return 0 if running else 1
    if args.command in _OPS:
        return _OPS[args.command](args)
    if args.command == "status":
        from ._common import open_asynq_client, open_client, pool_name
        from ._status import run_status

        client, url, embedded = open_client(args.redis_url)
        asynq = client
        try:
            asynq, asynq_url = open_asynq_client(args.asynq_redis_url, client, url)
            return run_status(
                client,
                pool_name(args.pool),
                url,
                embedded=embedded,
                as_json=args.json,
                watch=args.watch,
                color=args.color,
                asynq=asynq,
                asynq_url=asynq_url,
            )
        finally:
            if asynq is not client:
                asynq.close()
            client.close()
    if args.command == "queues":
        from ._queues import run_queues

        return run_queues(args)
    if args.command == "metrics":
        from ._serve import run_metrics

        return run_metrics(args.redis_url, args.pool, args.addr, args.port, args.asynq_redis_url)
    if args.command == "config":
        from ._config import check_config

        return check_config(args.file)
    if args.command == "policy":
        from ..policy import Policy

        if args.action == "check":
            from ._config import check_config

            return check_config(args.file)
        from ..admission import Gate
        from ._common import describe_override, overrides_from_reply, redis_url

        if args.action == "apply":
            p = Policy.from_file(args.file)
            url, _ = redis_url(args.redis_url)  # never starts the embedded Redis
            with Gate(url, pool=args.pool, policy=p, register=False) as gate:
                before = {f"{o.kind} {o.cls}": o for o in overrides_from_reply(gate.overrides())}
                # The script's list: overrides in force when it ran (one past its
                # expiry is still stored until the next override write).
                version, lifted = gate.apply_policy()
                after = overrides_from_reply(gate.overrides())
            print(f"pool {gate.pool}: policy {version} applied from {args.file}")
            now_ms = int(time.time() * 1000)
            for kind, cls in lifted:
                o = before.get(f"{kind} {cls}")
                n = o.n if o is not None else None
                what = "pause" if kind == "pause" else "cap" if n is None else f"cap of {n}"
                print(f"{cls}'s {what} lifted: the policy has no class {cls} now")
            for o in after:
                # A runtime cap at or above the old policy's may bind under the new one.
                if o.until_ms == 0 or o.until_ms > now_ms:
                    print(f"still in force: {describe_override(o, now_ms)}")
            return 0
        url, _ = redis_url(args.redis_url)
        with Gate(url, pool=args.pool, register=False) as gate:
            stored = gate.read_pool_policy()
            if stored is None:
                raise UsageError(
                    f"pool {gate.pool!r} has no policy yet: `gpugate policy apply FILE` sets one"
                )
            print(
                json.dumps(
                    {"pool": gate.pool, "version": stored.version, "policy": stored.to_dict()},
                    indent=2,
                )
            )
        return 0
    raise AssertionError(args.command)


def _op(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from . import _ops

        return getattr(_ops, f"run_{name}")(args)  # type: ignore[no-any-return]

    return run


_OPS: dict[str, Callable[[argparse.Namespace], int]] = {
    name: _op(name) for name in ("pause", "resume", "drain", "cap", "uncap", "leases")
}
