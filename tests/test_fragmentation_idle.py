"""Fragmentation from NVML alone: memory idle workers hold above their warm baseline.

A registered worker process that holds no lease is idle. What NVML shows for
its pid on a device, less its warm baseline there (the least it showed while
idle, from its first admission on), is its idle excess: cache a finished job
left behind. Each worker's heartbeat sends it; the renewal script keeps it in
the device's fragmentation (the idle field of the memory record), which
``max_fragmentation`` and status read. Against a real Redis (the newest and
6.2), with simulated GPUs whose process lists the tests script, and the
scripts' injectable clock.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from conftest import FakeClock
from gpugate import Gate, Lease, Outcome, Policy, SimulatedSampler
from gpugate.admission._idle import IdleMemory
from gpugate.metrics import PoolCollector
from gpugate.sampling import DeviceSample, GpuProcess, Snapshot
from gpugate.state._inspect import PoolView, read_pool
from gpugate.state._keys import PoolKeys
from gpugate.state._server import RedisProcess
from gpugate.state._verdict import assess

GiB = 1 << 30
WORKER = 4242  # pids for the IdleMemory unit tests (a Pool has its own)
OTHER = 5151
_pids = itertools.count(100_000)


@pytest.fixture(params=["7", "6.2"], ids=["redis7", "redis62"])
def server(request: pytest.FixtureRequest) -> RedisProcess:
    """Each test here runs on the newest Redis found and on Redis 6.2."""
    name = "redis_server" if request.param == "7" else "redis_server_62"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def policy(ttl: str = "30s") -> Policy:
    """batch stays off devices more than 10 % fragmented; interactive has no bound."""
    return Policy.from_dict(
        {
            "pool": {"lease_ttl": ttl, "safety_margin": 0},
            "classes": {
                "interactive": {"priority": 100},
                "batch": {"priority": 10, "max_fragmentation": 0.1},
            },
        }
    )


class Pool:
    """One pool on one simulated 80 GiB GPU, gates on it, and what Redis holds."""

    def __init__(self, url: str, pool: str, ttl: str = "30s") -> None:
        self.url = url
        self.pool = pool
        self.keys = PoolKeys(pool)
        self.policy = policy(ttl)
        self.clock = FakeClock.from_now()
        self.sim = SimulatedSampler(["80GiB"], name=pool)
        self.uuid = self.sim.uuid(0)
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.gates: list[Gate] = []
        # A process keeps its warm baseline across its gates: fresh pids per pool.
        self.pid, self.other = next(_pids), next(_pids)

    def gate(self, pid: int | None = None, **kw: Any) -> Gate:
        """A gate of process ``pid`` (default: the pool's worker), whose heartbeats
        come only from the test (``beat_now``)."""
        g = Gate(
            self.url,
            pool=self.pool,
            policy=self.policy,
            sampler=self.sim,
            _clock_ms=self.clock,
            _gpu_pid=self.pid if pid is None else pid,
            **kw,
        )
        if g._heartbeat is not None:
            g._heartbeat.stop()  # after its first beat; the test beats from here on
        self.gates.append(g)
        return g

    def run(self, pid: int, gib: float) -> None:
        """Process ``pid`` holds ``gib`` GiB on the device, and the device shows it."""
        self.sim.set_process(0, pid, int(gib * GiB))
        self.sim.set_used(0, int(gib * GiB))

    def fragmentation_bytes(self) -> int:
        """The idle field of the device's memory record: what admit_job compares."""
        raw = self.redis.hget(self.keys.state, f"m:{self.uuid}")
        return int(raw.split()[3]) if raw else 0

    def excess_entries(self) -> dict[str, str]:
        return self.redis.hgetall(self.keys.idle_memory)

    def view(self) -> PoolView:
        client = redis.Redis.from_url(self.url)
        try:
            return read_pool(client, self.pool, now_ms=self.clock.ms)
        finally:
            client.close()

    def close(self) -> None:
        for g in self.gates:
            g.close()
        self.redis.close()


@pytest.fixture
def make_pool(server: RedisProcess, pool_name: str) -> Iterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(ttl: str = "30s") -> Pool:
        p = Pool(server.url, f"{pool_name}-{len(made)}", ttl)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def warm_worker_after_a_job(p: Pool, *, left_gib: float = 25) -> Gate:
    """A worker warm at 10 GiB (context and weights) that ran one 20 GiB job and
    kept ``left_gib`` GiB cached afterwards."""
    p.run(p.pid, 10)
    worker = p.gate()
    job = worker.try_admit("interactive", vram="20GiB")
    assert job.lease is not None
    p.run(p.pid, 30)
    worker.beat_now()
    job.lease.release()
    p.run(p.pid, left_gib)
    worker.beat_now()
    return worker


class TestIdleExcess:
    """An idle worker's memory above its warm baseline is the device's fragmentation."""

    def test_cache_left_by_a_finished_job_fragments_the_device_until_emptied(
        self, make_pool: Callable[..., Pool]
    ) -> None:
        p = make_pool()
        worker = warm_worker_after_a_job(p)
        # Given 15 GiB cached above its 10 GiB baseline (18.75 % of the device),
        assert worker.idle_memory == {p.uuid: 15 * GiB}
        assert p.fragmentation_bytes() == 15 * GiB
        assert p.excess_entries() == {worker.owner: f"{p.uuid} {15 * GiB}"}
        # when another worker asks, batch is kept off the device, interactive is not.
        other = p.gate(p.other, register=False)
        p.clock.advance(1)
        d = other.try_admit("batch", vram="10GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "fragmented")
        assert other.try_admit("interactive", vram="10GiB").outcome is Outcome.ADMIT

        # Status and the gauge say so, and which part comes from idle workers.
        view = p.view()
        (device,) = view.devices
        assert device.idle_workers == 15 * GiB
        assert device.fragmentation == pytest.approx(15 / 80)
        (me,) = [w for w in view.workers if w.owner == worker.owner]
        assert me.idle_memory == {p.uuid: 15 * GiB}
        notes = [n for n in assess(view).notes if "fragmented" in n]
        assert len(notes) == 1
        assert "idle workers" in notes[0]
        assert "batch" in notes[0]
        assert f"{me.host}:{me.pid}" in notes[0]
        registry = CollectorRegistry()
        client = redis.Redis.from_url(p.url)
        registry.register(PoolCollector(client, p.pool, now_ms=p.clock))
        labels = {"pool": p.pool, "device": p.uuid}
        assert registry.get_sample_value(
            "gpugate_gpu_fragmentation_ratio", labels
        ) == pytest.approx(15 / 80)
        assert registry.get_sample_value("gpugate_gpu_memory_idle_workers_bytes", labels) == (
            15 * GiB
        )
        client.close()

        # Given the worker empties its cache (back to its baseline),
        p.run(p.pid, 10)
        worker.beat_now()
        # then the device is not fragmented any more.
        assert worker.idle_memory == {}
        assert p.fragmentation_bytes() == 0
        assert p.excess_entries() == {}
        p.clock.advance(1)
        assert other.try_admit("batch", vram="10GiB").outcome is Outcome.ADMIT

    def test_it_adds_to_what_running_jobs_report(self, make_pool: Callable[..., Pool]) -> None:
        p = make_pool()
        worker = warm_worker_after_a_job(p, left_gib=12)  # 2 GiB above its baseline
        job_holder = p.gate(p.other)
        job = job_holder.try_admit("interactive", vram="10GiB")
        assert job.lease is not None
        job.lease.report_vram("10GiB", idle="5GiB")
        job_holder.beat_now()
        assert p.fragmentation_bytes() == 7 * GiB
        job.lease.report_vram("10GiB", idle="1GiB")
        job_holder.beat_now()
        worker.beat_now()
        assert p.fragmentation_bytes() == 3 * GiB
        (device,) = p.view().devices
        assert device.fragmentation == pytest.approx(3 / 80)

    def test_taking_a_lease_zeroes_the_workers_excess(self, make_pool: Callable[..., Pool]) -> None:
        p = make_pool()
        worker = warm_worker_after_a_job(p)
        assert p.fragmentation_bytes() == 15 * GiB
        job = worker.try_admit("interactive", vram="20GiB")
        assert job.lease is not None
        worker.beat_now()
        # A running job's memory is its own: its allocator reports its idle bytes.
        assert worker.idle_memory == {}
        assert p.fragmentation_bytes() == 0
        assert p.excess_entries() == {}
        assert not worker.recycle_recommended

    def test_a_worker_still_warming_up_is_not_fragmented(
        self, make_pool: Callable[..., Pool]
    ) -> None:
        # Given a worker that loads its model before its first admission,
        p = make_pool()
        p.run(p.pid, 1)
        worker = p.gate()
        worker.beat_now()
        p.run(p.pid, 10)
        worker.beat_now()
        # then the memory it loads is its own, not fragmentation.
        assert worker.idle_memory == {}
        assert p.fragmentation_bytes() == 0
        # Its first admission sees it warm: that is its baseline.
        job = worker.try_admit("interactive", vram="1GiB")
        assert job.lease is not None
        job.lease.release()
        p.run(p.pid, 11)
        worker.beat_now()
        assert worker.idle_memory == {p.uuid: 1 * GiB}

    def test_a_silent_worker_stops_counting_one_ttl_after_its_last_beat(
        self, make_pool: Callable[..., Pool]
    ) -> None:
        p = make_pool(ttl="6s")
        worker = warm_worker_after_a_job(p)
        other = p.gate(p.other)  # a live worker whose heartbeats do the clean-up
        # Given the worker dies (no more beats; NVML frees its memory),
        p.clock.advance(5.999)
        other.beat_now()
        assert p.fragmentation_bytes() == 15 * GiB  # within one TTL it counts
        p.clock.advance(0.001)
        other.beat_now()
        # then one TTL after its last beat its excess is gone, like a lease.
        assert p.fragmentation_bytes() == 0
        assert p.excess_entries() == {}
        assert p.redis.zcard(p.keys.idle_seen) == 0
        # Still in the registry until pruned (10 TTLs), then out of it.
        assert p.redis.zscore(p.keys.workers, worker.owner) is not None
        p.clock.advance(60)
        other.beat_now()
        assert p.redis.zscore(p.keys.workers, worker.owner) is None
        worker.close()  # nothing left to take out: no double subtraction
        assert p.fragmentation_bytes() == 0

    def test_a_worker_that_beats_again_counts_again(self, make_pool: Callable[..., Pool]) -> None:
        p = make_pool(ttl="6s")
        worker = warm_worker_after_a_job(p)
        p.clock.advance(7)
        p.gate(p.other).beat_now()
        assert p.fragmentation_bytes() == 0
        worker.beat_now()
        assert p.fragmentation_bytes() == 15 * GiB

    def test_close_takes_the_excess_out(self, make_pool: Callable[..., Pool]) -> None:
        p = make_pool()
        worker = warm_worker_after_a_job(p)
        assert p.fragmentation_bytes() == 15 * GiB
        worker.close()
        assert p.fragmentation_bytes() == 0
        assert p.excess_entries() == {}
        assert p.redis.zscore(p.keys.workers, worker.owner) is None
        assert p.redis.hget(p.keys.workerinfo, worker.owner) is None

    def test_another_process_memory_stays_unmanaged(self, make_pool: Callable[..., Pool]) -> None:
        p = make_pool()
        worker = warm_worker_after_a_job(p, left_gib=10)
        p.sim.set_process(0, p.other, 30 * GiB)  # a notebook, say
        p.sim.set_used(0, 40 * GiB)
        worker.beat_now()
        assert worker.idle_memory == {}
        assert p.fragmentation_bytes() == 0

    def test_one_process_with_two_gates_is_counted_once(
        self, make_pool: Callable[..., Pool]
    ) -> None:
        p = make_pool()
        worker = warm_worker_after_a_job(p)
        second = p.gate()  # same pid, same pool
        second.beat_now()
        worker.beat_now()
        assert p.excess_entries() == {worker.owner: f"{p.uuid} {15 * GiB}"}
        assert p.fragmentation_bytes() == 15 * GiB
        # A lease held through either gate makes the whole process busy.
        job = second.try_admit("interactive", vram="1GiB")
        assert job.lease is not None
        worker.beat_now()
        assert p.fragmentation_bytes() == 0


class TestRecycleRecommendation:
    """An idle worker above the strictest max_fragmentation on its own is told, once."""

    def test_it_fires_once_per_device_until_the_excess_drops(
        self, make_pool: Callable[..., Pool]
    ) -> None:
        p = make_pool()
        calls: list[tuple[str, int]] = []
        p.run(p.pid, 10)
        worker = p.gate()
        worker.on_recycle_recommended(lambda uuid, idle: calls.append((uuid, idle)))
        job = worker.try_admit("interactive", vram="20GiB")
        assert job.lease is not None
        job.lease.release()
        p.run(p.pid, 15)  # 5 GiB: 6 %, within batch's 10 %
        worker.beat_now()
        assert not worker.recycle_recommended
        with capture_logs() as logs:
            p.run(p.pid, 20)  # 10 GiB: 12.5 %
            worker.beat_now()
            p.run(p.pid, 21)
            worker.beat_now()
        assert worker.recycle_recommended
        assert calls == [(p.uuid, 10 * GiB)]
        events = [e for e in logs if e["event"] == "worker_recycle_recommended"]
        assert len(events) == 1
        assert events[0]["device"] == p.uuid
        assert events[0]["idle_bytes"] == 10 * GiB
        # The worker empties its cache; a later job leaves too much again: told again.
        p.run(p.pid, 10)
        worker.beat_now()
        assert not worker.recycle_recommended
        p.run(p.pid, 22)
        worker.beat_now()
        assert calls == [(p.uuid, 10 * GiB), (p.uuid, 12 * GiB)]

    def test_a_failing_callback_does_not_stop_the_heartbeat(
        self, make_pool: Callable[..., Pool]
    ) -> None:
        def broken(uuid: str, idle: int) -> None:
            raise RuntimeError("boom")

        p = make_pool()
        p.run(p.pid, 10)
        worker = p.gate()
        worker.on_recycle_recommended(broken)
        job = worker.try_admit("interactive", vram="20GiB")
        assert job.lease is not None
        job.lease.release()
        p.run(p.pid, 30)
        worker.beat_now()
        assert worker.recycle_recommended
        assert p.fragmentation_bytes() == 20 * GiB


class TestBookkeeping:
    """Whatever the order of jobs, reports, beats, silences and closes, the device's
    idle field is the sum of its lease records' idle bytes and the workers' entries."""

    @settings(
        max_examples=20,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        steps=st.lists(
            st.tuples(
                st.sampled_from(["job", "end", "job", "end", "use", "beat", "advance", "close"]),
                st.integers(min_value=0, max_value=1),
                st.integers(min_value=0, max_value=30),
            ),
            min_size=15,
            max_size=40,
        )
    )
    def test_the_idle_field_is_always_the_sum(
        self, redis_server: RedisProcess, steps: list[tuple[str, int, int]]
    ) -> None:
        p = Pool(redis_server.url, f"bk-{next(_pids)}", ttl="6s")
        try:
            workers = [p.gate(next(_pids)) for _ in range(2)]
            usage = [0, 0]
            jobs: dict[int, Lease] = {}

            def use(i: int, gib: int) -> None:
                usage[i] = gib * GiB
                p.sim.set_process(0, workers[i]._gpu_pid, usage[i])
                p.sim.set_used(0, min(sum(usage), 80 * GiB))

            for op, i, n in steps:
                w = workers[i]
                if w._closed:
                    continue
                if op == "job" and i not in jobs:  # a job starts, its allocator reports
                    d = w.try_admit("interactive", vram=GiB)
                    if d.lease is not None:
                        jobs[i] = d.lease
                        d.lease.report_vram(4 * GiB, idle=n * (GiB // 8))
                        use(i, usage[i] // GiB + 8)
                        w.beat_now()
                elif op == "end" and i in jobs:  # it ends, freeing some of its 8 GiB
                    jobs.pop(i).release()
                    use(i, max(0, usage[i] // GiB - n % 9))
                    w.beat_now()
                elif op == "use":
                    use(i, n)
                    w.beat_now()
                elif op == "beat":
                    w.beat_now()
                elif op == "advance":
                    p.clock.advance(n / 4)
                elif op == "close":
                    w.close()
                    jobs.pop(i, None)
                self.check(p)
        finally:
            p.close()

    @staticmethod
    def check(p: Pool) -> None:
        want = sum(int(raw.split()[8]) for raw in p.redis.hgetall(p.keys.device(p.uuid)).values())
        for entry in p.excess_entries().values():
            parts = entry.split()
            want += sum(int(b) for u, b in zip(parts[::2], parts[1::2], strict=True) if u == p.uuid)
        assert p.fragmentation_bytes() == want
        assert set(p.excess_entries()) == set(p.redis.zrange(p.keys.idle_seen, 0, -1))


def snapshot(
    used: int | None, *, taken: float, pid: int = WORKER, processes: bool = True
) -> Snapshot:
    procs = None if not processes else (() if used is None else (GpuProcess(pid, used),))
    device = DeviceSample("GPU-x", 0, 80 * GiB, 0, processes=procs)
    return Snapshot(devices=(device,), taken_mono=taken)


class TestWarmBaseline:
    """The baseline: the least seen while idle, from the first admission on."""

    def test_nothing_counts_before_the_first_admission(self) -> None:
        idle = IdleMemory(WORKER)
        assert idle.excess(snapshot(9 * GiB, taken=time.monotonic() + 1)) == {}

    def test_the_baseline_only_goes_down(self) -> None:
        idle = IdleMemory(WORKER)
        later = time.monotonic() + 1
        idle.admitted(snapshot(10 * GiB, taken=later))
        assert idle.excess(snapshot(14 * GiB, taken=later)) == {"GPU-x": 4 * GiB}
        assert idle.excess(snapshot(8 * GiB, taken=later)) == {}
        assert idle.excess(snapshot(10 * GiB, taken=later)) == {"GPU-x": 2 * GiB}

    def test_a_reading_from_before_the_last_lease_ended_is_not_an_idle_one(self) -> None:
        idle = IdleMemory(WORKER)
        idle.admitted(snapshot(10 * GiB, taken=time.monotonic() + 1))
        before = time.monotonic()
        idle.touch()  # a lease ended just now
        assert idle.excess(snapshot(30 * GiB, taken=before)) is None  # unknown: keep the last
        assert idle.excess(snapshot(30 * GiB, taken=time.monotonic() + 1)) == {"GPU-x": 20 * GiB}

    def test_absent_from_the_process_list_is_zero_unknown_is_not_measured(self) -> None:
        idle = IdleMemory(WORKER)
        later = time.monotonic() + 1
        idle.admitted(snapshot(None, taken=later))  # warm, but nothing on this device
        assert idle.excess(snapshot(3 * GiB, taken=later)) == {"GPU-x": 3 * GiB}
        assert idle.excess(snapshot(3 * GiB, taken=later, processes=False)) is None
        assert idle.excess(snapshot(3 * GiB, taken=later, pid=OTHER)) == {}


class TestSimulatedProcesses:
    """SimulatedSampler lists the processes a test sets, as NVML would."""

    def test_set_process_lists_and_unlists(self) -> None:
        sim = SimulatedSampler(["8GiB", "8GiB"])
        assert sim.sample().devices[0].processes == ()
        sim.set_process(1, 7, "1GiB")
        sim.set_process(1, 8, 2 * GiB)
        assert sim.sample().devices[1].processes == (GpuProcess(7, GiB), GpuProcess(8, 2 * GiB))
        assert sim.sample().devices[1].used == 0  # the list only: used is set_used's
        sim.set_process(1, 7, None)
        assert sim.sample().devices[1].processes == (GpuProcess(8, 2 * GiB),)
