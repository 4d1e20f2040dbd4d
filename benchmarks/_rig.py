"""What the benchmarks share, importable by spawned worker processes (no pytest here).

Every gate is built as the test suite builds them: a policy from a dict and
two simulated 80 GiB devices. Leases are given a TTL of one hour so that none
expires (and no heartbeat fires) while a benchmark runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any, TypeVar

import redis

from gpugate import Gate, Lease, Outcome, Policy, SimulatedSampler

T = TypeVar("T")

GiB = 1 << 30
DEVICE_TOTAL = 80 * GiB

POLICY: dict[str, Any] = {
    "pool": {"lease_ttl": "1h", "safety_margin": 0},
    "classes": {
        # max_concurrent 0: every request DEFERs with reason "cap", and the
        # pool never fills, however long a benchmark loops.
        "capped": {"priority": 10, "max_concurrent": 0},
        "batch": {"priority": 10},
    },
}

NOOP_LUA = "return 1"

# The CPUs this process may use before any benchmark pins it.
ALL_CPUS = frozenset(os.sched_getaffinity(0))
SERVER_CPU = 0

# Filled by the benchmarks (name -> one line of derived numbers), printed at the end.
SUMMARY: dict[str, str] = {}


def pin_all_threads(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of ``pid``, as ``taskset -a -p`` does."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def cpu_pinned(cpu: int = SERVER_CPU) -> Iterator[None]:
    """Run the block on ``cpu`` only (the server's), then restore this process's affinity."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def make_gate(url: str, pool: str) -> Gate:
    """A gate on ``pool`` with :data:`POLICY` and two simulated 80 GiB devices."""
    return Gate(
        url,
        pool=pool,
        policy=Policy.from_dict(POLICY),
        sampler=SimulatedSampler(["80GiB", "80GiB"]),
    )


def fill(gate: Gate, leases: int, used_bytes_per_device: int) -> list[Lease]:
    """Admit ``leases`` "batch" leases spread evenly over both devices.

    Together they reserve ``used_bytes_per_device`` on each device. The
    caller must keep the returned leases referenced: a dropped lease is
    released by the gate's heartbeat.
    """
    uuids = [d.uuid for d in gate.sampler.sample().devices]
    per_device = leases // len(uuids)
    size = used_bytes_per_device // per_device
    held: list[Lease] = []
    for i in range(per_device * len(uuids)):
        d = gate.try_admit("batch", size, device=uuids[i % len(uuids)])
        if d.outcome is not Outcome.ADMIT or d.lease is None:
            raise RuntimeError(f"filling lease {i} of {leases} failed: {d}")
        held.append(d.lease)
    return held


def decision_arguments(gate: Gate, cls: str = "capped") -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV the gate sends for one ``try_admit(cls, 1)``.

    A lease that decision takes is released at once.
    """
    seen: list[tuple[list[str], list[Any]]] = []
    real = gate._scripts.admit_job

    def capture(keys: list[str], args: list[Any]) -> Any:
        seen.append((list(keys), list(args)))
        return real(keys=keys, args=args)

    gate._scripts.admit_job = capture  # type: ignore[assignment]
    try:
        d = gate.try_admit(cls, 1)
        if d.lease is not None:
            d.lease.release()
    finally:
        gate._scripts.admit_job = real
    return seen[0]


def in_turns(items: Sequence[T], rounds: int) -> Iterator[T]:
    """``items`` once per round, each round starting one item later (so no item is always first)."""
    for r in range(rounds):
        k = r % len(items)
        yield from [*items[k:], *items[:k]]


def evalsha_stats(client: redis.Redis) -> tuple[int, int]:
    """``(calls, usec)`` of EVALSHA since the last ``CONFIG RESETSTAT``.

    ``usec`` is the time the server spent executing the command (the script),
    not reading, parsing or answering it.
    """
    stats = client.info("commandstats").get("cmdstat_evalsha")
    if not stats:
        return 0, 0
    return int(stats["calls"]), int(stats["usec"])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[rank]


def throughput_worker(
    url: str,
    pool: str,
    phases: Sequence[str],
    phase_s: float,
    cpus: set[int],
    barrier: Barrier,
    results: Queue[tuple[list[int], int]],
) -> None:
    """One process of the throughput benchmark: count calls per phase, report the counts.

    A phase "gate" calls ``try_admit`` on the capped class (a DEFER each
    time, one round trip each); "noop" runs the no-op script on the gate's
    client. Every phase lasts ``phase_s`` and starts at ``barrier``, together
    with the other processes. Runs on ``cpus`` (unpinned). Reports the counts
    and how many decisions were answered without Redis (expected: none).
    """
    os.sched_setaffinity(0, cpus)
    gate = make_gate(url, pool)
    try:
        noop = gate._client.register_script(NOOP_LUA)

        def decide() -> object:
            return gate.try_admit("capped", 1)

        for _ in range(20):
            noop()
            decide()
        counts = []
        for kind in phases:
            call: Callable[[], object] = noop if kind == "noop" else decide
            barrier.wait()
            n = 0
            end = time.monotonic() + phase_s
            while time.monotonic() < end:
                call()
                n += 1
            counts.append(n)
        results.put((counts, gate.stats["local_defers"]))
    finally:
        gate.close()
