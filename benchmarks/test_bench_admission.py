"""How long one admission decision takes, against the floor: a no-op EVALSHA.

Groups:

* ``latency``: one call at a time on the server's CPU. Every variant is timed
  twice: by pytest-benchmark (one variant after another, the table) and by
  an interleaved loop that runs all variants in turns, round after round, so
  that a change of load on the machine hits them all alike (the ratios).
  The interleaved loop also splits a decision into gpugate's Python, the
  script call (redis-py and the round trip) and the server's script time, and
  runs the no-op script with the decision's own KEYS and ARGV (through
  redis-py's ``Script`` and through ``client.evalsha``) to price the
  arguments and the ``Script`` wrapper.
* ``client``: gpugate's Python alone, hot, with the script's reply canned.
* ``throughput``: decisions per second from 1, 2, 4 and 8 processes, unpinned,
  against the same processes running the no-op script.
* ``server``: the server's own time per script call (``INFO commandstats``)
  with 10, 100 and 1000 live leases in the pool.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from _rig import (
    ALL_CPUS,
    NOOP_LUA,
    SUMMARY,
    GiB,
    cpu_pinned,
    decision_arguments,
    evalsha_stats,
    fill,
    in_turns,
    make_gate,
    percentile,
    throughput_worker,
)
from gpugate import Gate, Lease, Outcome
from gpugate.state._server import RedisProcess

# Interleaved latency loop: rounds of one batch per variant; then the
# server's time per variant from batches of calls, in turns.
LATENCY_VARIANTS = (
    "noop",
    "noop_args",
    "noop_args_evalsha",
    "defer_cap",
    "admit",
    "release",
    "defer_vram",
)
ROUNDS = 80
BATCH = 25
WARMUP_CALLS = 2
SERVER_BATCHES = 6
SERVER_BATCH = 50
# pytest-benchmark's own (sequential) runs.
PEDANTIC_ROUNDS = 2000
PEDANTIC_WARMUP = 100

# Latency (d): live leases per device, the memory they reserve, the request.
VRAM_LEASES_PER_DEVICE = 10
VRAM_RESERVED = 70 * GiB
VRAM_REQUEST = 20 * GiB

THROUGHPUT_PROCS = (1, 2, 4, 8)
# Each process runs the phases in this order (ABBA, so drift cancels), each this long.
THROUGHPUT_PHASES = ("noop", "gate", "gate", "noop")
THROUGHPUT_PHASE_S = 1.0

SERVER_LEASES = (10, 100, 1000)
SERVER_ROUNDS = 6
SERVER_CALLS = 150
SERVER_PHASE_S = 0.12


def _pool(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:6]}"


class _Spy:
    """Stands in for a gate's ``admit_job`` script and times each call of it."""

    def __init__(self, script: Callable[..., Any]) -> None:
        self.script = script
        self.last_ns = 0

    def __call__(self, keys: list[str], args: list[Any]) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return self.script(keys=keys, args=args)
        finally:
            self.last_ns = time.perf_counter_ns() - t0


@dataclass
class Samples:
    """Per-call times of one variant (ns) and the server's time for it (µs)."""

    total_ns: list[int] = field(default_factory=list)
    script_ns: list[int] = field(default_factory=list)
    server_usec: int = 0
    server_calls: int = 0

    def p(self, q: float) -> float:
        return percentile(sorted(self.total_ns), q) / 1000

    @property
    def server_us(self) -> float:
        return self.server_usec / self.server_calls if self.server_calls else float("nan")


@dataclass
class LatencyRig:
    gate: Gate
    vram_gate: Gate
    filler: Gate
    held: list[Lease]
    stats: redis.Redis
    noop: Callable[[], Any]
    noop_args: Callable[[], Any]
    noop_args_evalsha: Callable[[], Any]
    samples: dict[str, Samples] = field(default_factory=dict)
    sequential_floor: list[float] = field(default_factory=list)

    def admit(self) -> Lease:
        d = self.gate.try_admit("batch", 1)
        assert d.lease is not None
        return d.lease

    def defer_cap(self) -> Any:
        return self.gate.try_admit("capped", 1)

    def defer_vram(self) -> Any:
        return self.vram_gate.try_admit("batch", VRAM_REQUEST)


