"""Log throttling, so a saturated pool does not flood the logs."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable


class Throttle:
    """Lets one event per key through every ``interval_s`` and counts the rest.

    ``allow(key)`` returns ``None`` to drop the event, or the number of events
    of that key dropped since the last one let through (to log with it).
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[Hashable, tuple[float, int]] = {}

    def allow(self, key: Hashable) -> int | None:
        """Whether to log an event of ``key`` now (see the class docstring)."""
        now = time.monotonic()
        with self._lock:
            last, dropped = self._last.get(key, (-self.interval_s, 0))
            if now - last < self.interval_s:
                self._last[key] = (last, dropped + 1)
                return None
            self._last[key] = (now, 0)
            return dropped
