"""Argument parsing and dispatch for ``gpugate``.

Errors the user can fix (a bad Redis URL, an unknown class, a malformed
duration) print one line and exit 2; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import structlog

from .. import __version__
from .._exceptions import GpugateError
from .._units import parse_duration


def _configure_logging(verbose: bool) -> None:
    """The library never configures structlog; the command does."""
    # Errors reach the user as one line from main(); log events only with -v.
    level = logging.DEBUG if verbose else logging.ERROR
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer()
            if sys.stderr.isatty()
            else structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpugate",
        description="Race-free admission of GPU jobs: admit, defer with a retry-after, or reject.",
    )
    p.add_argument("--version", action="version", version=f"gpugate {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug events to stderr")
    p.add_argument(
        "--redis-url",
        help="Redis holding the pool (default: $GPUGATE_REDIS_URL, $REDIS_URL, else the embedded Redis of this host)",
    )
    p.add_argument("--pool", help="pool name (default: $GPUGATE_POOL or 'default')")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="workers of two classes compete for two simulated GPUs")
    demo.add_argument(
        "--seconds", type=parse_duration, default=10.0, help="how long to run (default 10s)"
    )
    demo.add_argument(
        "--workers", type=int, default=6, help="worker threads, half of each class (default 6)"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed of the workload")

    embedded = sub.add_parser("embedded", help="the embedded Redis of this host (single host only)")
    esub = embedded.add_subparsers(dest="action", required=True, metavar="ACTION")
    esub.add_parser("status", help="say whether it runs and where")
    esub.add_parser("stop", help="stop it (every lease and waiter it holds is lost)")

    policy = sub.add_parser("policy", help="show or apply the pool's policy")
    psub = policy.add_subparsers(dest="action", required=True, metavar="ACTION")
    psub.add_parser("show", help="print the pool's policy as JSON")
    apply = psub.add_parser("apply", help="replace the pool's policy with FILE (TOML)")
    apply.add_argument("file")
    check = psub.add_parser("check", help="check a policy FILE without touching Redis")
    check.add_argument("file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gpugate``; returns the exit status."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return _dispatch(args)
    except GpugateError as exc:
        print(f"gpugate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from ..sim import run_demo

        report = run_demo(
            redis_url=args.redis_url, seconds=args.seconds, workers=args.workers, seed=args.seed
        )
        return 1 if report.ooms else 0
    if args.command == "embedded":
        from ..state._embedded import embedded_dir, stop_embedded
        from ..state._server import ping

        sock = embedded_dir() / "redis.sock"
        if args.action == "stop":
            print("stopped" if stop_embedded() else f"not running ({sock})")
            return 0
        running = ping(str(sock))
        print(f"{'running' if running else 'not running'}: unix://{sock}")
        return 0 if running else 1
    if args.command == "policy":
        from ..policy import Policy

        if args.action == "check":
            p = Policy.from_file(args.file)
            print(f"{args.file}: ok, version {p.version}, classes {', '.join(p.classes)}")
            return 0
        from ..admission import Gate

        if args.action == "apply":
            p = Policy.from_file(args.file)
            with Gate(args.redis_url, pool=args.pool, policy=p) as gate:
                version = gate.sync_policy(force=True)
            print(f"pool {gate.pool}: policy {version} applied from {args.file}")
            return 0
        with Gate(args.redis_url, pool=args.pool) as gate:
            stored = gate.read_pool_policy()
            if stored is None:
                print(f"pool {gate.pool} has no policy yet: `gpugate policy apply FILE` sets one")
                return 1
            print(
                json.dumps(
                    {"pool": gate.pool, "version": stored.version, "policy": stored.to_dict()},
                    indent=2,
                )
            )
        return 0
    raise AssertionError(args.command)