def _check_outcomes(rig: LatencyRig) -> None:
    assert rig.noop() == rig.noop_args() == rig.noop_args_evalsha() == 1
    assert rig.defer_cap().reason == "cap"
    d = rig.defer_vram()
    assert (d.outcome, d.reason) == (Outcome.DEFER, "vram"), d
    lease = rig.admit()
    assert lease.release() is True


def _interleave(rig: LatencyRig) -> dict[str, Samples]:
    """Time every variant in short batches, in turns; then read the server's time per variant.

    The host's speed flips between regimes that last a fraction of a second
    to seconds, even on an idle guest: many short rounds (the order rotated
    each round) give every variant the same mix. Within a round each variant
    runs a batch, so that it is timed warm, as a loop of its own would be
    (one call of each in turn would charge each with the cache misses the
    others leave); the first calls of each batch are not recorded.
    """
    s = {name: Samples() for name in LATENCY_VARIANTS}
    spy = _Spy(rig.gate._scripts.admit_job)
    vram_spy = _Spy(rig.vram_gate._scripts.admit_job)
    held: list[Lease] = []

    def admit() -> None:
        held.append(rig.admit())

    def release() -> None:
        held.pop().release()

    # (variant, call, spy timing the script inside it); admit comes right before release.
    calls: list[list[tuple[str, Callable[[], Any], _Spy | None]]] = [
        [("noop", rig.noop, None)],
        [("noop_args", rig.noop_args, None)],
        [("noop_args_evalsha", rig.noop_args_evalsha, None)],
        [("defer_cap", rig.defer_cap, spy)],
        [("admit", admit, spy), ("release", release, None)],
        [("defer_vram", rig.defer_vram, vram_spy)],
    ]
    rig.gate._scripts.admit_job = spy  # type: ignore[assignment]
    rig.vram_gate._scripts.admit_job = vram_spy  # type: ignore[assignment]
    try:
        for group in in_turns(calls, ROUNDS):
            for i in range(BATCH):
                for name, call, timer in group:
                    t0 = time.perf_counter_ns()
                    call()
                    elapsed = time.perf_counter_ns() - t0
                    if i >= WARMUP_CALLS:
                        s[name].total_ns.append(elapsed)
                        if timer is not None:
                            s[name].script_ns.append(timer.last_ns)
        # The server's time: counter deltas around batches, again in turns.
        for group in in_turns(calls, SERVER_BATCHES):
            for _ in range(SERVER_BATCH):
                for name, call, _timer in group:
                    c0, u0 = evalsha_stats(rig.stats)
                    call()
                    c1, u1 = evalsha_stats(rig.stats)
                    s[name].server_calls += c1 - c0
                    s[name].server_usec += u1 - u0
    finally:
        rig.gate._scripts.admit_job = spy.script  # type: ignore[assignment]
        rig.vram_gate._scripts.admit_job = vram_spy.script  # type: ignore[assignment]
    return s


@pytest.fixture(scope="module")
def rig(redis_server: RedisProcess) -> Iterator[LatencyRig]:
    """Two pools, the interleaved measurements already taken (on the server's CPU)."""
    gate = make_gate(redis_server.url, _pool("lat"))
    vram_pool = _pool("vram")
    filler = make_gate(redis_server.url, vram_pool)
    vram_gate = make_gate(redis_server.url, vram_pool)
    held = fill(filler, 2 * VRAM_LEASES_PER_DEVICE, VRAM_RESERVED)
    stats = redis.Redis.from_url(redis_server.url)
    noop = gate._client.register_script(NOOP_LUA)
    keys, args = decision_arguments(gate)
    rig = LatencyRig(
        gate,
        vram_gate,
        filler,
        held,
        stats,
        noop=noop,
        noop_args=lambda: noop(keys=keys, args=args),
        noop_args_evalsha=lambda: gate._client.evalsha(noop.sha, len(keys), *keys, *args),
    )
    try:
        with cpu_pinned():
            _check_outcomes(rig)
            rig.samples = _interleave(rig)
        assert gate.stats["local_defers"] == vram_gate.stats["local_defers"] == 0
        yield rig
    finally:
        for g in (gate, vram_gate, filler):
            g.close()
        stats.close()


def _sequential_us(benchmark: Any) -> tuple[float, float]:
    data = sorted(benchmark.stats.stats.data)
    return percentile(data, 0.5) * 1e6, percentile(data, 0.99) * 1e6


