"""Log throttling, so a saturated pool does not flood the logs."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Hashable


class _Key:
    """One key's state: when an event was last let through, and a drop counter."""

    __slots__ = ("drops", "last", "mark")

    def __init__(self, now: float) -> None:
        self.last = now
        # next() on an itertools.count is atomic: drops are counted without the lock.
        self.drops = itertools.count()
        self.mark = 0  # the counter's value when the last event was let through


class Throttle:
    """Lets one event per key through every ``interval_s`` and counts the rest.

    ``allow(key)`` returns ``None`` to drop the event, or the number of events
    of that key dropped since the last one let through (to log with it).
    Dropping takes no lock (every decision that is not an ADMIT asks); letting
    through does.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._keys: dict[Hashable, _Key] = {}

    def allow(self, key: Hashable) -> int | None:
        """Whether to log an event of ``key`` now (see the class docstring)."""
        now = time.monotonic()
        state = self._keys.get(key)
        if state is not None and now - state.last < self.interval_s:
            next(state.drops)
            return None
        with self._lock:
            state = self._keys.get(key)
            if state is None:
                self._keys[key] = _Key(now)
                return 0
            if now - state.last < self.interval_s:  # another thread let one through
                next(state.drops)
                return None
            # A drop counted concurrently lands before or after this read, never lost.
            counted = next(state.drops)
            dropped, state.mark = counted - state.mark, counted + 1
            state.last = now
            return dropped
