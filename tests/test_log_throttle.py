"""The log throttle: one event per key per interval, and every dropped event counted once."""

from __future__ import annotations

import threading
import time

import pytest

from gpugate import _logging
from gpugate._logging import Throttle


def test_one_event_per_interval_then_the_count_of_those_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(_logging.time, "monotonic", lambda: now[0])
    t = Throttle(10.0)
    assert t.allow("a") == 0
    assert [t.allow("a") for _ in range(3)] == [None] * 3
    assert t.allow("b") == 0  # keys are throttled apart
    now[0] += 9.9
    assert t.allow("a") is None
    now[0] += 0.2
    assert t.allow("a") == 4
    assert t.allow("a") is None
    now[0] += 10
    assert t.allow("a") == 1
    assert t.allow("b") == 0


def test_concurrent_callers_lose_no_count() -> None:
    """Every call is let through or counted in exactly one later let-through."""
    t = Throttle(0.0005)
    calls, threads_n = 5000, 8
    returns: list[int] = []
    lock = threading.Lock()

    def run() -> None:
        mine = [t.allow("k") for _ in range(calls)]
        with lock:
            returns.extend(r for r in mine if r is not None)

    threads = [threading.Thread(target=run) for _ in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    time.sleep(0.01)
    last = t.allow("k")  # lets through, reporting the drops not yet reported
    assert last is not None
    returns.append(last)
    assert len(returns) + sum(returns) == calls * threads_n + 1
    assert len(returns) > 2  # the interval passed during the run: several let through