def _record_latency(benchmark: Any, rig: LatencyRig, name: str) -> None:
    s, floor = rig.samples[name], rig.samples["noop"]
    p50, p99 = s.p(0.5), s.p(0.99)
    f50, f99 = floor.p(0.5), floor.p(0.99)
    seq50, seq99 = _sequential_us(benchmark)
    info: dict[str, Any] = {
        "interleaved_p50_us": round(p50, 1),
        "interleaved_p99_us": round(p99, 1),
        "x_floor_p50": round(p50 / f50, 2),
        "x_floor_p99": round(p99 / f99, 2),
        "server_us_per_call": round(s.server_us, 1),
        "floor_server_us_per_call": round(floor.server_us, 1),
        "sequential_p50_us": round(seq50, 1),
        "sequential_p99_us": round(seq99, 1),
    }
    if rig.sequential_floor:
        info["sequential_x_floor_p50"] = round(seq50 / rig.sequential_floor[0], 2)
    line = (
        f"p50 {p50:.1f} µs = {p50 / f50:.2f}x floor, p99 {p99:.1f} µs = {p99 / f99:.2f}x; "
        f"server {s.server_us:.1f} µs/call (floor {floor.server_us:.1f})"
    )
    if s.script_ns:
        python = sorted(t - c for t, c in zip(s.total_ns, s.script_ns, strict=True))
        script = sorted(s.script_ns)
        info["gpugate_python_p50_us"] = round(percentile(python, 0.5) / 1000, 1)
        info["script_call_p50_us"] = round(percentile(script, 0.5) / 1000, 1)
        line += (
            f"; split p50: gpugate Python {info['gpugate_python_p50_us']} µs + "
            f"script call {info['script_call_p50_us']} µs (floor call {f50:.1f})"
        )
    if name == "noop_args":
        direct = rig.samples["noop_args_evalsha"]
        info["client_evalsha_p50_us"] = round(direct.p(0.5), 1)
        info["client_evalsha_p99_us"] = round(direct.p(0.99), 1)
        line += (
            f"; the same through client.evalsha: p50 {direct.p(0.5):.1f} µs,"
            f" p99 {direct.p(0.99):.1f} µs"
        )
    line += f"; sequential p50 {seq50:.1f} µs"
    if "sequential_x_floor_p50" in info:
        line += f" = {info['sequential_x_floor_p50']}x"
    benchmark.extra_info.update(info)
    SUMMARY[f"latency {name}"] = line


@pytest.mark.benchmark(group="latency")
def test_latency_noop_evalsha_floor(benchmark: Any, rig: LatencyRig, pinned: None) -> None:
    """The floor: EVALSHA of ``return 1`` on the client the gate uses."""
    benchmark.pedantic(
        rig.noop, rounds=PEDANTIC_ROUNDS, warmup_rounds=PEDANTIC_WARMUP, iterations=1
    )
    rig.sequential_floor.append(_sequential_us(benchmark)[0])
    _record_latency(benchmark, rig, "noop")


@pytest.mark.benchmark(group="latency")
def test_latency_noop_with_decision_args(benchmark: Any, rig: LatencyRig, pinned: None) -> None:
    """The no-op script sent the KEYS and ARGV of a decision: what the arguments cost."""
    benchmark.pedantic(
        rig.noop_args, rounds=PEDANTIC_ROUNDS, warmup_rounds=PEDANTIC_WARMUP, iterations=1
    )
    _record_latency(benchmark, rig, "noop_args")


@pytest.mark.benchmark(group="latency")
def test_latency_defer_on_cap(benchmark: Any, rig: LatencyRig, pinned: None) -> None:
    """try_admit of a class at its cap (max_concurrent 0): DEFER, reason "cap"."""
    benchmark.pedantic(
        rig.defer_cap, rounds=PEDANTIC_ROUNDS, warmup_rounds=PEDANTIC_WARMUP, iterations=1
    )
    _record_latency(benchmark, rig, "defer_cap")


@pytest.mark.benchmark(group="latency")
def test_latency_admit(benchmark: Any, rig: LatencyRig, pinned: None) -> None:
    """try_admit that ADMITs; the previous lease is released in the untimed setup."""
    held: list[Lease] = []

    def release_previous() -> None:
        while held:
            held.pop().release()

    benchmark.pedantic(
        lambda: held.append(rig.admit()),
        setup=release_previous,
        rounds=PEDANTIC_ROUNDS,
        warmup_rounds=PEDANTIC_WARMUP,
        iterations=1,
    )
    release_previous()
    _record_latency(benchmark, rig, "admit")


