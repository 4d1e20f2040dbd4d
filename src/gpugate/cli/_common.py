"""What the operator commands share: the Redis to talk to, who is asking, how to print.

The read and override commands never start the embedded Redis: with no URL
configured they use it only when it already runs (a stopped embedded Redis
holds no pool to look at or to pause).
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from .. import _process
from .._exceptions import UsageError
from .._units import format_duration, format_size
from ..state._connect import REDIS_URL_ENVS, Client, connect, resolve_redis_url

if TYPE_CHECKING:
    from ..admission import Gate
    from ..state._inspect import OverrideView

GiB = 1 << 30
ASYNQ_REDIS_URL_ENV = "GPUGATE_ASYNQ_REDIS_URL"


def redis_url(explicit: str | None) -> tuple[str, bool]:
    """The Redis URL of the pool and whether it is the embedded one, never starting it."""
    if explicit or any(os.environ.get(name, "").strip() for name in REDIS_URL_ENVS):
        return resolve_redis_url(explicit)
    from ..state._embedded import SOCKET_NAME, embedded_dir
    from ..state._server import ping

    sock = embedded_dir() / SOCKET_NAME
    if not ping(str(sock)):
        raise UsageError(
            "no Redis configured and the embedded Redis of this host is not running; "
            "pass --redis-url or set GPUGATE_REDIS_URL"
        )
    return f"unix://{sock}", True


def pool_name(explicit: str | None) -> str:
    """The pool: ``--pool``, else ``$GPUGATE_POOL``, else ``default``."""
    return explicit or os.environ.get("GPUGATE_POOL") or "default"


def open_client(explicit_url: str | None) -> tuple[Client, str, bool]:
    """A client of the pool's Redis, its URL, and whether it is the embedded one."""
    url, embedded = redis_url(explicit_url)
    return connect(url), url, embedded


def asynq_redis_url(explicit: str | None) -> str | None:
    """The Redis Asynq uses, when it is not the pool's.

    ``--asynq-redis-url``, else ``$GPUGATE_ASYNQ_REDIS_URL``; ``None``: Asynq's
    queues live in the pool's Redis (same URL, same database).
    """
    return explicit or os.environ.get(ASYNQ_REDIS_URL_ENV, "").strip() or None


def open_asynq_client(
    explicit_url: str | None, pool_client: Client, pool_url: str
) -> tuple[Client, str]:
    """A client of the Redis Asynq uses and its URL: the pool's own unless one is set.

    The caller closes it when it is not ``pool_client``.
    """
    url = asynq_redis_url(explicit_url)
    if url is None:
        return pool_client, pool_url
    return connect(url), url


def open_gate(explicit_url: str | None, pool: str | None) -> Gate:
    """A gate on the pool (no sampler, no policy of its own) for override commands.

    Raises :class:`~gpugate.UsageError` when the pool has no policy yet and
    :class:`~gpugate.BackendError` when Redis cannot be reached.
    """
    from ..admission import Gate

    url, _ = redis_url(explicit_url)
    gate = Gate(url, pool=pool_name(pool), register=False)
    try:
        if gate.read_pool_policy() is None:
            raise no_policy(gate.pool, "it has no classes to change")
    except BaseException:
        gate.close()
        raise
    return gate


def no_policy(pool: str, consequence: str, hint: str = "") -> UsageError:
    """The error of a command on a pool without a policy (most often a wrong ``--pool``)."""
    return UsageError(
        f"pool {pool!r} has no policy yet, so {consequence}; "
        f"check --pool, or set one with `gpugate policy apply FILE`{hint}"
    )


def who_am_i(explicit: str | None) -> str:
    """Who sets an override: ``--who``, else ``user@host``."""
    return explicit or _process.operator_name()


# -- printing -------------------------------------------------------------------


class Style:
    """ANSI colours, or none (not a terminal, ``--color never``, ``$NO_COLOR``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: IO[str], choice: str = "auto") -> Style:
        """Colours on a terminal unless ``$NO_COLOR``; ``always``/``never`` decide."""
        if choice == "always":
            return cls(True)
        if choice == "never" or os.environ.get("NO_COLOR"):
            return cls(False)
        return cls(stream.isatty())

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def bold(self, text: str) -> str:
        """Bold."""
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        """Faint."""
        return self._wrap("2", text)

    def red(self, text: str) -> str:
        """Red (critical)."""
        return self._wrap("31;1", text)

    def yellow(self, text: str) -> str:
        """Yellow (degraded)."""
        return self._wrap("33", text)

    def green(self, text: str) -> str:
        """Green (fine)."""
        return self._wrap("32", text)

    def cyan(self, text: str) -> str:
        """Cyan (labels)."""
        return self._wrap("36", text)

    def level(self, level: str, text: str) -> str:
        """``text`` in the colour of a verdict level."""
        if level == "OK":
            return self.green(text)
        if level == "CRITICAL":
            return self.red(text)
        return self.yellow(text)


def clock(ms: int) -> str:
    """A script time (ms) as local time: ``14:02:05``, with the date when not today."""
    t = time.localtime(ms / 1000)
    if time.strftime("%Y-%m-%d", t) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", t)
    return time.strftime("%Y-%m-%d %H:%M:%S", t)


def ago(seconds: float) -> str:
    """``3s``, ``4m12s``, ``2h`` (to the second; tenths below 10 s)."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    return format_duration(round(seconds))


def size(n: int) -> str:
    """Bytes, short: ``12GiB``, ``7.5GiB``, ``512MiB``."""
    if n >= GiB:
        text = f"{n / GiB:.1f}"
        return (text[:-2] if text.endswith(".0") else text) + "GiB"
    return format_size(n) if n < 1 << 20 else f"{n / (1 << 20):.0f}MiB"


def describe_override(o: OverrideView, now_ms: int) -> str:
    """``batch paused until 14:32:05 (in 30m), set by alice@h1 at 14:02:05: incident 42``."""
    what = f"{o.cls} paused" if o.kind == "pause" else f"{o.cls} capped at {o.n}"
    left = o.remaining_s(now_ms)
    if left is None:
        undo = f"gpugate resume {o.cls}" if o.kind == "pause" else f"gpugate uncap {o.cls}"
        when = f"until `{undo}` (no expiry)"
    else:
        when = f"until {clock(o.until_ms)} (in {ago(left)})"
    by = f"set by {o.who or 'unknown'}" + (f" at {clock(o.at_ms)}" if o.at_ms else "")
    if o.since_ms and o.since_ms < o.at_ms:
        by += f" (in force since {clock(o.since_ms)})"
    why = o.why or "no reason given"
    return f"{what} {when}, {by}: {why}"


def overrides_from_reply(reply: dict[str, Any]) -> list[OverrideView]:
    """The overrides in force, from ``set_override``'s JSON reply."""
    from ..state._inspect import OverrideView

    out: list[OverrideView] = []
    for kind in ("pause", "cap"):
        section = reply.get(kind) or {}
        if not isinstance(section, dict):
            continue
        for cls, o in section.items():
            out.append(
                OverrideView(
                    kind="pause" if kind == "pause" else "cap",
                    cls=cls,
                    until_ms=int(o.get("until", 0)),
                    who=str(o.get("who", "")),
                    why=str(o.get("why", "")),
                    at_ms=int(o.get("at", 0)),
                    n=int(o["n"]) if kind == "cap" and "n" in o else None,
                    since_ms=int(o.get("since", o.get("at", 0))),
                )
            )
    return out


def out(text: str = "", stream: IO[str] | None = None) -> None:
    """Print one line to stdout (or ``stream``)."""
    print(text, file=stream or sys.stdout)
