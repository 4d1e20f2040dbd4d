"""The heartbeat: one thread per gate renewing every lease it holds.

It renews all of them in one script call every TTL/3, releases leases whose
objects were dropped, and tells holders whose lease is gone or has reached its
class's max duration. It holds no lock while it talks to Redis.
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from ._keeping import LeaseKeeping

log = structlog.get_logger(__name__)


class Heartbeat:
    """Renews a gate's leases from a daemon thread."""

    def __init__(self, gate: LeaseKeeping) -> None:
        self._gate = gate
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpugate-heartbeat", daemon=True)
        self._failures = 0
        self.beats = 0

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def kick(self) -> None:
        """Run a beat now (a dropped lease to release, a report to send)."""
        self._kick.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        self._kick.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _period_s(self) -> float:
        period = self._gate.lease_ttl_s / 3.0
        if self._failures:
            # Back off with jitter while Redis is unreachable, never past the
            # period, and wake when a lease's TTL since Redis last confirmed it
            # runs out: its holder is told then.
            period = min(period, 0.05 * 2 ** min(self._failures, 6)) * random.uniform(0.5, 1.0)
            period = min(period, max(0.0, self._gate._unconfirmed_for_s() + 0.01))
        return period

    def _run(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self._period_s())
            self._kick.clear()
            if self._stop.is_set():
                break
            try:
                self._gate._beat()
            except Exception as exc:
                self._failures += 1
                log.warning("heartbeat_failed", error=str(exc), failures=self._failures)
            else:
                self._failures = 0
                self.beats += 1
        log.debug("heartbeat_stopped", at_s=time.time())