@pytest.mark.benchmark(group="latency")
def test_latency_release(benchmark: Any, rig: LatencyRig, pinned: None) -> None:
    """Lease.release alone; the lease is admitted in the untimed setup."""

    def admit_one() -> tuple[tuple[Lease], dict[str, Any]]:
        return (rig.admit(),), {}

    benchmark.pedantic(
        Lease.release,
        setup=admit_one,
        rounds=PEDANTIC_ROUNDS,
        warmup_rounds=PEDANTIC_WARMUP,
        iterations=1,
    )
    _record_latency(benchmark, rig, "release")


@pytest.mark.benchmark(group="latency")
def test_latency_defer_on_vram_with_10_leases_per_device(
    benchmark: Any, rig: LatencyRig, pinned: None
) -> None:
    """try_admit that DEFERs for "vram": both devices hold 10 live leases, all of them read."""
    benchmark.pedantic(
        rig.defer_vram, rounds=PEDANTIC_ROUNDS, warmup_rounds=PEDANTIC_WARMUP, iterations=1
    )
    _record_latency(benchmark, rig, "defer_vram")


@pytest.fixture
def canned_gate(redis_server: RedisProcess) -> Iterator[tuple[Gate, Any]]:
    """A gate whose admit_job script is replaced by the reply it gave once (no round trip)."""
    gate = make_gate(redis_server.url, _pool("client"))
    script = gate._scripts.admit_job
    keys, args = decision_arguments(gate)
    reply = script(keys=keys, args=args)
    gate._scripts.admit_job = lambda keys, args: reply  # type: ignore[assignment]
    try:
        yield gate, reply
    finally:
        gate._scripts.admit_job = script
        gate.close()


@pytest.mark.benchmark(group="client")
def test_client_try_admit_python_only(
    benchmark: Any, canned_gate: tuple[Gate, Any], pinned: None
) -> None:
    """try_admit with the script's reply canned: gpugate's own Python per decision, hot."""
    gate, reply = canned_gate
    assert gate.try_admit("capped", 1).reason == "cap"
    benchmark(gate.try_admit, "capped", 1)
    assert gate.stats["local_defers"] == 0
    us = benchmark.stats.stats.median * 1e6
    SUMMARY["client try_admit without Redis"] = f"median {us:.1f} µs (hot loop; reply {reply!r})"


@pytest.mark.benchmark(group="client")
def test_client_simulated_sampler(
    benchmark: Any, canned_gate: tuple[Gate, Any], pinned: None
) -> None:
    """SimulatedSampler.sample, which every decision calls first (part of the above)."""
    gate, _ = canned_gate
    benchmark(gate.sampler.sample)
    SUMMARY["client SimulatedSampler.sample"] = (
        f"median {benchmark.stats.stats.median * 1e6:.1f} µs"
    )


