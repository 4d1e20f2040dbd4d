"""Wake-ups for blocked waiters: released leases, expiries, override and policy changes.

One pub/sub connection per gate, read by a daemon thread, tells the gate's
blocked admissions (its :class:`~gpugate.admission._herd.Herd`) at each
message, with what a lease end freed when the message says (the herd wakes
only those it may concern). Waiters also have their own timer, so a lost
message only costs them one timer period, never their turn.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable

import redis
import structlog

from ._herd import Freed

log = structlog.get_logger(__name__)


# The connection lost: the listener reconnects (logged at debug level).
_LOST = (redis.ConnectionError, redis.TimeoutError, OSError, redis.RedisClusterException)


def freed_by(data: object) -> Freed | None:
    """What a wake message says was freed: ``"<uuid> <class>"`` from a lease
    end (end_lease in _prelude.lua; class names have no spaces). ``None`` for
    any other: an override set or lifted (``"override"``), a policy replaced
    (``"policy"``), a bare uuid from a gate of an older release; those may
    concern every waiter."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    if not isinstance(data, str):
        return None
    device, space, cls = data.rpartition(" ")
    return Freed(device, cls) if space and device and cls else None


class WakeListener:
    """Turns messages on the pool's wake channel into wake-ups."""

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        channel: str,
        on_wake: Callable[[Freed | None], object],
    ) -> None:
        self._client = client
        self._channel = channel
        self._on_wake = on_wake
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def ensure_started(self) -> None:
        """Start listening, once."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gpugate-wake", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop listening."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def _bump(self, freed: Freed | None = None) -> None:
        self._on_wake(freed)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            pubsub = None
            try:
                # On a cluster client still waiting for its cluster, this
                # reads the cluster's layout, and fails as Redis down does.
                pubsub = self._client.pubsub(  # type: ignore[no-untyped-call]
                    ignore_subscribe_messages=True
                )
                pubsub.subscribe(self._channel)
                failures = 0
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._bump(freed_by(message.get("data")))
            except Exception as exc:
                # Redis gone (reconnect), or an error reply (an ACL without
                # pub/sub, say): the thread lives on and tries again.
                failures += 1
                if isinstance(exc, _LOST):
                    log.debug("wake_listener_reconnecting", error=str(exc), failures=failures)
                else:
                    log.warning("wake_listener_failed", error=str(exc), failures=failures)
                # Waiters fall back to their timers meanwhile; wake them so they retry now.
                self._bump()
                self._stop.wait(min(5.0, 0.1 * 2**failures) * random.uniform(0.5, 1.0))
            finally:
                # Closing a broken connection may fail again.
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
