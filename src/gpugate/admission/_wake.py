"""Wake-ups for blocked waiters: released leases, expiries, override changes.

One pub/sub connection per gate, read by a daemon thread, bumps a generation
counter. Waiters wait for the counter to move or for their own timer, so a
lost message only costs them one timer period, never their turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading

import redis
import structlog

log = structlog.get_logger(__name__)


# The connection lost: the listener reconnects (logged at debug level).
_LOST = (redis.ConnectionError, redis.TimeoutError, OSError, redis.RedisClusterException)


class WakeListener:
    """Turns messages on the pool's wake channel into wake-ups."""

    def __init__(self, client: redis.Redis | redis.RedisCluster, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._cond = threading.Condition()
        self._generation = 0
        self._async_events: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def generation(self) -> int:
        """How many wake-ups have been seen."""
        return self._generation

    def ensure_started(self) -> None:
        """Start listening, once."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gpugate-wake", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop listening, and wake every waiter (its gate is closing: it ends now)."""
        self._stop.set()
        self._bump()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def wait(self, generation: int, timeout_s: float) -> bool:
        """Block until a wake-up after ``generation`` or ``timeout_s``; True if woken."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != generation, timeout_s)

    async def wait_async(self, generation: int, timeout_s: float) -> bool:
        """The asyncio form of :meth:`wait`."""
        if self._generation != generation:
            return True
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        item = (loop, event)
        with self._cond:
            self._async_events.add(item)
        try:
            if self._generation != generation:
                return True
            await asyncio.wait_for(event.wait(), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            with self._cond:
                self._async_events.discard(item)

    def _bump(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
            events = list(self._async_events)
        for loop, event in events:
            # RuntimeError: that loop is closed; its waiter is gone.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            pubsub = self._client.pubsub(  # type: ignore[no-untyped-call]
                ignore_subscribe_messages=True
            )
            try:
                pubsub.subscribe(self._channel)
                failures = 0
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        self._bump()
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
                with contextlib.suppress(Exception):
                    pubsub.close()