def _run_processes(url: str, pool: str, procs: int) -> list[int]:
    """Total calls per phase of ``procs`` spawned processes."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=throughput_worker,
            args=(
                url,
                pool,
                THROUGHPUT_PHASES,
                THROUGHPUT_PHASE_S,
                set(ALL_CPUS),
                barrier,
                results,
            ),
        )
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    reports = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(10)
        assert w.exitcode == 0
    assert sum(local for _, local in reports) == 0, "some decisions were answered without Redis"
    return [sum(counts[i] for counts, _ in reports) for i in range(len(THROUGHPUT_PHASES))]


@pytest.mark.benchmark(group="throughput")
@pytest.mark.parametrize("procs", THROUGHPUT_PROCS)
def test_throughput(benchmark: Any, redis_server: RedisProcess, procs: int) -> None:
    """Decisions/s (DEFER on cap) from ``procs`` unpinned processes vs the no-op script."""
    pool = _pool("tput")
    make_gate(redis_server.url, pool).close()  # publish the policy before the workers start
    out = benchmark.pedantic(
        _run_processes, args=(redis_server.url, pool, procs), rounds=1, iterations=1
    )
    per_phase = [n / THROUGHPUT_PHASE_S for n in out]
    gate_rates = [r for r, kind in zip(per_phase, THROUGHPUT_PHASES, strict=True) if kind == "gate"]
    noop_rates = [r for r, kind in zip(per_phase, THROUGHPUT_PHASES, strict=True) if kind == "noop"]
    gate_rate = sum(gate_rates) / len(gate_rates)
    noop_rate = sum(noop_rates) / len(noop_rates)
    benchmark.extra_info.update(
        {
            "decisions_per_s": round(gate_rate),
            "noop_per_s": round(noop_rate),
            "x_floor": round(gate_rate / noop_rate, 2),
            "phases": {
                f"{i}:{kind}": round(rate)
                for i, (kind, rate) in enumerate(zip(THROUGHPUT_PHASES, per_phase, strict=True))
            },
            "pinned": False,
        }
    )
    phases = ", ".join(
        f"{kind} {rate:,.0f}" for kind, rate in zip(THROUGHPUT_PHASES, per_phase, strict=True)
    )
    SUMMARY[f"throughput {procs} proc"] = (
        f"{gate_rate:,.0f} decisions/s vs {noop_rate:,.0f} no-op/s = {gate_rate / noop_rate:.2f}x "
        f"(phases {phases})"
    )


def _server_usec(
    stats: redis.Redis, call: Callable[[], Any], undo: Callable[[Any], Any] | None = None
) -> float:
    """The server's µs per EVALSHA of ``call``.

    ``undo`` (an EVALSHA of its own) runs after each call, outside the count.
    """
    calls = usec = 0
    deadline = time.monotonic() + SERVER_PHASE_S
    c0, u0 = evalsha_stats(stats)
    for i in range(SERVER_CALLS):
        result = call()
        if undo is not None:
            c1, u1 = evalsha_stats(stats)
            calls, usec = calls + c1 - c0, usec + u1 - u0
            undo(result)
            c0, u0 = evalsha_stats(stats)
        if i >= 20 and time.monotonic() > deadline:
            break
    if undo is None:
        c1, u1 = evalsha_stats(stats)
        calls, usec = c1 - c0, u1 - u0
    return usec / calls


@pytest.mark.benchmark(group="server")
@pytest.mark.parametrize("leases", SERVER_LEASES)
def test_server_script_time(
    benchmark: Any, redis_server: RedisProcess, leases: int, pinned: None
) -> None:
    """Server-side µs per script call with ``leases`` live leases over both devices (75% full)."""
    pool = _pool(f"srv{leases}")
    filler = make_gate(redis_server.url, pool)
    gate = make_gate(redis_server.url, pool)
    stats = redis.Redis.from_url(redis_server.url)
    try:
        held = fill(filler, leases, 60 * GiB)
        noop = gate._client.register_script(NOOP_LUA)

        def admit() -> Lease:
            d = gate.try_admit("batch", GiB)
            assert d.lease is not None, d
            return d.lease

        variants: dict[str, tuple[Callable[[], Any], Callable[[Any], Any] | None]] = {
            "noop": (noop, None),
            "defer_cap": (lambda: gate.try_admit("capped", 1), None),
            "defer_vram": (lambda: gate.try_admit("batch", 30 * GiB), None),
            "admit": (admit, Lease.release),
        }
        assert gate.try_admit("batch", 30 * GiB).reason == "vram"
        stats.config_resetstat()
        per: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(SERVER_ROUNDS):
            for name in names[r:] + names[:r]:
                per[name].append(_server_usec(stats, *variants[name]))
        usec = {name: sorted(v)[len(v) // 2] for name, v in per.items()}
        benchmark.pedantic(
            gate.try_admit, args=("batch", 30 * GiB), rounds=300, warmup_rounds=20, iterations=1
        )
        seq50, seq99 = _sequential_us(benchmark)
        floor = usec["noop"]
        benchmark.extra_info.update(
            {f"{name}_server_us": round(v, 1) for name, v in usec.items()}
            | {f"{name}_x_noop": round(v / floor, 1) for name, v in usec.items() if name != "noop"}
            | {"spread": {name: [round(x, 1) for x in v] for name, v in per.items()}}
            | {
                "defer_vram_client_p50_us": round(seq50, 1),
                "defer_vram_client_p99_us": round(seq99, 1),
            }
        )
        SUMMARY[f"server {leases} leases"] = (
            ", ".join(f"{name} {v:.1f} µs" for name, v in usec.items())
            + " per call (server side);"
            + f" defer_vram end to end p50 {seq50:.0f} µs, p99 {seq99:.0f} µs"
        )
        assert len(held) == leases
    finally:
        filler.close()
        gate.close()
        stats.close()
