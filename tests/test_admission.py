"""The admission decision, end to end against a real Redis (6.2 and 7.x)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from conftest import FakeClock, frozen, keep_busy
from gpugate import (
    AdmissionRejected,
    AdmissionTimeout,
    BackendError,
    ConfigError,
    Decision,
    Gate,
    NoGpuSampler,
    Outcome,
    Policy,
    Reason,
    SimulatedSampler,
    UsageError,
)
from gpugate.admission._ticket import is_cuda_oom
from gpugate.state._inspect import read_pool
from gpugate.state._keys import PoolKeys
from gpugate.state._server import RedisProcess, free_port

GiB = 1 << 30


@pytest.fixture(params=["7", "6.2"], ids=["redis7", "redis62"])
def server(request: pytest.FixtureRequest) -> RedisProcess:
    """Each test here runs on the newest Redis found and on Redis 6.2."""
    name = "redis_server" if request.param == "7" else "redis_server_62"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def policy(pool: dict[str, Any] | None = None, **classes: dict[str, Any]) -> Policy:
    return Policy.from_dict(
        {
            "pool": {"lease_ttl": "30s", "safety_margin": 0, **(pool or {})},
            "classes": classes or {"interactive": {"priority": 100}, "batch": {"priority": 10}},
        }
    )


@pytest.fixture
def make_gate(server: RedisProcess, pool_name: str) -> Iterator[Callable[..., Gate]]:
    """Build gates on one pool; all closed after the test."""
    gates: list[Gate] = []

    def make(pol: Policy | None = None, sampler: Any = None, **kw: Any) -> Gate:
        g = Gate(
            server.url,
            pool=kw.pop("pool", pool_name),
            policy=pol,
            sampler=sampler if sampler is not None else SimulatedSampler(["80GiB", "80GiB"]),
            **kw,
        )
        gates.append(g)
        return g

    yield make
    for g in gates:
        g.close()


def read_redis(server: RedisProcess, read: Callable[[redis.Redis], Any]) -> Any:
    """``read(client)`` on a client of its own, closed after."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        return read(client)
    finally:
        client.close()


def lose_state(server: RedisProcess, pool: str) -> None:
    """Redis loses the pool's state (a FLUSHALL, a restart without persistence)."""
    read_redis(server, lambda client: client.delete(*client.keys(f"gpugate:{{{pool}}}:*")))


def state(server: RedisProcess, pool: str) -> dict[str, str]:
    return read_redis(server, lambda client: client.hgetall(PoolKeys(pool).state))


class TestPlacement:
    """Requests go where they fit, by best fit or spread."""

    def test_admits_with_a_device_an_env_and_a_lease(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy())
        d = gate.try_admit("batch", vram="30GiB")
        assert d.outcome is Outcome.ADMIT
        assert d.reason == "ok"
        assert d.retry_after == 0
        assert d.device in (0, 1)
        assert d.env == {"CUDA_VISIBLE_DEVICES": d.device_uuid}
        assert d.lease is not None
        assert d.lease.id
        assert d.lease.release() is True
        assert d.lease.release() is False

    def test_best_fit_packs_the_fullest_device_that_fits(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        sampler = SimulatedSampler(["80GiB", "80GiB"])
        sampler.set_used(0, "10GiB")
        gate = make_gate(policy({"placement": "best-fit"}), sampler)
        assert gate.try_admit("batch", vram="30GiB").device == 0

    def test_spread_picks_the_emptiest_device(self, make_gate: Callable[..., Gate]) -> None:
        sampler = SimulatedSampler(["80GiB", "80GiB"])
        sampler.set_used(0, "10GiB")
        gate = make_gate(policy({"placement": "spread"}), sampler)
        assert gate.try_admit("batch", vram="30GiB").device == 1

    def test_a_decision_is_true_only_when_admitted(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 1}))
        admitted = gate.try_admit("batch", vram="1GiB")
        deferred = gate.try_admit("batch", vram="1GiB")
        rejected = gate.try_admit("batch", vram="81GiB")
        assert [bool(d) for d in (admitted, deferred, rejected)] == [True, False, False]
        assert [d.admitted for d in (admitted, deferred, rejected)] == [True, False, False]

    def test_a_request_larger_than_any_device_is_rejected_not_deferred(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        gate = make_gate(policy())
        d = gate.try_admit("batch", vram="81GiB")
        assert (d.outcome, d.reason) == (Outcome.REJECT, "too_large")

    def test_never_fits_is_judged_on_capacity_not_current_use(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        sampler = SimulatedSampler(["80GiB"])
        sampler.set_used(0, "70GiB")  # a notebook holds memory: wait, don't fail
        gate = make_gate(policy(), sampler)
        d = gate.try_admit("batch", vram="20GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "vram")
        assert d.retry_after > 0

    def test_each_decision_sends_the_sample_of_its_moment(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # The gate reuses the arguments it packed from an unchanged sample; a
        # change of use must reach the next decision, in both directions. (A
        # stored sample of the same millisecond would win over the caller's:
        # the sleeps make each sample newer than the last.)
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(policy(), sampler)
        sampler.set_used(0, "70GiB")
        assert gate.try_admit("batch", vram="20GiB").reason == "vram"
        time.sleep(0.005)
        sampler.set_used(0, "0")
        d = gate.try_admit("batch", vram="20GiB")
        assert d.outcome is Outcome.ADMIT
        assert d.lease is not None
        d.lease.release()
        time.sleep(0.005)
        sampler.set_used(0, "75GiB")
        assert gate.try_admit("batch", vram="20GiB").reason == "vram"

    def test_reserves_of_higher_classes_are_kept_free_for_them(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        pol = policy(interactive={"priority": 100, "reserve": "20GiB"}, batch={"priority": 10})
        gate = make_gate(pol, SimulatedSampler(["80GiB"]))
        assert gate.try_admit("batch", vram="61GiB").reason == "too_large"
        held = gate.try_admit("batch", vram="60GiB")  # kept: a dropped lease goes at a beat
        assert held.outcome is Outcome.ADMIT
        assert gate.try_admit("batch", vram="1GiB").reason == "vram"
        assert gate.try_admit("interactive", vram="20GiB").outcome is Outcome.ADMIT

    def test_unknown_class_is_a_usage_error_naming_the_known_ones(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        gate = make_gate(policy())
        with pytest.raises(UsageError, match="interactive"):
            gate.try_admit("nope", vram=1)
        # The same message from a decision and from an override, with a "did you mean".
        for call in (lambda: gate.try_admit("batchh", vram=1), lambda: gate.pause("batchh")):
            with pytest.raises(UsageError) as caught:
                call()
            assert str(caught.value) == (
                f'pool "{gate.pool}": unknown class "batchh"; did you mean "batch"? '
                'this policy defines "interactive", "batch"'
            )

    def test_a_class_or_tenant_that_is_not_a_string_is_a_usage_error(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        gate = make_gate(policy())
        calls = (
            lambda: gate.try_admit(None, vram=1),  # type: ignore[arg-type]
            lambda: gate.try_admit("batch", vram=1, tenant=7),  # type: ignore[arg-type]
            lambda: gate.admit(b"batch", vram=1, timeout=1),  # type: ignore[arg-type]
        )
        for call in calls:
            with pytest.raises(UsageError, match=r"is named by a string|is a string"):
                call()

    def test_insisting_on_a_device_places_there_or_defers(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        sampler = SimulatedSampler(["80GiB", "80GiB"])
        gate = make_gate(policy(), sampler)
        uuid1 = sampler.uuid(1)
        d = gate.try_admit("batch", vram="50GiB", device=uuid1)
        assert d.device_uuid == uuid1
        assert gate.try_admit("batch", vram="50GiB", device=uuid1).reason == "vram"


class TestVramLedger:
    """reserved = sum max(est, actual); unmanaged = used - sum actual; both count."""

    def test_a_job_admitted_a_moment_ago_counts_before_nvml_sees_it(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        gates = [make_gate(policy(), SimulatedSampler(["80GiB"])) for _ in range(5)]
        results = [g.try_admit("batch", vram="20GiB") for g in gates]
        assert [r.outcome for r in results].count(Outcome.ADMIT) == 4
        assert results[-1].reason == "vram"

    def test_the_ghosts_of_a_host_gone_for_good_do_not_keep_others_from_ending(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # A host dies holding 300 leases: they expire and stay as ghosts of a
        # device nobody samples any more. A decision reads the oldest 256
        # ghosts: with theirs first, no other ghost ended again, and released
        # memory counted as in use for good.
        clock = FakeClock()
        dead = make_gate(policy(), _Renamed(SimulatedSampler(["80GiB"]), "DEAD"), _clock_ms=clock)
        for _ in range(300):
            assert dead.try_admit("batch", vram="100MiB").lease is not None
        dead.close()  # its leases are released: 300 ghosts on DEAD's device
        clock.advance(1)
        gate = make_gate(policy(), SimulatedSampler(["80GiB"]), _clock_ms=clock)
        job = gate.try_admit("batch", vram="60GiB")
        assert job.lease is not None
        job.lease.release()
        clock.advance(3)  # past the pool's sample_max_age (2 s) since DEAD's releases
        outcomes = [gate.try_admit("batch", vram="60GiB").outcome for _ in range(2)]
        assert Outcome.ADMIT in outcomes, outcomes

    def test_unmanaged_memory_makes_jobs_wait(self, make_gate: Callable[..., Gate]) -> None:
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(policy(), sampler)
        sampler.set_used(0, "50GiB")
        assert gate.try_admit("batch", vram="31GiB").reason == "vram"
        assert gate.try_admit("batch", vram="30GiB").outcome is Outcome.ADMIT

    def test_the_safety_margin_is_kept_free_on_every_device(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        sampler = SimulatedSampler(["80GiB", "40GiB"])
        sampler.set_used(0, "10GiB")
        gate = make_gate(policy({"safety_margin": "4GiB"}), sampler)
        # Never fits: capacity less the margin, on the largest device.
        assert gate.try_admit("batch", vram=76 * GiB + 1).reason == "too_large"
        # 80 - 10 used - 4 margin = 66 GiB on device 0; 40 - 4 = 36 on device 1.
        d = gate.try_admit("batch", vram=66 * GiB + 1)
        assert (d.outcome, d.reason) == (Outcome.DEFER, "vram")
        assert d.available == 66 * GiB  # the closest device's room, margin kept
        d = gate.try_admit("batch", vram="66GiB")
        assert (d.outcome, d.device_uuid) == (Outcome.ADMIT, sampler.uuid(0))
        assert d.available == 66 * GiB
        # Device 1 keeps its margin too, and with it best fit is not a tie.
        assert gate.try_admit("batch", vram=36 * GiB + 1).reason == "vram"
        d = gate.try_admit("batch", vram="36GiB")
        assert (d.outcome, d.device_uuid) == (Outcome.ADMIT, sampler.uuid(1))

    def test_a_report_no_device_could_hold_is_refused_and_the_ledger_kept(
        self, make_gate: Callable[..., Gate], server: RedisProcess
    ) -> None:
        # 2**64 - 1 is what a C API's unsigned -1 looks like; past 2**63 the
        # scripts' records could not be read back, and renewals would stop.
        sampler = SimulatedSampler(["40GiB"])
        gate = make_gate(policy(), sampler)
        d = gate.try_admit("batch", vram="1GiB")
        assert d.lease is not None
        for actual, idle in ((2**64 - 1, None), (10**20, None), ("1TiB", 2**63), ("1GiB", "2GiB")):
            with pytest.raises(ConfigError):
                d.lease.report_vram(actual, idle=idle)
        gate.beat_now()
        assert not d.lease.lost
        # Still the 1 GiB lease: another 40 GiB does not fit beside it.
        assert gate.try_admit("batch", vram="40GiB").reason == "vram"
        assert d.lease.release() is True

    def test_a_reported_actual_above_the_estimate_counts(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(policy(), sampler)
        d = gate.try_admit("batch", vram="10GiB")
        assert d.lease is not None
        d.lease.report_vram("60GiB")
        gate.beat_now()
        sampler.set_used(0, "60GiB")  # the sample sees the job's 60 GiB
        # 60 reserved by the lease, 0 unmanaged: 20 left.
        assert gate.try_admit("batch", vram="21GiB").reason == "vram"
        assert gate.try_admit("batch", vram="20GiB").outcome is Outcome.ADMIT

    def test_an_actual_is_subtracted_from_used_only_if_measured_before_the_sample(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(policy(), sampler, _clock_ms=clock)
        d = gate.try_admit("batch", vram="10GiB")
        assert d.lease is not None
        sampler.set_used(0, "30GiB")  # 20 GiB of a notebook + the job's 10
        clock.advance(1)
        d.lease.report_vram("10GiB")
        gate.beat_now()
        clock.advance(1)
        # A sample from before the report keeps the job's 10 GiB in "unmanaged"
        # as well as in "reserved" (errs safe): 80 - 30 - 10 = 40 left.
        older = make_gate(policy(), _FrozenSampler(sampler, age_s=1.5), _clock_ms=clock)
        assert older.try_admit("batch", vram="41GiB").reason == "vram"
        # A sample after the report: 80 - (30 - 10) - 10 = 50 left.
        assert gate.try_admit("batch", vram="41GiB").outcome is Outcome.ADMIT

    def test_released_memory_counts_until_a_later_sample(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(policy(), sampler, _clock_ms=clock)
        d = gate.try_admit("batch", vram="70GiB")
        assert d.lease is not None
        clock.advance(1)
        d.lease.release()
        clock.advance(1)
        # This sample predates the release: the process may still hold the
        # memory though the sample cannot show it, so it still counts.
        before = make_gate(policy(), _FrozenSampler(sampler, age_s=1.5), _clock_ms=clock)
        assert before.try_admit("batch", vram="20GiB").reason == "vram"
        # A sample taken after the release shows the device as it is.
        assert gate.try_admit("batch", vram="20GiB").outcome is Outcome.ADMIT


class _FrozenSampler:
    """A sampler that replays one snapshot, reporting it as ``age_s`` old."""

    backend = "frozen"

    def __init__(self, inner: SimulatedSampler, age_s: float) -> None:
        self.age_s = age_s
        self.snap = inner.sample()

    def sample(self) -> Any:
        from dataclasses import replace

        return replace(self.snap, taken_mono=time.monotonic() - self.age_s)


class _Renamed:
    """A sampler whose devices carry another uuid prefix (another host's GPUs)."""

    backend = "simulated"

    def __init__(self, sampler: SimulatedSampler, prefix: str) -> None:
        self._sampler = sampler
        self._prefix = prefix

    def sample(self) -> Any:
        import dataclasses

        snap = self._sampler.sample()
        devices = tuple(
            dataclasses.replace(d, uuid=f"{self._prefix}-{d.uuid}") for d in snap.devices
        )
        return dataclasses.replace(snap, devices=devices, host=self._prefix.lower())


class _Frozen:
    """A sampler whose every snapshot is the one it was given (a reading kept
    between refreshes, as the NVML sampler keeps one)."""

    backend = "simulated"

    def __init__(self, snap: Any) -> None:
        self._snap = snap

    def sample(self) -> Any:
        return self._snap


class TestSampleTimes:
    """A sample counts as taken when it was taken, however long its decision waited."""

    def test_a_decision_that_waited_does_not_pass_an_older_sample_for_a_newer_one(
        self, make_gate: Callable[..., Gate], server: RedisProcess
    ) -> None:
        # Host B's reading is taken before job J allocates 60 GiB; J ends (its
        # process may keep the memory, as PyTorch's cache does) while B's
        # decision waits behind a slow script. The reading cannot show J's
        # memory, so J's ghost must still count: taking the sample's time as
        # "when the script ran, less its age" made it look newer than J's
        # release by the wait, J's ghost ended, and 60 GiB more was admitted
        # onto memory still in use.
        host_b = make_gate(policy(), _Frozen(SimulatedSampler(["80GiB"]).sample()))
        assert host_b.try_admit("batch", vram="1GiB").lease is not None  # B knows the clock
        host_a = make_gate(policy(), SimulatedSampler(["80GiB"]))
        time.sleep(0.01)
        job = host_a.try_admit("batch", vram="60GiB")
        assert job.lease is not None
        time.sleep(0.02)
        job.lease.release()
        busy = threading.Thread(target=keep_busy, args=(server.url, 400_000))
        busy.start()
        time.sleep(0.05)  # the slow script runs
        try:
            d = host_b.try_admit("batch", vram="60GiB")
        finally:
            busy.join()
        assert d.outcome is Outcome.DEFER
        assert d.reason == "vram"

    def test_a_ghost_ended_on_one_gates_sample_is_not_forgotten_by_another_gates(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Two workers share a GPU, each with its own sampler. B's reading is
        # taken before job J allocates 60 GiB. J ends, its process keeping the
        # memory; A's next decision, on a reading taken after J's release, ends
        # J's ghost (A's reading shows the memory as unmanaged). B then decides
        # on its older reading, which shows none of it: the stored sample must
        # be A's, else J's memory counts nowhere. It was not rewritten within
        # 100 ms of the last write, and B admitted 60 GiB onto it.
        host_b = make_gate(policy(), _Frozen(SimulatedSampler(["80GiB"]).sample()))
        first = host_b.try_admit("batch", vram=1)  # B's reading is stored
        assert first.lease is not None
        first.lease.release()
        sim_a = SimulatedSampler(["80GiB"])
        host_a = make_gate(policy(), sim_a)
        time.sleep(0.005)
        job = host_a.try_admit("batch", vram="60GiB")
        assert job.lease is not None
        sim_a.set_used(0, "60GiB")
        job.lease.release()
        time.sleep(0.005)
        probe = host_a.try_admit("batch", vram=1)  # ends J's ghost
        assert probe.lease is not None
        d = host_b.try_admit("batch", vram="60GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "vram")


class TestGhosts:
    """A released lease's memory counts until a sample taken after the release."""

    def test_a_wave_of_ghosts_elsewhere_does_not_hide_a_hosts_own(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # A decision reads the oldest 256 ghosts pool-wide; 300 jobs ending on
        # host B just before host A's left A's ghost out of that read: A's idle
        # GPU looked full until B's ghosts had ended.
        clock = FakeClock()
        host_a = make_gate(policy(), _Renamed(SimulatedSampler(["80GiB"]), "A"), _clock_ms=clock)
        host_b = make_gate(policy(), _Renamed(SimulatedSampler(["80GiB"]), "B"), _clock_ms=clock)
        job = host_a.try_admit("batch", vram="60GiB")
        assert job.lease is not None
        for _ in range(300):
            d = host_b.try_admit("batch", vram=1)
            assert d.lease is not None
            d.lease.release()
        clock.advance(0.001)
        job.lease.release()
        clock.advance(0.1)  # A's next reading is taken after its release
        d = host_a.try_admit("batch", vram="60GiB")
        assert (d.outcome, d.device_uuid) == (Outcome.ADMIT, "A-SIM-sim-0")


class TestCaps:
    """Class caps (pool and device), shared device slots, and runtime caps."""

    def test_class_cap_defers_with_reason_cap(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 2}))
        held = [gate.try_admit("batch", vram="1GiB") for _ in range(2)]
        assert all(d.outcome is Outcome.ADMIT for d in held)
        d = gate.try_admit("batch", vram="1GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "cap")
        held[0].lease.release()  # type: ignore[union-attr]
        assert gate.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT

    def test_per_device_cap_spreads_a_class(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy(batch={"priority": 10, "max_per_device": 1}))
        a, b = gate.try_admit("batch", vram="1GiB"), gate.try_admit("batch", vram="1GiB")
        assert {a.device, b.device} == {0, 1}
        assert gate.try_admit("batch", vram="1GiB").reason == "cap"

    def test_shared_slots_limit_all_classes_on_a_device(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        gate = make_gate(
            policy({"max_per_device": 1}, interactive={"priority": 100}, batch={"priority": 10}),
            SimulatedSampler(["80GiB"]),
        )
        held = gate.try_admit("batch", vram="1GiB")  # kept: a dropped lease goes at a beat
        assert held.outcome is Outcome.ADMIT
        assert gate.try_admit("interactive", vram="1GiB").reason == "cap"

    def test_a_runtime_cap_only_lowers_and_reverts_by_itself(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 3}), _clock_ms=clock)
        gate.cap("batch", 10, duration="10m", reason="ignored: above the policy's 3")
        held = [gate.try_admit("batch", vram="1GiB") for _ in range(4)]
        assert [d.outcome for d in held].count(Outcome.ADMIT) == 3
        for d in held:
            if d.lease:
                d.lease.release()
        gate.cap("batch", 1, duration="30m", reason="incident 42")
        ovr = gate.overrides()["cap"]["batch"]
        assert (ovr["n"], ovr["why"]) == (1, "incident 42")
        first = gate.try_admit("batch", vram="1GiB")
        assert first.outcome is Outcome.ADMIT
        assert gate.try_admit("batch", vram="1GiB").reason == "cap"
        clock.advance(30 * 60 + 1)
        # `first` has expired meanwhile: two ADMITs show the cap is the policy's 3 again.
        assert gate.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT
        assert gate.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT


class TestOverrides:
    """Pause, resume and drain, each with an expiry."""

    def test_a_pause_defers_with_its_exact_remaining_time(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy(), _clock_ms=clock)
        gate.pause("batch", duration="10m", reason="incident")
        clock.advance(60)
        d = gate.try_admit("batch", vram="1GiB")
        assert (d.outcome, d.reason, d.retry_after) == (Outcome.DEFER, "paused", 540.0)
        assert gate.try_admit("interactive", vram="1GiB").outcome is Outcome.ADMIT
        clock.advance(540)
        assert gate.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT

    def test_a_dropped_class_logs_only_its_overrides_in_force_as_lifted(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # Given batch's 10-minute pause, over, and its cap without expiry
        clock = FakeClock()
        gate = make_gate(policy(), _clock_ms=clock)
        gate.pause("batch", duration="10m")
        gate.cap("batch", 1)
        clock.advance(601)
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        # When a policy without batch is forced on the pool
        narrow = make_gate(policy(interactive={"priority": 100}), _clock_ms=clock)
        with capture_logs() as logs:
            narrow.sync_policy(force=True)
        # Then only the cap is lifted; the pause's record is deleted all the same
        lifted = [e["lifted"] for e in logs if e["event"] == "overrides_lifted_with_class"]
        assert lifted == [["cap batch"]]
        left = state(server, pool_name)
        assert "pause:batch" not in left
        assert "cap:batch" not in left

    def test_an_override_set_again_while_in_force_keeps_when_it_came_into_force(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # What GpugateEmergencyOverrideActive times: an incident's pause extended
        # every half hour has been in force since the first one.
        clock = FakeClock()
        start = clock.ms
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 4}), _clock_ms=clock)
        gate.pause("batch", duration="1h", reason="incident 42")
        gate.cap("batch", 2, duration="1h", reason="incident 42")
        clock.advance(30 * 60)
        gate.pause("batch", duration="1h", reason="incident 42, extended")
        gate.cap("batch", 1, duration="1h", reason="incident 42, tighter")
        ovr = gate.overrides()
        for kind in ("pause", "cap"):
            assert (ovr[kind]["batch"]["at"], ovr[kind]["batch"]["since"]) == (clock.ms, start)

        # A pause lifted, and a cap expired, start afresh when set again.
        gate.resume("batch")
        clock.advance(60 * 60 + 1)
        gate.pause("batch", duration="1h", reason="again")
        gate.cap("batch", 2, duration="1h", reason="again")
        ovr = gate.overrides()
        for kind in ("pause", "cap"):
            assert (ovr[kind]["batch"]["at"], ovr[kind]["batch"]["since"]) == (clock.ms, clock.ms)

    def test_resume_lifts_a_pause(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy())
        gate.pause("batch")
        assert gate.try_admit("batch", vram=1).reason == "paused"
        gate.resume("batch")
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT

    def test_drain_pauses_everything_but_the_highest_class(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        pol = policy(
            interactive={"priority": 100}, notebook={"priority": 50}, batch={"priority": 10}
        )
        gate = make_gate(pol)
        gate.drain(duration="5m")
        assert gate.try_admit("batch", vram=1).reason == "paused"
        assert gate.try_admit("notebook", vram=1).reason == "paused"
        assert gate.try_admit("interactive", vram=1).outcome is Outcome.ADMIT

    def test_a_paused_class_keeps_its_reason_when_nothing_fits_locally_either(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # The local pre-check answers only after a memory DEFER: a pause keeps its
        # exact time left even on a host whose GPUs are full.
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        sampler.set_used(0, "80GiB")
        gate = make_gate(policy(), sampler, _clock_ms=clock)
        gate.pause("batch", duration="10m")
        for left in (600.0, 599.0):
            d = gate.try_admit("batch", vram="1GiB")
            assert (d.reason, d.retry_after, d.local) == ("paused", left, False)
            clock.advance(1)

    def test_drain_keeps_every_class_that_ties_for_the_highest_priority(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        pol = policy(a={"priority": 100}, b={"priority": 100}, c={"priority": 1})
        assert pol.highest_classes == ("a", "b")
        assert pol.highest_class == "a"
        gate = make_gate(pol)
        gate.drain(duration="5m")
        assert gate.try_admit("c", vram=1).reason == "paused"
        assert gate.try_admit("a", vram=1).outcome is Outcome.ADMIT
        assert gate.try_admit("b", vram=1).outcome is Outcome.ADMIT

    def test_drain_pauses_by_the_policy_applied_since_the_gate_last_read_it(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        old = policy(
            interactive={"priority": 100}, notebook={"priority": 100}, batch={"priority": 10}
        )
        new = policy(
            interactive={"priority": 100}, notebook={"priority": 50}, research={"priority": 20}
        )
        make_gate(old)
        # No heartbeat and no decision: the gate's copy stays the old policy.
        gate = make_gate(register=False)
        assert gate.effective_policy.version == old.version
        make_gate(new, register=False).sync_policy(force=True)  # `gpugate policy apply`
        # Given the new policy: notebook no longer ties for the highest, research
        # is new, batch is gone.
        reply = gate.drain(duration="5m")
        assert sorted(reply["pause"]) == ["notebook", "research"]
        assert gate.pool_policy_version == new.version  # followed, as a decision follows it
        assert gate.try_admit("notebook", vram=1).reason == "paused"
        assert gate.try_admit("research", vram=1).reason == "paused"
        assert gate.try_admit("interactive", vram=1).outcome is Outcome.ADMIT

    def test_apply_policy_replaces_the_pools_and_names_the_overrides_it_lifted(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        old = policy(
            interactive={"priority": 100}, notebook={"priority": 50}, batch={"priority": 10}
        )
        new = policy(interactive={"priority": 100}, batch={"priority": 10})
        gate = make_gate(old, register=False)
        gate.pause("notebook", duration="5m")
        gate.cap("batch", 1)
        version, lifted = make_gate(new, register=False).apply_policy()
        assert version == new.version
        assert lifted == [("pause", "notebook")]  # batch is still a class: its cap stays
        assert gate.read_pool_policy() == new
        assert list(gate.overrides()["cap"]) == ["batch"]
        assert not gate.overrides()["pause"]
        with pytest.raises(UsageError, match="policy="):
            make_gate(register=False).apply_policy()

    def test_overriding_an_unknown_class_is_a_usage_error(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        gate = make_gate(policy())
        with pytest.raises(UsageError):
            gate.pause("nope")

    @pytest.mark.parametrize("zero", [0, 0.0, "0s", "0ms", "0m0s"])
    def test_an_override_for_zero_time_is_refused_not_made_permanent(
        self, make_gate: Callable[..., Gate], zero: float | str
    ) -> None:
        # 0 ms is the scripts' "no expiry": "for 0s" must not mean "forever".
        gate = make_gate(policy())
        for call in (
            lambda: gate.pause("batch", duration=zero),
            lambda: gate.cap("batch", 1, duration=zero),
            lambda: gate.drain(duration=zero),
        ):
            with pytest.raises(ConfigError, match="is zero"):
                call()
        assert gate.overrides() == {"pause": {}, "cap": {}}
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT

    def test_an_override_shorter_than_a_millisecond_lasts_one(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy(), _clock_ms=clock)
        gate.pause("batch", duration=0.0001)
        assert gate.try_admit("batch", vram=1).retry_after == 0.001
        clock.advance(0.001)
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT

    def test_an_override_records_who_as_user_at_host_by_default(
        self, make_gate: Callable[..., Gate], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("LOGNAME", "oncall")
        gate = make_gate(policy())
        gate.pause("batch", duration="1m")
        assert gate.overrides()["pause"]["batch"]["who"] == f"oncall@{socket.gethostname()}"
        gate.pause("batch", duration="1m", who="pager")
        assert gate.overrides()["pause"]["batch"]["who"] == "pager"

    def test_a_cap_at_or_above_the_policys_warns_that_it_changes_nothing(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 3}))
        with capture_logs() as logs:
            gate.cap("batch", 2)
        assert not [e for e in logs if e["event"] == "cap_changes_nothing"]
        with capture_logs() as logs:
            gate.cap("batch", 3)
        (warned,) = [e for e in logs if e["event"] == "cap_changes_nothing"]
        assert (warned["log_level"], warned["n"], warned["policy_cap"]) == ("warning", 3, 3)


class TestPriority:
    """Higher-priority waiters hold lower classes back; own caps hold back nobody."""

    def test_an_interactive_waiter_makes_batch_defer(self, make_gate: Callable[..., Gate]) -> None:
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(policy(), sampler, _clock_ms=clock)
        big = gate.try_admit("batch", vram="60GiB")
        assert big.outcome is Outcome.ADMIT
        assert gate.try_admit("interactive", vram="30GiB").reason == "vram"  # now waiting
        d = gate.try_admit("batch", vram="10GiB")  # would fit, but takes the waiter's memory
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
        big.lease.release()  # type: ignore[union-attr]
        clock.advance(0.1)  # the next sample is taken after the release
        assert gate.try_admit("interactive", vram="30GiB").outcome is Outcome.ADMIT
        assert gate.try_admit("batch", vram="10GiB").outcome is Outcome.ADMIT

    def test_a_waiter_holds_back_any_device_it_fits_on_not_only_its_closest(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy(), SimulatedSampler(["80GiB", "80GiB"]), _clock_ms=clock)
        on_0 = gate.try_admit("batch", vram="60GiB", device="SIM-sim-0")
        on_1 = gate.try_admit("batch", vram="70GiB", device="SIM-sim-1")
        assert on_0.lease is not None
        assert on_1.lease is not None
        # 20 and 10 GiB free: it waits, closest to fitting on sim-0.
        assert gate.try_admit("interactive", vram="30GiB").reason == "vram"
        on_1.lease.release()
        clock.advance(0.1)  # sim-1 shows 80 GiB free
        # 60 GiB there would leave the waiter's 30 GiB no room: held back ...
        d = gate.try_admit("batch", vram="60GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
        # ... but 40 GiB leaves it room, and goes.
        assert gate.try_admit("batch", vram="40GiB").device_uuid == "SIM-sim-1"
        assert gate.try_admit("interactive", vram="30GiB").device_uuid == "SIM-sim-1"

    def test_a_waiter_is_held_to_its_own_class_reserve_where_it_fits_now(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Given 8 GiB reserved for interactive, above notebook and batch,
        clock = FakeClock()
        pol = policy(
            interactive={"priority": 100, "reserve": "8GiB"},
            notebook={"priority": 50},
            batch={"priority": 10},
        )
        sampler = SimulatedSampler(["40GiB", "40GiB"])
        gate = make_gate(pol, sampler, _clock_ms=clock)
        sampler.set_used(0, "20GiB")
        sampler.set_used(1, "25GiB")
        # and a notebook waiting for 30 GiB (20 and 15 GiB free, less the reserve),
        assert gate.try_admit("notebook", vram="30GiB").reason == "vram"
        # when sim-1 frees, and the notebook fits there (40 - 8 GiB),
        sampler.set_used(1, 0)
        clock.advance(0.1)
        # then batch may not take 5 GiB of it: 27 GiB would be left for the notebook,
        d = gate.try_admit("batch", vram="5GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
        # which is admitted there.
        assert gate.try_admit("notebook", vram="30GiB").device_uuid == "SIM-sim-1"

    def test_a_waiter_recorded_by_an_older_gate_holds_back_as_one_without_reserve_or_pin(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # Gates of the previous release write eight fields (no class reserve,
        # no pin) during a rolling upgrade: given one waiting for 30 GiB on sim-0,
        clock = FakeClock()
        gate = make_gate(policy(), SimulatedSampler(["80GiB", "80GiB"]), _clock_ms=clock)
        full = gate.try_admit("batch", vram="70GiB", device="SIM-sim-0")
        assert full.lease is not None
        record = f"100 {clock.ms} {30 * GiB} vram {clock.ms + 5000} SIM-sim-0 interactive vram"
        read_redis(server, lambda c: c.hset(PoolKeys(pool_name).waiters, "old|w", record))
        # then it holds back the room it fits in on its host's other device,
        d = gate.try_admit("batch", vram="60GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
        # as one whose request named no device and has no class reserve.
        assert gate.try_admit("batch", vram="50GiB").device_uuid == "SIM-sim-1"

    def test_a_slot_waiter_holds_back_a_slot_freed_on_any_device_of_its_host(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Given one job per GPU, both GPUs busy, and interactive waiting for a slot
        # (its record names the first full GPU, sim-0),
        clock = FakeClock()
        gate = make_gate(policy({"max_per_device": 1}), _clock_ms=clock)
        gate.try_admit("batch", vram="1GiB", device="SIM-sim-0")
        on_1 = gate.try_admit("batch", vram="1GiB", device="SIM-sim-1")
        assert on_1.lease is not None
        waiting = gate.try_admit("interactive", vram="1GiB")
        assert (waiting.reason, waiting.device) == ("cap", None)
        # when the slot of sim-1 frees,
        on_1.lease.release()
        clock.advance(0.1)
        # then batch may not take it,
        d = gate.try_admit("batch", vram="1GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
        # interactive gets it.
        assert gate.try_admit("interactive", vram="1GiB").device_uuid == "SIM-sim-1"

    def test_a_waiter_holds_back_the_last_free_slot_only_where_its_vram_fits(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Given two jobs per GPU, one on each, and interactive waiting for
        # 50 GiB (40 GiB free on sim-0, which it records, 35 GiB on sim-1),
        clock = FakeClock()
        gate = make_gate(policy({"max_per_device": 2}), _clock_ms=clock)
        assert gate.try_admit("batch", vram="40GiB", device="SIM-sim-0").admitted
        big = gate.try_admit("batch", vram="45GiB", device="SIM-sim-1")
        assert big.lease is not None
        assert gate.try_admit("interactive", vram="50GiB").reason == "vram"
        # sim-1's last slot goes to batch while interactive does not fit there;
        assert gate.try_admit("batch", vram="1GiB", device="SIM-sim-1").admitted
        # when 45 GiB free there, interactive fits, and the slot freed with
        # them is held back, even for a job that would leave it room.
        big.lease.release()
        clock.advance(0.1)
        d = gate.try_admit("batch", vram="1GiB", device="SIM-sim-1")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
        assert gate.try_admit("interactive", vram="50GiB").device_uuid == "SIM-sim-1"

    def test_a_pinned_slot_waiter_holds_back_its_device_only(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy({"max_per_device": 1}), _clock_ms=clock)
        gate.try_admit("batch", vram="1GiB", device="SIM-sim-0")
        on_1 = gate.try_admit("batch", vram="1GiB", device="SIM-sim-1")
        assert on_1.lease is not None
        assert gate.try_admit("interactive", vram="1GiB", device="SIM-sim-0").reason == "cap"
        on_1.lease.release()
        clock.advance(0.1)
        # sim-1's slot is of no use to it: batch takes it.
        assert gate.try_admit("batch", vram="1GiB").device_uuid == "SIM-sim-1"

    def test_a_pinned_waiter_holds_back_its_device_only(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy(), SimulatedSampler(["80GiB", "80GiB"]), _clock_ms=clock)
        full = gate.try_admit("batch", vram="70GiB", device="SIM-sim-0")
        assert full.lease is not None
        # It can run on sim-0 only, and waits there.
        assert gate.try_admit("interactive", vram="30GiB", device="SIM-sim-0").reason == "vram"
        # sim-1 is of no use to it: batch takes it.
        d = gate.try_admit("batch", vram="60GiB")
        assert (d.outcome, d.device_uuid) == (Outcome.ADMIT, "SIM-sim-1")
        # Its own device it still holds: room opening there goes to it first.
        full.lease.release()
        clock.advance(0.1)
        assert gate.try_admit("batch", vram="60GiB").reason == "priority"
        assert gate.try_admit("interactive", vram="30GiB", device="SIM-sim-0").admitted

    def test_a_waiter_waits_for_a_device_that_could_hold_it_not_the_one_with_most_room(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # Given 35 GiB free on an 80 GiB GPU and 40 GiB on an idle 40 GiB one,
        sampler = SimulatedSampler(["80GiB", "40GiB"])
        gate = make_gate(policy(), sampler)
        sampler.set_used(0, "45GiB")
        # when interactive asks for 60 GiB, which only the 80 GiB GPU can ever hold,
        assert gate.try_admit("interactive", vram="60GiB").reason == "vram"
        # then it waits for that GPU,
        (record,) = read_redis(server, lambda c: c.hvals(PoolKeys(pool_name).waiters))
        assert record.split()[5] == "SIM-sim-0"
        # and batch goes to the one it cannot use.
        assert gate.try_admit("batch", vram="10GiB").device_uuid == "SIM-sim-1"

    def test_a_lower_request_leaves_the_room_several_waiters_need_together(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Two interactive waiters of 20 GiB; 45 GiB open on dev1: each alone
        # would still fit after 10 GiB of batch, both would not.
        clock = FakeClock()
        sim = SimulatedSampler(["80GiB", "80GiB"])
        gate = make_gate(policy(), sim, _clock_ms=clock)
        sim.set_used(0, "65GiB")
        sim.set_used(1, "75GiB")
        for _ in range(2):  # two pollers (threads): two waiters
            poller = threading.Thread(
                target=gate.try_admit, args=("interactive",), kwargs={"vram": "20GiB"}
            )
            poller.start()
            poller.join()
        assert gate.client.hlen(gate._keys.waiters) == 2
        sim.set_used(1, "35GiB")
        clock.advance(0.1)
        d = gate.try_admit("batch", vram="10GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
        assert gate.try_admit("batch", vram="5GiB").outcome is Outcome.ADMIT  # 40 GiB left

    def test_a_request_only_capped_devices_could_hold_waits_for_the_cap(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Only the 80 GiB dev0 can hold 60 GiB, and interactive's per-device
        # cap is taken there: it waits for that cap (holding back nobody), not
        # for memory on the 40 GiB dev1, which batch may then use.
        clock = FakeClock()
        pol = policy(interactive={"priority": 100, "max_per_device": 1}, batch={"priority": 10})
        gate = make_gate(pol, SimulatedSampler(["80GiB", "40GiB"]), _clock_ms=clock)
        held = gate.try_admit("interactive", vram="10GiB", device="SIM-sim-0")
        assert held.lease is not None
        poller = threading.Thread(
            target=gate.try_admit, args=("interactive",), kwargs={"vram": "60GiB"}
        )
        poller.start()
        poller.join()
        (waiter,) = gate.client.hvals(gate._keys.waiters)
        assert waiter.split()[3] == b"-"
        assert waiter.split()[7] == b"cap"
        d = gate.try_admit("batch", vram="25GiB", device="SIM-sim-1")
        assert d.outcome is Outcome.ADMIT

    def test_another_hosts_waiter_does_not_hold_back_this_hosts_devices(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # An interactive request waits on host A's full GPU; host B's GPU is
        # idle. A cannot use B's GPU: B's batch must not wait for it.
        clock = FakeClock()
        host_a = make_gate(policy(), _Renamed(SimulatedSampler(["80GiB"]), "A"), _clock_ms=clock)
        host_b = make_gate(policy(), _Renamed(SimulatedSampler(["80GiB"]), "B"), _clock_ms=clock)
        full = host_a.try_admit("batch", vram="70GiB")
        assert full.lease is not None
        assert host_a.try_admit("interactive", vram="30GiB").reason == "vram"
        d = host_b.try_admit("batch", vram="60GiB")
        assert d.outcome is Outcome.ADMIT
        assert d.device_uuid == "B-SIM-sim-0"

    def test_a_poller_that_comes_back_when_told_keeps_its_place(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # The defaults: a 30 s lease TTL (a third of it is 10 s), a 5 s waiter TTL.
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(policy({"lease_ttl": "30s"}), sampler, _clock_ms=clock)
        big = gate.try_admit("batch", vram="60GiB")  # kept: a dropped lease is released
        assert big.outcome is Outcome.ADMIT
        for _ in range(20):
            d = gate.try_admit("interactive", vram="30GiB")
            assert d.reason == "vram"
            assert 1.25 <= d.retry_after <= 3.75  # half the waiter TTL, ±50 %
            clock.advance(d.retry_after)
            gate.beat_now()  # the batch job's lease stays renewed
            # Still a waiter when it comes back: batch may not take its memory.
            assert gate.try_admit("batch", vram="10GiB").reason == "priority"

    def test_a_poller_told_by_the_local_pre_check_comes_back_before_its_entry_lapses(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # A 30 s waiter TTL: the estimate is 15 s, jittered to 7.5-22.5 s.
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        pol = policy({"lease_ttl": "60s", "waiter_ttl": "30s", "retry_max": "60s"})
        gate = make_gate(pol, sampler, _clock_ms=clock)
        big = gate.try_admit("batch", vram="60GiB")  # kept: a dropped lease is released
        assert big.lease is not None
        sampler.set_used(0, "60GiB")
        big.lease.report_vram("60GiB")  # the sample's 60 GiB are its: 20 GiB are free
        gate.beat_now()
        for _ in range(20):
            gate._recent_defer.clear()  # this poll goes to Redis
            assert gate.try_admit("interactive", vram="30GiB").reason == "vram"
            (key,) = gate._recent_defer  # this poller's waiter id
            # Given the answer from Redis 8 s ago (the pre-check trusts it for 10 s)...
            gate._recent_defer[key] -= 8
            clock.advance(8)
            since_s = time.monotonic() - gate._recent_defer[key]
            d = gate.try_admit("interactive", vram="30GiB")
            assert (d.reason, d.local) == ("vram", True)
            # ...it is told to come back within 3/4 of the waiter TTL of that answer.
            assert since_s + d.retry_after <= 22.5
            clock.advance(d.retry_after)
            gate.beat_now()
            assert gate.try_admit("batch", vram="10GiB").reason == "priority"

    def test_jitter_spreads_retries_below_retry_max_instead_of_piling_on_it(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # retry_max (1 s) below the estimate (half the waiter TTL, 2.5 s).
        pol = policy({"retry_max": "1s"}, batch={"priority": 10, "max_concurrent": 0})
        gate = make_gate(pol)
        retries = [gate.try_admit("batch", vram=1).retry_after for _ in range(40)]
        assert all(0.5 <= r <= 1 for r in retries), retries
        assert retries.count(1.0) <= 1
        assert len(set(retries)) > 30

    def test_a_poller_on_a_host_without_gpus_that_comes_back_when_told_stays_a_waiter(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # It waits for no_gpu (the alert GpugateGPUUnavailable counts such
        # waiters): it was told retry_max (30 s) against a 5 s waiter TTL,
        # and dropped out of the waiters between polls.
        clock = FakeClock()
        gate = make_gate(policy(), NoGpuSampler(), _clock_ms=clock)
        for _ in range(10):
            d = gate.try_admit("batch", vram=1)
            assert d.reason == "no_gpu"
            clock.advance(d.retry_after)
            records = read_redis(server, lambda c: c.hvals(PoolKeys(pool_name).waiters))
            # Live when it comes back: its expiry (the fifth field) still ahead.
            assert [int(r.split()[4]) > clock() for r in records] == [True]

    def test_a_waiter_held_back_by_its_own_cap_holds_back_nobody(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        pol = policy(interactive={"priority": 100, "max_concurrent": 1}, batch={"priority": 10})
        gate = make_gate(pol, SimulatedSampler(["80GiB"]))
        assert gate.try_admit("interactive", vram="1GiB").outcome is Outcome.ADMIT
        assert gate.try_admit("interactive", vram="1GiB").reason == "cap"
        assert gate.try_admit("batch", vram="10GiB").outcome is Outcome.ADMIT

    def test_a_paused_class_does_not_age_past_the_classes_the_drain_kept_running(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # 6/min of aging over a 20-minute drain lifted batch (10) above
        # interactive (100): once resumed, its waiter held interactive back.
        clock = FakeClock()
        pol = policy(
            {"priority_aging": "6/min", "waiter_ttl": "1h", "lease_ttl": "1h"},
            interactive={"priority": 100},
            batch={"priority": 10},
        )
        gate = make_gate(pol, SimulatedSampler(["80GiB"]), _clock_ms=clock)
        assert gate.try_admit("interactive", vram="20GiB").lease is not None
        gate.drain()
        for _ in range(20):
            assert gate.try_admit("batch", vram="70GiB").reason == "paused"
            clock.advance(60)
        gate.resume("batch")
        assert gate.try_admit("batch", vram="70GiB").reason == "vram"  # waits on
        assert gate.try_admit("interactive", vram="30GiB").outcome is Outcome.ADMIT

    def test_a_dead_waiter_stops_counting_after_the_waiter_ttl(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy({"waiter_ttl": "5s"}), SimulatedSampler(["80GiB"]), _clock_ms=clock)
        assert gate.try_admit("batch", vram="60GiB").outcome is Outcome.ADMIT
        assert gate.try_admit("interactive", vram="30GiB").reason == "vram"
        assert gate.try_admit("batch", vram="10GiB").reason == "priority"
        clock.advance(5.001)
        assert gate.try_admit("batch", vram="10GiB").outcome is Outcome.ADMIT

    def test_lapsed_waiters_of_a_paused_class_are_swept(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # A decision stopped by a pause reads no waiters, so it deletes none:
        # pollers of a class paused overnight left every entry behind.
        clock = FakeClock()
        gate = make_gate(
            policy({"waiter_ttl": "5s", "lease_ttl": "30s"}),
            SimulatedSampler(["80GiB"]),
            _clock_ms=clock,
        )
        gate.pause("batch")
        for i in range(1, 51):
            assert gate.try_admit("batch", vram=i).reason == "paused"
        assert gate.client.hlen(gate._keys.waiters) == 50
        gate.beat_now()  # within the TTL of the last sweep: nothing to do yet
        clock.advance(30)
        assert gate.try_admit("batch", vram=1).reason == "paused"  # one still polls
        gate.beat_now()
        assert gate.client.hlen(gate._keys.waiters) == 1

    def test_two_threads_polling_the_same_request_are_two_waiters(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Given two job slots (threads) of one worker, each polling for an
        # interactive job of 15 GiB while 10 GiB are free,
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        worker = make_gate(policy({"waiter_ttl": "1h"}), sampler, _clock_ms=clock)
        other = make_gate(sampler=sampler, _clock_ms=clock)
        sampler.set_used(0, "70GiB")  # memory gpugate does not manage
        with ThreadPoolExecutor(1) as slot_a, ThreadPoolExecutor(1) as slot_b:

            def poll(slot: ThreadPoolExecutor) -> Decision:
                return slot.submit(worker.try_admit, "interactive", vram="15GiB").result()

            assert poll(slot_a).reason == "vram"
            assert poll(slot_b).reason == "vram"
            # when 30 GiB come free and slot A is admitted,
            sampler.set_used(0, "50GiB")
            clock.advance(0.1)
            a = poll(slot_a)
            assert a.outcome is Outcome.ADMIT
            # then slot B still waits: batch may not take the 15 GiB left,
            d = other.try_admit("batch", vram="10GiB")
            assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
            # which slot B gets when it comes back.
            assert poll(slot_b).outcome is Outcome.ADMIT

    def test_two_asyncio_tasks_polling_the_same_request_are_two_waiters(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # The same with two tasks of one event loop as the job slots.
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        worker = make_gate(policy({"waiter_ttl": "1h"}), sampler, _clock_ms=clock)
        other = make_gate(sampler=sampler, _clock_ms=clock)
        sampler.set_used(0, "70GiB")

        async def slot(again: asyncio.Event) -> list[Decision]:
            first = worker.try_admit("interactive", vram="15GiB")
            await again.wait()
            return [first, worker.try_admit("interactive", vram="15GiB")]

        async def two_slots() -> tuple[list[Decision], Decision, list[Decision]]:
            again_a, again_b = asyncio.Event(), asyncio.Event()
            slot_a = asyncio.create_task(slot(again_a))
            slot_b = asyncio.create_task(slot(again_b))
            await asyncio.sleep(0)  # both have polled once
            sampler.set_used(0, "50GiB")
            clock.advance(0.1)
            again_a.set()
            a = await slot_a
            batch = other.try_admit("batch", vram="10GiB")
            again_b.set()
            return a, batch, await slot_b

        a, batch, b = asyncio.run(two_slots())
        assert (batch.outcome, batch.reason) == (Outcome.DEFER, "priority")
        assert [d.reason for d in a + b] == ["vram", "ok", "vram", "ok"]

    def test_a_poller_admitted_then_deferred_is_a_waiter_again_at_once(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # Given a poller admitted after a DEFER vram (its entry deleted),
        clock = FakeClock()
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(policy({"waiter_ttl": "1h"}), sampler, _clock_ms=clock)
        sampler.set_used(0, "70GiB")
        assert gate.try_admit("interactive", vram="15GiB").reason == "vram"
        sampler.set_used(0, "50GiB")
        clock.advance(0.1)
        first = gate.try_admit("interactive", vram="15GiB")
        assert first.outcome is Outcome.ADMIT
        # when it asks again for its next job and nothing fits locally,
        sampler.set_used(0, "70GiB")
        clock.advance(0.1)
        d = gate.try_admit("interactive", vram="15GiB")
        # then Redis answers, not the pre-check: the request waits in Redis again.
        assert (d.reason, d.local) == ("vram", False)
        assert len(waiter_ids(server, pool_name)) == 1

    def test_waiting_ages_a_request_past_higher_classes(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        pol = policy({"priority_aging": "1/s", "waiter_ttl": "1h"})
        gate = make_gate(pol, SimulatedSampler(["80GiB"]), _clock_ms=clock)
        assert gate.try_admit("interactive", vram="70GiB").outcome is Outcome.ADMIT
        assert gate.try_admit("batch", vram="20GiB").reason == "vram"  # batch starts waiting
        clock.advance(200)  # batch: 10 + 200 > 100 + (0 waited) for a new interactive
        assert gate.try_admit("batch", vram="20GiB").reason == "vram"
        d = gate.try_admit("interactive", vram="5GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")


class TestTokenBucket:
    """Rate + burst, tokens taken only when everything else passes."""

    def test_burst_then_exact_retry_after_from_the_deficit(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy(batch={"priority": 10, "rate": "2/s", "burst": 3}), _clock_ms=clock)
        outcomes = [gate.try_admit("batch", vram=1).outcome for _ in range(3)]
        assert outcomes == [Outcome.ADMIT] * 3
        d = gate.try_admit("batch", vram=1)
        assert (d.reason, d.retry_after) == ("rate", 0.5)
        clock.advance(0.5)
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT

    def test_a_deferral_for_another_reason_takes_no_token(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy(batch={"priority": 10, "rate": "1/h", "burst": 1}), _clock_ms=clock)
        assert gate.try_admit("batch", vram="81GiB").reason == "too_large"
        gate.pause("batch")
        assert gate.try_admit("batch", vram=1).reason == "paused"
        gate.resume("batch")
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        assert gate.try_admit("batch", vram=1).reason == "rate"


class TestLeases:
    """Heartbeats renew; expiry frees; ids are fencing tokens; max duration stops renewal."""

    def test_an_expired_lease_frees_its_slot_and_is_never_renewed_again(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(
            policy({"lease_ttl": "5s"}, batch={"priority": 10, "max_concurrent": 1}),
            _clock_ms=clock,
        )
        d = gate.try_admit("batch", vram=1)
        lost: list[str] = []
        d.lease.on_lost(lambda lease: lost.append(lease.id))  # type: ignore[union-attr]
        assert gate.try_admit("batch", vram=1).reason == "cap"
        clock.advance(5.001)
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        gate.beat_now()
        assert d.lease.lost  # type: ignore[union-attr]
        assert lost == [d.lease.id]  # type: ignore[union-attr]

    def test_a_killed_worker_with_hundreds_of_leases_frees_its_slot_after_a_few_short_retries(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Given a worker that held 300 interactive leases and the one batch
        # slot, then died: nothing renews or releases them (its decisions are
        # kept, so no dropped lease is released either).
        clock = FakeClock()
        pol = policy(interactive={"priority": 100}, batch={"priority": 10, "max_concurrent": 1})
        dead = make_gate(pol, register=False, _clock_ms=clock)
        held = [dead.try_admit("interactive", vram=1) for _ in range(300)]
        held.append(dead.try_admit("batch", vram=1))
        assert all(d.admitted for d in held)
        assert dead._heartbeat is not None
        dead._heartbeat.stop()
        gate = make_gate(pol, _clock_ms=clock)
        # When one TTL has passed and a batch request polls, coming back when told
        clock.advance(30.001)
        expired_at = clock.ms
        deferred = []
        d = gate.try_admit("batch", vram=1)
        while not d.admitted and len(deferred) < 20:
            deferred.append(d)
            clock.advance(d.retry_after)
            d = gate.try_admit("batch", vram=1)
        # Then each decision reaps a batch of them and tells it to come back
        # at once (not after the usual estimate), until the slot is free.
        assert d.admitted
        assert 0 < len(deferred) < 20
        assert all(x.reason == "cap" and x.retry_after < 0.1 for x in deferred)
        assert clock.ms - expired_at < 1000

    def test_a_callback_may_call_back_into_the_gate(self, make_gate: Callable[..., Gate]) -> None:
        # on_lost runs once the beat is over: beat_now() in it used to wait for
        # the beat lock its own thread held, and the heartbeat stopped for good.
        clock = FakeClock()
        gate = make_gate(policy({"lease_ttl": "5s"}), _clock_ms=clock)
        first = gate.try_admit("batch", vram=1).lease
        assert first is not None
        first.on_lost(lambda _lease: gate.beat_now())
        clock.advance(5.001)
        kept = gate.try_admit("batch", vram=1).lease  # reaps the first
        assert kept is not None
        beat = threading.Thread(target=gate.beat_now, daemon=True)
        beat.start()
        beat.join(10)
        assert not beat.is_alive(), "the beat waited for itself"
        assert first.lost
        clock.advance(4)
        gate.beat_now()  # beats go on: the other lease is renewed
        clock.advance(4)
        assert gate.try_admit("batch", vram=1).admitted
        assert not kept.lost

    def test_renewal_keeps_a_lease_alive_past_its_ttl(self, make_gate: Callable[..., Gate]) -> None:
        clock = FakeClock()
        gate = make_gate(
            policy({"lease_ttl": "5s"}, batch={"priority": 10, "max_concurrent": 1}),
            _clock_ms=clock,
        )
        d = gate.try_admit("batch", vram=1)
        for _ in range(5):
            clock.advance(3)
            gate.beat_now()
            # Renewed for one TTL from the beat's time, not more.
            assert d.lease.expires_ms == clock.ms + 5000  # type: ignore[union-attr]
        assert not d.lease.lost  # type: ignore[union-attr]
        assert gate.try_admit("batch", vram=1).reason == "cap"

    def test_the_clock_stepping_back_never_revives_a_lease(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(
            policy({"lease_ttl": "5s"}, batch={"priority": 10, "max_concurrent": 1}),
            _clock_ms=clock,
        )
        d = gate.try_admit("batch", vram=1)
        clock.advance(6)
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        clock.advance(-6)  # a worker clock (or TIME) stepping back
        gate.beat_now()
        assert d.lease.lost  # type: ignore[union-attr]

    def test_max_duration_stops_renewal_and_tells_the_holder(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        pol = policy(
            {"lease_ttl": "5s"},
            notebook={"priority": 50, "max_duration": "10s", "max_concurrent": 1},
        )
        gate = make_gate(pol, _clock_ms=clock)
        d = gate.try_admit("notebook", vram=1)
        told: list[bool] = []
        d.lease.on_max_duration(lambda lease: told.append(True))  # type: ignore[union-attr]
        for _ in range(3):
            clock.advance(3)
            gate.beat_now()
        assert not d.lease.max_duration_reached  # type: ignore[union-attr]
        clock.advance(1.5)
        gate.beat_now()
        assert d.lease.max_duration_reached  # type: ignore[union-attr]
        assert told == [True]
        lost: list[bool] = []
        d.lease.on_lost(lambda lease: lost.append(True))  # type: ignore[union-attr]
        clock.advance(5.001)
        assert gate.try_admit("notebook", vram=1).outcome is Outcome.ADMIT
        # Its end reaches the holder too: lost, by max_duration as the pool counts
        # it (not "expired"), and no longer held by the gate.
        gate.beat_now()
        assert d.lease.lost  # type: ignore[union-attr]
        assert d.lease.lost_reason == "max_duration"  # type: ignore[union-attr]
        assert lost == [True]
        assert d.lease not in gate.leases_held()

    def test_a_shorter_bound_applies_under_contention(self, make_gate: Callable[..., Gate]) -> None:
        clock = FakeClock()
        pol = policy(
            {"lease_ttl": "5s", "waiter_ttl": "1h"},
            interactive={"priority": 100},
            notebook={"priority": 50, "max_duration": "8h", "max_duration_contended": "10s"},
        )
        gate = make_gate(pol, SimulatedSampler(["80GiB"]), _clock_ms=clock)
        nb = gate.try_admit("notebook", vram="70GiB")
        clock.advance(3)
        gate.beat_now()
        assert not nb.lease.max_duration_reached  # type: ignore[union-attr]
        assert gate.try_admit("interactive", vram="30GiB").reason == "vram"
        clock.advance(4)
        gate.beat_now()
        assert not nb.lease.max_duration_reached  # type: ignore[union-attr]
        clock.advance(4)  # 11 s held, 10 s allowed while someone waits
        gate.beat_now()
        assert nb.lease.max_duration_reached  # type: ignore[union-attr]
        assert not nb.lease.lost  # type: ignore[union-attr]
        # The waiter leaving does not bring renewal back: the lease ends at its
        # expiry, counted as ended by max_duration, not as expired.
        gate.client.delete(gate._keys.waiters)  # the interactive request went away
        clock.advance(1)
        gate.beat_now()
        assert nb.lease.expires_ms is not None
        assert nb.lease.expires_ms <= clock.ms + 5000 - 1000
        clock.advance(5)
        gate.beat_now()
        assert nb.lease.lost  # type: ignore[union-attr]
        assert nb.lease.lost_reason == "max_duration"  # type: ignore[union-attr]
        view = gate.client.hgetall(gate._keys.state)
        assert view.get(b"out:notebook:max_duration") == b"1"
        assert b"expired:notebook" not in view

    def test_only_a_waiter_above_the_lease_class_contends_for_its_device(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Given a notebook holding most of the GPU and batch waiting for memory there,
        clock = FakeClock()
        pol = policy(
            {"lease_ttl": "5s", "waiter_ttl": "1h", "priority_aging": "1/s"},
            notebook={"priority": 50, "max_duration": "8h", "max_duration_contended": "10s"},
            batch={"priority": 10},
        )
        gate = make_gate(pol, SimulatedSampler(["80GiB"]), _clock_ms=clock)
        nb = gate.try_admit("notebook", vram="70GiB")
        assert nb.lease is not None
        assert gate.try_admit("batch", vram="30GiB").reason == "vram"
        # when the notebook is past its contended bound, batch does not cut it short
        # while it stays below the notebook's priority (10 + 1/s waited),
        for _ in range(13):
            clock.advance(3)
            gate.beat_now()
            assert not nb.lease.max_duration_reached
        # and does once it has waited past it.
        clock.advance(3)  # 42 s waited: 52 above 50
        gate.beat_now()
        assert nb.lease.max_duration_reached

    def test_lease_ids_are_never_reused_after_redis_loses_its_state(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        pol = policy({"lease_ttl": "1s"}, batch={"priority": 10, "max_concurrent": 1})
        old_holder = make_gate(pol, register=False)
        new_holder = make_gate(pol, register=False)
        held = old_holder.try_admit("batch", vram="1GiB").lease
        assert held is not None
        # Redis comes back empty: the gate that knew the pool restores its
        # policy, and nothing is admitted until the holders have renewed.
        lose_state(server, pool_name)
        time.sleep(0.002)  # a restart takes longer than a millisecond
        new_holder.sync_policy()
        assert new_holder.try_admit("batch", vram="1GiB").reason == "recovering"
        old_holder.beat_now()  # its lease comes back, as it was
        assert not held.lost
        assert held.release() is True
        time.sleep(1.1)  # the window: a TTL from the lease's return
        fresh = new_holder.try_admit("batch", vram="1GiB").lease
        assert fresh is not None
        assert int(fresh.id) > int(held.id)
        # The old holder's release and heartbeat never touch the new lease.
        assert held.release() is False
        old_holder.beat_now()
        assert new_holder.try_admit("batch", vram="1GiB").reason == "cap"
        new_holder.beat_now()
        assert not fresh.lost

    def test_a_lease_redis_lost_counts_its_memory_again(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # 60 GiB held on 80 GiB, its job not yet allocated; Redis restarts
        # empty. The 60 GiB must not be given away (was: 120 GiB committed).
        pol = policy({"lease_ttl": "1s"})
        holder = make_gate(pol, SimulatedSampler(["80GiB"]), register=False)
        other = make_gate(pol, SimulatedSampler(["80GiB"]), register=False)
        held = holder.try_admit("batch", vram="60GiB").lease
        assert held is not None
        lose_state(server, pool_name)
        assert other.try_admit("batch", vram="60GiB").reason == "recovering"
        holder.beat_now()
        time.sleep(1.1)  # the window: a TTL from the lease's return
        d = other.try_admit("batch", vram="60GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "vram")
        assert other.try_admit("batch", vram="20GiB").outcome is Outcome.ADMIT

    def test_a_lease_redis_lost_to_an_older_snapshot_comes_back_with_its_renewal(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        pol = policy({"lease_ttl": "1s"}, batch={"priority": 10, "max_concurrent": 1})
        holder = make_gate(pol, register=False)
        other = make_gate(pol, register=False)
        pattern = f"gpugate:{{{pool_name}}}:*"
        snapshot = read_redis(
            server, lambda client: {k: client.dump(k) for k in client.keys(pattern)}
        )
        held = holder.try_admit("batch", vram="1GiB").lease
        assert held is not None

        def restore(client: redis.Redis) -> None:  # Redis restarts from the snapshot
            client.delete(*client.keys(pattern))
            for key, value in snapshot.items():
                client.restore(key, 0, value)

        read_redis(server, restore)
        holder.beat_now()  # its id is above the last the snapshot issued
        assert not held.lost
        # Other holders may be back too: a TTL before anything is admitted.
        assert other.try_admit("batch", vram="1GiB").reason == "recovering"
        time.sleep(1.1)
        holder.beat_now()
        assert other.try_admit("batch", vram="1GiB").reason == "cap"
        assert held.release() is True
        assert other.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT

    def test_a_lease_of_a_class_the_policy_lost_comes_back_with_its_memory(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # The operator dropped class ocr while its job ran; Redis then lost its
        # state. The job still holds its memory: its lease comes back.
        with_ocr = policy({"lease_ttl": "1s"}, ocr={"priority": 50}, batch={"priority": 10})
        without = policy({"lease_ttl": "1s"}, batch={"priority": 10})
        holder = make_gate(with_ocr, SimulatedSampler(["80GiB"]), register=False)
        held = holder.try_admit("ocr", vram="60GiB").lease
        assert held is not None
        other = make_gate(without, SimulatedSampler(["80GiB"]), register=False)
        other.apply_policy()
        holder.beat_now()  # follows the new policy; its lease still counts
        lose_state(server, pool_name)
        holder.beat_now()  # publishes the policy it knew; its lease comes back
        assert not held.lost
        time.sleep(1.1)
        d = other.try_admit("batch", vram="60GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "vram")

    def test_a_policy_stored_over_an_automatic_default_by_an_older_gate_is_not_one(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # An older release's `policy apply` stores its policy and leaves the
        # automatic default's mark as it was: that policy is the operator's.
        make_gate(None, register=False).sync_policy()  # the automatic default
        applied = policy(batch={"priority": 10, "max_concurrent": 2})
        key = PoolKeys(pool_name).state
        mark = read_redis(server, lambda client: client.hget(key, "pauto"))
        assert mark == Policy.default().version
        make_gate(applied, register=False).apply_policy()
        read_redis(
            server, lambda client: client.hset(key, "pauto", mark)
        )  # as the old one leaves it
        other = policy(batch={"priority": 10, "max_concurrent": 9})
        assert make_gate(other, register=False).pool_policy_version == applied.version

    def test_a_pool_an_older_gate_made_gets_an_epoch_from_its_first_lease_here(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # Without one, a lease lost with Redis's state could not be told from
        # one this state ended once another id was issued.
        gate = make_gate(policy(), register=False)
        key = PoolKeys(pool_name).state
        read_redis(server, lambda client: client.hdel(key, "epoch"))  # an older gate's pool
        held = gate.try_admit("batch", vram=1).lease
        assert held is not None
        epoch = read_redis(server, lambda client: client.hget(key, "epoch"))
        assert epoch == f"a{held.id}"
        assert held._granted is not None
        assert held._granted.epoch == epoch.encode()

    def test_status_says_the_pool_is_recovering(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        from gpugate.state._inspect import read_pool
        from gpugate.state._verdict import assess

        gate = make_gate(policy({"lease_ttl": "30s"}), register=False)
        assert gate.try_admit("batch", vram=1).lease is not None
        lose_state(server, pool_name)
        gate.sync_policy()  # restores the policy it knew: the window opens
        assert gate.try_admit("batch", vram=1).reason == "recovering"
        client = redis.Redis.from_url(server.url)
        try:
            verdict = assess(read_pool(client, pool_name))
        finally:
            client.close()
        # (CRITICAL too: the devices' samples went with the state.)
        assert any(r.startswith("recovering: Redis lost its state") for r in verdict.reasons)

    def test_status_says_when_more_is_committed_than_a_device_holds(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # An older gate admitted during the recovery window; the lease put
        # back then lands on top: the verdict must not say OK.
        from gpugate.state._inspect import read_pool
        from gpugate.state._verdict import assess

        pol = policy({"lease_ttl": "1s"})
        holder = make_gate(pol, SimulatedSampler(["80GiB"]), register=False)
        other = make_gate(pol, SimulatedSampler(["80GiB"]), register=False)
        held = holder.try_admit("batch", vram="60GiB").lease
        assert held is not None
        lose_state(server, pool_name)
        other.sync_policy()  # as an older gate would: no window
        read_redis(server, lambda client: client.hdel(PoolKeys(pool_name).state, "recover"))
        assert other.try_admit("batch", vram="60GiB").lease is not None
        holder.beat_now()  # 60 GiB more put back: 120 GiB on 80
        client = redis.Redis.from_url(server.url)
        try:
            verdict = assess(read_pool(client, pool_name))
        finally:
            client.close()
        assert any("120GiB committed on 80GiB" in r for r in verdict.reasons), verdict.reasons

    def test_a_lease_that_expired_is_not_brought_back_by_its_renewal(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        gate = make_gate(policy({"lease_ttl": "1s"}), register=False, _clock_ms=clock)
        held = gate.try_admit("batch", vram="1GiB").lease
        assert held is not None
        clock.advance(1.5)
        other = gate.try_admit("interactive", vram="1GiB")  # reaps it; its ghost ends later
        assert other.lease is not None
        clock.advance(5)
        assert gate.try_admit("interactive", vram="1GiB").lease is not None  # the ghost goes
        gate.beat_now()
        assert (held.lost, held.lost_reason) == (True, "expired")

    def test_a_policyless_worker_coming_back_first_does_not_leave_the_pool_uncapped(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        capped = policy({"lease_ttl": "1s"}, batch={"priority": 10, "max_concurrent": 2})
        running = make_gate(capped, register=False)  # beats when told
        held = running.try_admit("batch", vram=1).lease
        assert held is not None
        # Redis loses its state; a worker without a policy starts first and
        # publishes the (uncapped) default.
        lose_state(server, pool_name)
        worker = make_gate(None, register=False)
        worker.sync_policy()
        assert worker.pool_policy == Policy.default()
        # The running gate sees the change at its next decision (made by the
        # default) and puts back the policy it knew, with a recovery window.
        second = running.try_admit("batch", vram=1).lease
        assert second is not None
        assert running.pool_policy_version == capped.version
        assert worker.try_admit("batch", vram=1).reason == "recovering"
        assert worker.pool_policy_version == capped.version
        running.beat_now()  # its lease from before comes back
        assert not held.lost
        time.sleep(1.1)  # the window: a TTL from the lease's return
        assert worker.try_admit("batch", vram=1).reason == "cap"
        # So does a gate made with that policy after the worker.
        lose_state(server, pool_name)
        make_gate(None, register=False).sync_policy()
        assert make_gate(capped, register=False).pool_policy_version == capped.version

    def test_redis_losing_its_state_restores_the_applied_policy_not_a_gates_own(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        loose = policy({"lease_ttl": "1s"}, batch={"priority": 10, "max_concurrent": 4})
        strict = policy({"lease_ttl": "1s"}, batch={"priority": 10, "max_concurrent": 1})
        running = make_gate(loose, register=False)
        make_gate(strict, register=False).apply_policy()  # `gpugate policy apply`
        held = running.try_admit("batch", vram=1).lease  # follows it
        assert held is not None
        lose_state(server, pool_name)
        assert running.try_admit("batch", vram=1).reason == "recovering"
        assert running.pool_policy_version == strict.version
        running.beat_now()  # its lease comes back
        time.sleep(1.1)  # the window: a TTL from the lease's return
        assert running.try_admit("batch", vram=1).reason == "cap"
        assert held.release() is True
        assert running.try_admit("batch", vram=1).outcome is Outcome.ADMIT

    def test_a_dropped_lease_object_releases_its_slot(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 1}))
        labels = {"pool": gate.pool, "class": "batch", "outcome": "dropped"}

        def dropped() -> float:
            got = gate.metrics.registry.get_sample_value("gpugate_job_outcomes_total", labels)
            return got or 0.0

        before = dropped()
        gate.try_admit("batch", vram=1)  # the decision and its lease are dropped at once
        gc.collect()
        gate.beat_now()
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        # The worker's own metrics count it, as the pool's do.
        assert dropped() == before + 1

    def test_a_release_outcome_outside_the_fixed_set_is_refused(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # It becomes a metric label and a pool counter: a fixed set, not free text.
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 1}))
        d = gate.try_admit("batch", vram=1)
        assert d.lease is not None
        with pytest.raises(UsageError, match="'ok', 'error', 'oom', 'dropped'"):
            d.lease.release("job 1234 failed")
        assert d.lease.release("error") is True  # still releasable, with a good one
        t = gate.admit("batch", vram=1, timeout=5)
        with pytest.raises(UsageError):
            t.release("timeout")
        t.release("ok")
        assert t.outcome == "ok"
        assert gate.try_admit("batch", vram=1).admitted

    def test_a_lease_collected_while_the_registry_is_busy_does_not_hang(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # A dropped lease in a reference cycle is collected at any allocation,
        # possibly in a thread that holds the registry's lock right then.
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 1}))
        lease = gate.try_admit("batch", vram=1).lease
        assert lease is not None
        lease.on_lost(lambda _lost, lease=lease: None)  # lease -> callback -> lease
        del lease
        gc.disable()
        try:
            done = threading.Event()

            def collect_while_busy() -> None:
                with gate._leases._lock:
                    gc.collect()
                done.set()

            threading.Thread(target=collect_while_busy, daemon=True).start()
            assert done.wait(10), "garbage collection waited for the lock its thread held"
        finally:
            gc.enable()
        gate.beat_now()  # releases it, as any dropped lease
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT

    def test_close_in_a_signal_handler_that_interrupted_the_gates_bookkeeping_does_not_hang(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # A SIGTERM handler that closes the gate runs in the thread it
        # interrupted, which may hold the gate's locks right then (adding or
        # dropping a lease, a blocked admission joining or settling).
        pol = policy(batch={"priority": 10, "max_concurrent": 1})
        gate, other = make_gate(pol), make_gate(pol)
        assert gate.try_admit("batch", vram=1).lease is not None

        def hung(signum: int, frame: object) -> None:
            raise AssertionError("close() waited for a lock its own thread held")

        previous = signal.signal(signal.SIGALRM, hung)
        signal.setitimer(signal.ITIMER_REAL, 10, 1)  # again each second: one wait per lock
        try:
            with gate._lock, gate._leases._lock, gate._herd._lock:
                gate.close()  # what the handler does, in the interrupted thread
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert other.try_admit("batch", vram=1).admitted  # given back at once

    def test_a_gate_refuses_to_work_in_a_forked_child(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy())
        held = gate.try_admit("batch", vram=1)
        assert held.lease is not None
        uses: dict[str, Callable[[], object]] = {
            "try_admit": lambda: gate.try_admit("batch", vram=1),
            "pause": lambda: gate.pause("batch", duration="1m"),
            "overrides": gate.overrides,
            "sync_policy": gate.sync_policy,
            "leases_held": gate.leases_held,
            "release": held.lease.release,
        }
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                answers = []
                for name, use in uses.items():
                    try:
                        use()
                        answers.append(f"{name}:worked")
                    except UsageError:
                        answers.append(f"{name}:refused")
                os.write(w, " ".join(answers).encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(r, 4096).decode().split() == [f"{name}:refused" for name in uses]
        assert gate.overrides() == {"pause": {}, "cap": {}}
        assert held.lease.release() is True  # the parent still holds it

    def test_a_gate_follows_a_policy_applied_while_it_holds_a_lease(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # `gpugate policy apply` lowers the lease TTL from 30 s to 1 s: the holder
        # must renew every 1/3 s from then on, or its live lease goes overdue.
        holder = make_gate(policy({"lease_ttl": "30s"}))
        held = holder.try_admit("batch", vram=1)
        assert held.lease is not None
        assert holder.lease_ttl_s == 30
        applier = make_gate(policy({"lease_ttl": "1s"}), register=False)
        applier.sync_policy(force=True)
        holder.beat_now()  # the next beat's reply carries the new policy version
        assert holder.lease_ttl_s == 1
        assert holder.pool_policy_version == applier.policy.version  # type: ignore[union-attr]
        time.sleep(3)  # three new TTLs: the background heartbeat renews at the new pace
        assert not held.lease.lost
        assert holder.try_admit("batch", vram=1).admitted  # a decision reaps nothing of it
        assert not held.lease.lost
        assert held.lease.release() is True

    def test_a_decision_notices_a_new_policy_too(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 5}))
        applier = make_gate(
            policy(batch={"priority": 10, "max_concurrent": 1}, extra={"priority": 1}),
            register=False,
        )
        applier.sync_policy(force=True)
        assert gate.try_admit("batch", vram=1).admitted
        assert "extra" in gate.effective_policy.classes
        assert gate.effective_policy.class_policy("batch").max_concurrent == 1
        assert gate.policy_mismatch

    def test_a_worker_without_a_policy_publishes_the_default_and_beats(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        with capture_logs() as logs:
            gate = make_gate(None)
            gate.beat_now()
        assert state(server, pool_name).get("pversion") == Policy.default().version
        assert not [e for e in logs if e["event"] == "heartbeat_failed"]
        # A pool that loses its policy (flushed) gets it back at the next beat.
        client = redis.Redis.from_url(server.url)
        client.delete(PoolKeys(pool_name).state)
        client.close()
        gate.beat_now()
        assert state(server, pool_name).get("pversion") == Policy.default().version

    def test_a_worker_restores_the_operators_policy_after_redis_loses_it(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        applied = policy(
            {"lease_ttl": "1s"},
            interactive={"priority": 100},
            batch={"priority": 10, "max_concurrent": 1},
        )
        make_gate(applied).close()  # the operator applies it
        worker = make_gate(None)  # follows the pool's policy
        assert worker.effective_policy.version == applied.version
        read_redis(server, lambda client: client.delete(PoolKeys(pool_name).state))
        with capture_logs() as logs:
            worker.beat_now()
        assert state(server, pool_name).get("pversion") == applied.version
        assert [e["log_level"] for e in logs if e["event"] == "pool_policy_restored"] == ["warning"]
        # A TTL for the holders' leases to come back (this worker has none).
        assert worker.try_admit("batch", vram=1).reason == "recovering"
        time.sleep(1.1)
        assert worker.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        assert worker.try_admit("batch", vram=1).reason == "cap"

    def test_a_lease_admitted_while_its_gate_closes_is_given_back(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        gate = make_gate(policy())
        script = gate._scripts.admit_job

        def close_in_flight(keys: list[Any], args: list[Any]) -> Any:
            reply = script(keys=keys, args=args)
            gate.close()  # another thread closes the gate while the reply travels
            return reply

        gate._scripts.admit_job = close_in_flight  # type: ignore[assignment]
        # The caller hears that the gate is closed, not of a lease it cannot use
        # (admit() returned a ticket whose lease was already gone).
        with pytest.raises(UsageError, match="closed"):
            gate.try_admit("batch", vram="1GiB")
        assert read_redis(server, lambda client: client.zcard(PoolKeys(pool_name).exp)) == 0

    def test_close_deletes_the_waiter_entries_of_its_try_admit_pollers(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # A closed gate polls no more: its entries must not hold lower classes
        # back for a waiter TTL.
        pol = policy({"waiter_ttl": "1h"}, batch={"priority": 10, "max_concurrent": 0})
        gate = make_gate(pol)
        other = make_gate(pol)
        assert gate.try_admit("batch", vram="1GiB").reason == "cap"
        assert other.try_admit("batch", vram="2GiB").reason == "cap"
        assert len(waiter_ids(server, pool_name)) == 2
        gate.close()
        assert [w.split("|")[0] for w in waiter_ids(server, pool_name)] == [other.owner]

    def test_a_closed_gate_refuses_every_use(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy())
        gate.close()
        for use in (
            lambda: gate.try_admit("batch", vram=1),
            lambda: gate.pause("batch", duration="1m"),
            gate.overrides,
            gate.sync_policy,
            gate.read_pool_policy,
            gate.leases_held,
        ):
            with pytest.raises(UsageError, match="closed"):
                use()


class TestNoGpu:
    """A class's no-GPU behaviour: defer, reject or run on the CPU."""

    @pytest.mark.parametrize(
        ("mode", "outcome", "reason"),
        [
            ("defer", Outcome.DEFER, "no_gpu"),
            ("reject", Outcome.REJECT, "no_gpu"),
            ("cpu", Outcome.ADMIT, "cpu"),
        ],
    )
    def test_behaviour_without_gpus(
        self, make_gate: Callable[..., Gate], mode: str, outcome: Outcome, reason: str
    ) -> None:
        gate = make_gate(policy(batch={"priority": 10, "no_gpu": mode}), NoGpuSampler())
        d = gate.try_admit("batch", vram="1GiB")
        assert (d.outcome, d.reason) == (outcome, reason)
        if outcome is Outcome.ADMIT:
            assert d.device is None
            assert d.lease is None
            assert d.env == {"CUDA_VISIBLE_DEVICES": ""}


class _OneDeviceStale:
    """A simulated host whose device ``stale`` was last read ``age_s`` ago."""

    backend = "simulated"

    def __init__(self, inner: SimulatedSampler, stale: int, age_s: float) -> None:
        self.inner, self.stale, self.age_s = inner, stale, age_s

    def sample(self) -> Any:
        from dataclasses import replace

        snap = self.inner.sample()
        old = time.monotonic() - self.age_s
        devices = tuple(
            replace(d, taken_mono=old) if i == self.stale else d for i, d in enumerate(snap.devices)
        )
        return replace(snap, devices=devices)


class TestPresence:
    """Devices without a fresh sample, and requests that insist on one device."""

    def test_a_request_only_a_stale_device_could_hold_defers_instead_of_rejecting(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Capacity does not go stale: the 80 GiB device could hold 40 GiB once it is read again.
        sampler = _OneDeviceStale(SimulatedSampler(["80GiB", "16GiB"]), stale=0, age_s=5)
        gate = make_gate(policy(), sampler)
        d = gate.try_admit("batch", vram="40GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, Reason.STALE_SAMPLE)
        with pytest.raises(AdmissionTimeout):
            gate.admit("batch", vram="40GiB", timeout=0.3)
        assert gate.try_admit("batch", vram="8GiB").device_uuid == sampler.inner.uuid(1)
        assert gate.try_admit("batch", vram="100GiB").reason == Reason.TOO_LARGE

    @pytest.mark.parametrize("no_gpu", ["defer", "reject", "cpu"])
    def test_a_pinned_device_without_a_fresh_sample_defers_whatever_no_gpu_says(
        self, make_gate: Callable[..., Gate], no_gpu: str
    ) -> None:
        sampler = _OneDeviceStale(SimulatedSampler(["80GiB", "80GiB"]), stale=0, age_s=5)
        gate = make_gate(policy(batch={"priority": 10, "no_gpu": no_gpu}), sampler)
        d = gate.try_admit("batch", vram="1GiB", device=sampler.inner.uuid(0))
        assert (d.outcome, d.reason) == (Outcome.DEFER, Reason.STALE_SAMPLE)
        d = gate.try_admit("batch", vram="1GiB", device=sampler.inner.uuid(1))
        assert d.device_uuid == sampler.inner.uuid(1)

    def test_a_request_insisting_on_a_lost_gpu_defers_gpu_lost(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        sampler = SimulatedSampler(["80GiB", "80GiB"])
        gate = make_gate(policy(), sampler)
        sampler.lose(0)
        d = gate.try_admit("batch", vram="1GiB", device=sampler.uuid(0))
        assert (d.outcome, d.reason, d.local) == (Outcome.DEFER, Reason.GPU_LOST, True)
        assert gate.try_admit("batch", vram="1GiB").device_uuid == sampler.uuid(1)

    @pytest.mark.parametrize("no_gpu", ["defer", "reject", "cpu"])
    def test_a_request_only_a_lost_gpu_could_hold_waits_for_it(
        self, make_gate: Callable[..., Gate], no_gpu: str
    ) -> None:
        # Quarantine is temporary: neither "too large" nor "no GPU" is the answer.
        sampler = SimulatedSampler(["80GiB", "16GiB"])
        gate = make_gate(
            policy({"safety_margin": "1GiB"}, batch={"priority": 10, "no_gpu": no_gpu}), sampler
        )
        sampler.lose(0)
        d = gate.try_admit("batch", vram="40GiB")
        assert (d.outcome, d.reason, d.local) == (Outcome.DEFER, Reason.GPU_LOST, True)
        assert gate.try_admit("batch", vram="8GiB").device_uuid == sampler.uuid(1)
        assert gate.try_admit("batch", vram="80GiB").reason == Reason.TOO_LARGE  # margin: 79
        sampler.lose(1)
        d = gate.try_admit("batch", vram="1GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, Reason.GPU_LOST)
        sampler.restore(0)
        sampler.restore(1)
        assert gate.try_admit("batch", vram="40GiB").device_uuid == sampler.uuid(0)

    def test_a_device_this_host_does_not_have_is_a_usage_error(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        sampler = SimulatedSampler(["80GiB", "80GiB"])
        gate = make_gate(policy(batch={"priority": 10, "no_gpu": "cpu"}), sampler)
        known = f"its GPUs: {sampler.uuid(0)}, {sampler.uuid(1)}"
        with pytest.raises(UsageError, match=f"not a GPU of this host; {known}"):
            gate.try_admit("batch", vram="1GiB", device="GPU-nope")
        with pytest.raises(UsageError, match="not a GPU of this host"):
            gate.admit("batch", vram="1GiB", device="GPU-nope", timeout=5)
        with pytest.raises(UsageError, match="takes a GPU uuid"):
            gate.try_admit("batch", vram="1GiB", device=0)  # type: ignore[arg-type]
        # With no GPU visible at all, the class's no_gpu answers as for any request.
        blind = make_gate(policy(batch={"priority": 10, "no_gpu": "cpu"}), NoGpuSampler())
        d = blind.try_admit("batch", vram="1GiB", device="GPU-nope")
        assert (d.outcome, d.reason) == (Outcome.ADMIT, Reason.CPU)


def waiter_ids(server: RedisProcess, pool: str) -> list[str]:
    return read_redis(server, lambda client: client.hkeys(PoolKeys(pool).waiters))


class _SlowSampler:
    """A simulated host whose every reading takes ``delay_s`` (a decision in flight)."""

    backend = "simulated"

    def __init__(self, inner: SimulatedSampler, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def sample(self) -> Any:
        time.sleep(self.delay_s)
        return self.inner.sample()


class _ManualSampler:
    """A simulated host read only when the test says so (as a slow background sampler)."""

    backend = "simulated"

    def __init__(self, inner: SimulatedSampler) -> None:
        self.inner = inner
        self.snap = inner.sample()

    def refresh(self) -> None:
        self.snap = self.inner.sample()

    def sample(self) -> Any:
        return self.snap


class TestBlockingAdmit:
    """admit() waits as a waiter, woken by releases; it times out clearly."""

    def test_a_release_that_wakes_a_waiter_frees_its_memory_at_the_next_sample(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # The release wakes the waiter at once, but its memory counts (a ghost) until a
        # sample taken after it: the waiter decides again at that sample, not after its
        # timer (>= 5 s here: min(a third of the TTL, jittered, and half the waiter TTL)).
        pol = policy(
            {"lease_ttl": "30s", "waiter_ttl": "10s", "retry_max": "30s", "sample_max_age": "1m"}
        )
        sampler = _ManualSampler(SimulatedSampler(["80GiB"]))
        holder = make_gate(pol, sampler)
        held = holder.try_admit("batch", vram="70GiB")
        assert held.lease is not None

        def release_then_sample() -> None:
            time.sleep(0.3)
            held.lease.release()
            time.sleep(0.3)
            sampler.refresh()

        t = threading.Thread(target=release_then_sample)
        started = time.monotonic()
        t.start()
        with make_gate(pol, sampler).admit("batch", vram="20GiB", timeout=20):
            waited = time.monotonic() - started
        t.join()
        assert 0.5 < waited < 3.0, waited

    def test_a_release_wakes_a_blocked_waiter(self, make_gate: Callable[..., Gate]) -> None:
        # Timers are far away (TTL 60 s, waiter TTL 60 s): only the wake-up can be this quick.
        pol = policy(
            {"lease_ttl": "60s", "waiter_ttl": "60s", "retry_max": "60s"},
            batch={"priority": 10, "max_concurrent": 1},
        )
        gate = make_gate(pol)
        first = gate.admit("batch", vram="1GiB", timeout=5)
        got: list[float] = []

        def waiter() -> None:
            with make_gate(pol).admit("batch", vram="1GiB", timeout=30):
                got.append(time.monotonic())

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        released_at = time.monotonic()
        first.release()
        t.join(30)
        assert got
        assert got[0] - released_at < 10  # the timer alone would need >= 10 s

    def test_a_cancelled_admit_async_stops_holding_lower_classes_back_at_once(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        pol = policy({"waiter_ttl": "60s"}, interactive={"priority": 100}, batch={"priority": 10})
        gate = make_gate(pol, SimulatedSampler(["80GiB"]))
        hold = gate.try_admit("batch", vram="70GiB")
        assert hold.lease is not None

        async def cancel_a_waiting_admission() -> None:
            task = asyncio.ensure_future(gate.admit_async("interactive", vram="20GiB"))
            await asyncio.sleep(0.5)
            assert waiter_ids(server, pool_name)  # it waits as a registered waiter
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_a_waiting_admission())
        assert waiter_ids(server, pool_name) == []
        hold.lease.release()
        time.sleep(0.05)  # the next sample is taken after the release: its ghost ends
        assert gate.try_admit("batch", vram="20GiB").outcome is Outcome.ADMIT

    def test_a_cancelled_admit_async_gives_back_what_its_decision_in_flight_admitted(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # One token a minute: the cancelled admission's token must come back.
        pol = policy(batch={"priority": 10, "max_concurrent": 1, "rate": "1/min", "burst": 1})
        slow = _SlowSampler(SimulatedSampler(["80GiB"]), delay_s=0.6)
        gate = make_gate(pol, slow)

        async def cancel_mid_decision() -> None:
            task = asyncio.ensure_future(gate.admit_async("batch", vram="1GiB"))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(1.0)  # the decision finishes in its thread meanwhile

        asyncio.run(cancel_mid_decision())
        assert state(server, pool_name).get("out:batch:dropped") == "1"
        slow.delay_s = 0
        assert gate.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT

    @pytest.mark.parametrize("in_flight", [True, False], ids=["decision-in-flight", "decided"])
    def test_a_cancelled_admit_async_gives_back_at_once_what_it_admitted_after_its_loop_closed(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str, in_flight: bool
    ) -> None:
        # An event loop per call (asyncio.run per request in a sync app): the
        # loop is closed by the time the decision's end could be handled on
        # it, so a done-callback there never ran, and the lease went back as
        # a dropped one at the next heartbeat (a third of the TTL: 20 s here).
        pol = policy({"lease_ttl": "60s"}, batch={"priority": 10, "max_concurrent": 1})
        slow = _SlowSampler(SimulatedSampler(["80GiB"]), delay_s=0.6)
        gate = make_gate(pol, slow)

        async def decision_done_before_the_task_hears_of_it() -> None:
            task = asyncio.ensure_future(gate.admit_async("batch", vram="1GiB"))
            await asyncio.sleep(0.1)  # its decision runs in its thread
            time.sleep(1.0)  # the loop busy meanwhile: the decision is done, its task not told
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        if in_flight:  # the decision is still in flight when wait_for cancels it
            with pytest.raises(TimeoutError):
                asyncio.run(asyncio.wait_for(gate.admit_async("batch", vram="1GiB"), 0.2))
        else:
            asyncio.run(decision_done_before_the_task_hears_of_it())
        exp = PoolKeys(pool_name).exp
        deadline = time.monotonic() + 5
        while read_redis(server, lambda c: c.zcard(exp)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_redis(server, lambda c: c.zcard(exp)) == 0
        assert state(server, pool_name).get("out:batch:dropped") == "1"
        slow.delay_s = 0
        assert gate.try_admit("batch", vram="1GiB").admitted

    def test_a_cancelled_admit_async_leaves_no_waiter_its_decision_in_flight_wrote(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # Cancelled while a decision that defers is in flight: that decision
        # writes the waiter entry after the cancellation deleted it.
        pol = policy({"waiter_ttl": "60s"}, batch={"priority": 10, "max_concurrent": 0})
        slow = _SlowSampler(SimulatedSampler(["80GiB"]), delay_s=0)
        gate = make_gate(pol, slow)

        async def cancel_mid_decision() -> None:
            task = asyncio.ensure_future(gate.admit_async("batch", vram="1GiB"))
            await asyncio.sleep(0.3)  # deferred once: it waits (its timer, a wake-up)
            slow.delay_s = 0.6
            gate._wake_listener()._bump()  # wake it: a decision starts, slow
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(1.5)  # the decision finishes in its thread meanwhile

        asyncio.run(cancel_mid_decision())
        assert waiter_ids(server, pool_name) == []

    def test_cancelling_admit_async_does_not_block_the_loop_while_redis_hangs(
        self, server: RedisProcess, pool_name: str
    ) -> None:
        private = RedisProcess(server.executable).start()
        pol = policy(batch={"priority": 10, "max_concurrent": 0})
        gate = Gate(
            private.url,
            pool=pool_name,
            policy=pol,
            sampler=SimulatedSampler(["80GiB"]),
            socket_timeout_s=3.0,
            register=False,
        )

        async def cancel_waiting_admissions() -> float:
            tasks = [asyncio.ensure_future(gate.admit_async("batch", vram=1)) for _ in range(4)]
            await asyncio.sleep(0.5)  # each deferred (cap) and sleeps till its retry
            with frozen(private):
                started = time.monotonic()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                took = time.monotonic() - started
                await asyncio.sleep(0)
            return took

        try:
            took = asyncio.run(cancel_waiting_admissions())
            # Each HDEL inline would hold the loop a socket timeout (3 s): 12 s.
            assert took < 3.0, took
        finally:
            gate.close()
            private.stop()

    def test_closing_with_decisions_in_flight_leaves_nothing_behind(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # Decisions still reading the devices when close() starts: those that
        # admit give their lease back, those that defer leave no waiter entry.
        pol = policy({"waiter_ttl": "60s", "lease_ttl": "60s"})
        other = make_gate(pol)
        taken = other.try_admit("batch", vram="60GiB", device=other.sampler.uuid(0))
        assert taken.admitted
        slow = _SlowSampler(SimulatedSampler(["80GiB"]), delay_s=0)
        gate = make_gate(pol, slow)
        mine = [gate.try_admit("batch", vram="1GiB") for _ in range(4)]
        assert all(d.admitted for d in mine)
        slow.delay_s = 0.3
        errors: list[BaseException] = []

        def ask(vram: str) -> None:
            try:
                gate.admit("interactive", vram=vram, timeout=5)
            except UsageError:
                pass  # the gate closed
            except BaseException as exc:
                errors.append(exc)

        sizes = ("1GiB", "1GiB", "30GiB", "30GiB")
        threads = [threading.Thread(target=ask, args=(v,)) for v in sizes]
        for t in threads:
            t.start()
        time.sleep(0.1)  # every decision is reading the devices
        gate.close()
        for t in threads:
            t.join(5)
        assert errors == []
        assert all(lease.released for d in mine if (lease := d.lease) is not None)
        live = read_redis(server, lambda client: client.zrange(PoolKeys(pool_name).exp, 0, -1))
        assert live == [f"{taken.device_uuid}\t{taken.lease.id}"]  # type: ignore[union-attr]
        assert waiter_ids(server, pool_name) == []

    def test_closing_the_gate_ends_a_blocked_admit_and_its_waiter_entry(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        pol = policy({"waiter_ttl": "60s", "retry_max": "60s", "lease_ttl": "60s"})
        gate = make_gate(pol, SimulatedSampler(["80GiB"]))
        hold = make_gate(pol, SimulatedSampler(["80GiB"])).try_admit("batch", vram="80GiB")
        assert hold.admitted
        failed: list[BaseException] = []

        def blocked() -> None:
            try:
                gate.admit("batch", vram="1GiB", timeout=30)
            except BaseException as exc:
                failed.append(exc)

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.5)
        assert waiter_ids(server, pool_name)
        closed_at = time.monotonic()
        gate.close()
        assert waiter_ids(server, pool_name) == []
        t.join(40)
        assert len(failed) == 1
        assert isinstance(failed[0], UsageError)
        # Woken by the close, not by its timer (20 s here: a third of the TTL, jittered).
        assert time.monotonic() - closed_at < 5

    def test_timeout_raises_with_the_last_reason(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy(), SimulatedSampler(["80GiB"]))
        hold = gate.admit("batch", vram="80GiB", timeout=1)
        with pytest.raises(AdmissionTimeout) as info:
            gate.admit("batch", vram="1GiB", timeout=0.3)
        assert info.value.decision is not None
        assert info.value.decision.reason == "vram"
        hold.release()

    def test_rejection_raises_at_once(self, make_gate: Callable[..., Gate]) -> None:
        gate = make_gate(policy())
        with pytest.raises(AdmissionRejected, match="too_large"):
            gate.admit("batch", vram="100GiB", timeout=30)

    def test_a_cuda_oom_escaping_the_block_is_recorded_as_oom(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        class OutOfMemoryError(RuntimeError):
            pass

        gate = make_gate(policy())

        def run_out_of_memory_inside_the_block() -> None:
            with gate.admit("batch", vram="1GiB", timeout=5) as ticket:
                assert ticket.device is not None
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        with pytest.raises(OutOfMemoryError, match=r"^CUDA out of memory\. Tried to allocate"):
            run_out_of_memory_inside_the_block()
        with (
            pytest.raises(RuntimeError, match=r"^CUDA error: out of memory$"),
            gate.admit("batch", vram="1GiB", timeout=5),
        ):
            raise RuntimeError("CUDA error: out of memory")
        with pytest.raises(ValueError, match=r"^bug$"), gate.admit("batch", vram="1GiB", timeout=5):
            raise ValueError("bug")
        with gate.admit("batch", vram="1GiB", timeout=5):
            pass
        counters = state(server, pool_name)
        assert counters["out:batch:oom"] == "2"
        assert counters["out:batch:error"] == "1"
        assert counters["out:batch:ok"] == "1"

    def test_admit_async_waits_without_a_thread_and_releases_on_exit(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        pol = policy(batch={"priority": 10, "max_concurrent": 1})
        gate = make_gate(pol)

        async def main() -> list[str]:
            order: list[str] = []

            async def job(name: str) -> None:
                async with gate.admit_async("batch", vram="1GiB", timeout=20) as ticket:
                    assert ticket.lease is not None
                    order.append(name)
                    await asyncio.sleep(0.05)

            await asyncio.gather(job("a"), job("b"), job("c"))
            return order

        assert sorted(asyncio.run(main())) == ["a", "b", "c"]


class TestCudaOomRecognition:
    """An escaping exception is a CUDA OOM by its type's name or an exact CUDA marker, no looser."""

    @pytest.mark.parametrize(
        "exc",
        [
            RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            RuntimeError(
                "CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                "reported at some other API call, so the stacktrace below might be incorrect."
            ),
            RuntimeError("cudaErrorMemoryAllocation: out of memory"),
            RuntimeError("CUDA_ERROR_OUT_OF_MEMORY: out of memory"),
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"),
            RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
            RuntimeError("cusolver error: CUSOLVER_STATUS_ALLOC_FAILED"),
            RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184"),
        ],
        ids=["torch", "runtime", "cupy", "driver", "cublas", "cudnn", "cusolver", "xla"],
    )
    def test_cuda_allocation_failures_are_oom(self, exc: BaseException) -> None:
        assert is_cuda_oom(exc)

    @pytest.mark.parametrize(
        "exc",
        [
            MemoryError(),
            OSError(12, "Cannot allocate memory"),
            RuntimeError("out of memory"),
            RuntimeError(
                "unable to mmap 1048576 bytes from file </torch_1_2>: Cannot allocate memory"
            ),
            RuntimeError("CUDA error: an illegal memory access was encountered"),
            RuntimeError("CUDA error: device-side assert triggered"),
            RuntimeError("cuDNN error: CUDNN_STATUS_NOT_INITIALIZED"),
            RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"),
        ],
        ids=[
            "host",
            "errno",
            "bare",
            "shm",
            "illegal-access",
            "assert",
            "cudnn-init",
            "cublas-exec",
        ],
    )
    def test_other_errors_are_not_oom(self, exc: BaseException) -> None:
        assert not is_cuda_oom(exc)


class TestMetrics:
    """A gate counts its decisions, lost leases and job outcomes."""

    def test_decisions_lost_leases_and_outcomes_are_counted(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        from prometheus_client import CollectorRegistry

        from gpugate.metrics import Metrics

        registry = CollectorRegistry()
        clock = FakeClock()
        gate = make_gate(
            policy({"lease_ttl": "5s"}, batch={"priority": 10, "max_concurrent": 1}),
            metrics=Metrics(registry),
            _clock_ms=clock,
        )
        d = gate.try_admit("batch", vram=1)
        gate.try_admit("batch", vram=1)
        clock.advance(6)
        gate.beat_now()
        assert d.lease is not None
        assert d.lease.lost
        with gate.admit("batch", vram=1, timeout=5):
            pass

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"pool": gate.pool, **labels})

        admitted_ok = {"class": "batch", "outcome": "admit", "reason": "ok"}
        deferred_cap = {"class": "batch", "outcome": "defer", "reason": "cap"}
        assert value("gpugate_decisions_total", **admitted_ok) == 2
        assert value("gpugate_decisions_total", **deferred_cap) == 1
        assert value("gpugate_leases_lost_total", **{"class": "batch"}) == 1
        assert value("gpugate_job_outcomes_total", **{"class": "batch", "outcome": "ok"}) == 1
        assert value("gpugate_decision_duration_seconds_count", **{"class": "batch"}) == 3


class TestWaiterOrder:
    """The highest waiter on a device decides, whatever order Redis lists them in."""

    def test_a_lower_waiter_on_the_same_device_does_not_hide_a_higher_one(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        pol = policy(
            {"waiter_ttl": "1h"},
            interactive={"priority": 100},
            notebook={"priority": 50},
            batch={"priority": 10},
        )
        gate = make_gate(pol, SimulatedSampler(["80GiB"]))
        # Held for the whole test: a dropped lease goes at the gate's next beat.
        held = gate.try_admit("batch", vram="60GiB")
        assert held.outcome is Outcome.ADMIT
        # Many low waiters and one high waiter on the only device, in any order.
        for i in range(20):
            assert gate.try_admit("batch", vram=f"{30 + i}GiB").reason == "vram"
        assert gate.try_admit("interactive", vram="30GiB").reason == "vram"
        for i in range(20):
            assert gate.try_admit("batch", vram=f"{50 + i}GiB").reason == "vram"
        # A notebook outranks every batch waiter but not the interactive one.
        assert gate.try_admit("notebook", vram="10GiB").reason == "priority"


class TestRedisUnreachable:
    """With Redis gone, "closed" classes defer and "open" ones admit within local caps."""

    def test_closed_defers_and_open_admits_up_to_its_cap(self, pool_name: str) -> None:
        pol = policy(
            interactive={"priority": 100, "on_backend_error": "open", "max_concurrent": 2},
            batch={"priority": 10},
        )
        server = RedisProcess().start()
        gate = Gate(
            server.url,
            pool=pool_name,
            policy=pol,
            sampler=SimulatedSampler(["80GiB"]),
            socket_timeout_s=0.5,
        )
        try:
            assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
            server.stop()
            d = gate.try_admit("batch", vram=1)
            assert (d.outcome, d.reason) == (Outcome.DEFER, "backend_unavailable")
            assert d.retry_after > 0
            first = gate.admit("interactive", vram="1GiB", timeout=5)
            second = gate.try_admit("interactive", vram="1GiB")
            assert (first.decision.reason, second.reason) == ("backend_open", "backend_open")
            assert gate.try_admit("interactive", vram="1GiB").reason == "backend_unavailable"
            first.release()
            third = gate.try_admit("interactive", vram="1GiB")
            assert third.reason == "backend_open"
            assert third.lease is not None
            assert third.lease.local
            del second, third  # a dropped local lease frees its local slot too
            gc.collect()
            assert gate.try_admit("interactive", vram="1GiB").reason == "backend_open"
            # Even collected in a thread that holds the gate's lock right then.
            fourth = gate.try_admit("interactive", vram="1GiB").lease
            assert fourth is not None
            fourth.on_lost(lambda _lost, lease=fourth: None)  # a reference cycle
            del fourth
            gc.disable()
            try:
                done = threading.Event()

                def collect_while_busy() -> None:
                    with gate._lock:
                        gc.collect()
                    done.set()

                threading.Thread(target=collect_while_busy, daemon=True).start()
                assert done.wait(10), "garbage collection waited for the lock its thread held"
            finally:
                gc.enable()
            assert gate.try_admit("interactive", vram="1GiB").reason == "backend_open"
        finally:
            server.stop()
            gate.close()


class TestOpenMode:
    """on_backend_error = "open" admits within what this process alone can know:
    its own local leases' estimates and counts, the safety margin, the
    reserves of the classes above, and the class and pool caps."""

    @pytest.fixture
    def down_gate(self, pool_name: str) -> Iterator[Callable[..., Gate]]:
        """Gates on a Redis that is not there (every decision goes the open-mode way)."""
        gates: list[Gate] = []

        def make(pol: Policy, totals: list[str]) -> Gate:
            gate = Gate(
                f"redis://127.0.0.1:{free_port()}/0?cluster=0",
                pool=pool_name,
                policy=pol,
                sampler=SimulatedSampler(totals),
                register=False,
                socket_timeout_s=0.5,
            )
            gates.append(gate)
            return gate

        yield make
        for gate in gates:
            gate.close()

    def test_local_leases_the_margin_and_the_reserves_above_bound_the_room(
        self, down_gate: Callable[..., Gate]
    ) -> None:
        # Given 80 GiB, a 10 GiB margin and 20 GiB reserved for interactive:
        # 50 GiB for batch, whatever this process already holds there.
        gate = down_gate(
            policy(
                {"safety_margin": "10GiB"},
                interactive={"priority": 100, "reserve": "20GiB", "on_backend_error": "open"},
                batch={"priority": 10, "max_concurrent": 3, "on_backend_error": "open"},
            ),
            ["80GiB"],
        )
        assert gate.try_admit("batch", vram="60GiB").reason == "backend_unavailable"
        first = gate.try_admit("batch", vram="30GiB")
        assert (first.reason, first.available) == ("backend_open", 50 * GiB)
        assert gate.try_admit("batch", vram="30GiB").reason == "backend_unavailable"
        second = gate.try_admit("batch", vram="20GiB")
        assert second.reason == "backend_open"
        # The class's own reserve holds nothing back from it: 70 GiB less 50 held.
        kept = gate.try_admit("interactive", vram="20GiB")  # held: dropping it frees it
        assert kept.reason == "backend_open"
        assert gate.try_admit("interactive", vram="1GiB").reason == "backend_unavailable"
        assert gate.try_admit("batch", vram="10GiB").reason == "backend_unavailable"
        # A released local lease gives its room back: 50 GiB less the 40 still held.
        assert first.lease is not None
        assert first.lease.release()
        again = gate.try_admit("batch", vram="10GiB")
        assert (again.reason, again.available) == ("backend_open", 10 * GiB)

    def test_the_leases_this_process_holds_from_redis_count_too(
        self, server: RedisProcess, pool_name: str
    ) -> None:
        # Jobs admitted by Redis before the outage still run: open mode may not
        # add a third to a class of 2, nor 60 GiB to a GPU where one holds 30.
        private = RedisProcess(server.executable).start()
        gate = Gate(
            private.url,
            pool=pool_name,
            policy=policy(batch={"priority": 10, "max_concurrent": 2, "on_backend_error": "open"}),
            sampler=SimulatedSampler(["80GiB"]),
            register=False,
            socket_timeout_s=0.5,
        )
        try:
            held = [gate.try_admit("batch", vram="30GiB") for _ in range(2)]
            assert [d.reason for d in held] == ["ok", "ok"]
            private.stop()
            d = gate.try_admit("batch", vram="1GiB")
            assert d.reason == "backend_unavailable"
            assert "max_concurrent = 2" in d.detail
            assert held[0].lease is not None
            assert held[0].lease.release() is False  # Redis is away: queued
            d = gate.try_admit("batch", vram="60GiB")
            assert d.reason == "backend_unavailable"
            assert gate.try_admit("batch", vram="20GiB").reason == "backend_open"
        finally:
            gate.close()
            private.stop()

    def test_the_class_and_pool_caps_per_device_spread_local_leases(
        self, down_gate: Callable[..., Gate]
    ) -> None:
        gate = down_gate(
            policy(
                {"max_per_device": 2},
                a={"priority": 10, "max_per_device": 1, "on_backend_error": "open"},
                b={"priority": 10, "on_backend_error": "open"},
            ),
            ["80GiB", "80GiB"],
        )
        a1, a2 = gate.try_admit("a", vram="1GiB"), gate.try_admit("a", vram="1GiB")
        assert (a1.reason, a2.reason) == ("backend_open", "backend_open")
        assert {a1.device_uuid, a2.device_uuid} == {d.uuid for d in gate.sampler.sample().devices}
        assert gate.try_admit("a", vram="1GiB").reason == "backend_unavailable"
        b1, b2 = gate.try_admit("b", vram="1GiB"), gate.try_admit("b", vram="1GiB")
        assert {b1.device_uuid, b2.device_uuid} == {a1.device_uuid, a2.device_uuid}
        assert gate.try_admit("b", vram="1GiB").reason == "backend_unavailable"

    def test_a_request_pinned_to_a_device_is_admitted_there_or_not_at_all(
        self, down_gate: Callable[..., Gate]
    ) -> None:
        gate = down_gate(
            policy(batch={"priority": 10, "on_backend_error": "open"}), ["80GiB", "40GiB"]
        )
        small = gate.sampler.sample().devices[1].uuid
        d = gate.try_admit("batch", vram="30GiB", device=small)
        assert (d.reason, d.device_uuid) == ("backend_open", small)
        assert gate.try_admit("batch", vram="30GiB", device=small).reason == "backend_unavailable"


class TestRedisRefuses:
    """An error reply from Redis reaches callers as a BackendError, never redis-py's own."""

    def test_a_pool_key_of_another_type_is_a_backend_error(
        self, redis_url: str, redis_client: redis.Redis, pool_name: str
    ) -> None:
        gate = Gate(
            redis_url,
            pool=pool_name,
            policy=policy(),
            sampler=SimulatedSampler(["80GiB"]),
            register=False,
        )
        try:
            # Someone overwrote the pool's state hash (a script, a hand edit).
            redis_client.set(PoolKeys(pool_name).state, "not a hash")
            for call in (
                gate.overrides,
                gate.read_pool_policy,
                lambda: gate.pause("batch", duration="1m"),
                lambda: gate.sync_policy(force=True),
            ):
                with pytest.raises(BackendError, match="WRONGTYPE"):
                    call()
        finally:
            redis_client.delete(PoolKeys(pool_name).state)
            gate.close()


def _gate_with_metrics(
    make_gate: Callable[..., Gate], registry: Any, **classes: dict[str, Any]
) -> Gate:
    from gpugate.metrics import Metrics

    return make_gate(
        policy({"lease_ttl": "30s", "waiter_ttl": "60s"}, **classes),
        SimulatedSampler(["80GiB"]),
        metrics=Metrics(registry),
    )


def _decisions(registry: Any) -> float:
    return sum(
        s.value
        for family in registry.collect()
        if family.name == "gpugate_decisions"
        for s in family.samples
        if s.name.endswith("_total")
    )


class TestManyWaiters:
    """Releases do not send every blocked admission of a gate to Redis (the
    herd's rules: test_herd.py)."""

    WAITERS = 30

    def test_blocked_threads_cost_a_few_decisions_each_not_one_per_release(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        gate = _gate_with_metrics(make_gate, registry, batch={"priority": 10, "max_concurrent": 1})
        admitted = []

        def job() -> None:
            with gate.admit("batch", vram="1GiB", timeout=60) as ticket:
                admitted.append(ticket.device)
                time.sleep(0.02)

        threads = [threading.Thread(target=job) for _ in range(self.WAITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert len(admitted) == self.WAITERS
        # Every one of them asked on each release before: about WAITERS / 2
        # decisions per admission (15 here; 400 waiters: 60).
        assert _decisions(registry) <= 5 * self.WAITERS

    def test_blocked_tasks_cost_a_few_decisions_each_not_one_per_release(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        gate = _gate_with_metrics(make_gate, registry, batch={"priority": 10, "max_concurrent": 1})

        async def job() -> None:
            async with gate.admit_async("batch", vram="1GiB", timeout=60):
                await asyncio.sleep(0.02)

        async def main() -> None:
            await asyncio.gather(*(job() for _ in range(self.WAITERS)))

        asyncio.run(main())
        assert _decisions(registry) <= 5 * self.WAITERS

    @pytest.mark.parametrize("mode", ["threads", "asyncio"])
    def test_a_smaller_younger_request_is_not_held_behind_a_larger_older_one(
        self, make_gate: Callable[..., Gate], mode: str
    ) -> None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        gate = _gate_with_metrics(make_gate, registry, batch={"priority": 10})
        big = gate.try_admit("batch", vram="50GiB")
        mid = gate.try_admit("batch", vram="25GiB")
        assert big.lease is not None
        assert mid.lease is not None
        results: dict[str, float] = {}

        def blocked(name: str, vram: str) -> None:
            if mode == "threads":
                with gate.admit("batch", vram=vram, timeout=20):
                    results[name] = time.monotonic()
            else:

                async def one() -> None:
                    async with gate.admit_async("batch", vram=vram, timeout=20):
                        results[name] = time.monotonic()

                asyncio.run(one())

        large = threading.Thread(target=blocked, args=("large", "40GiB"))
        large.start()
        time.sleep(0.3)  # the larger request is the older one
        small = threading.Thread(target=blocked, args=("small", "10GiB"))
        small.start()
        time.sleep(0.3)
        assert results == {}  # 5 GiB free: both wait
        released = time.monotonic()
        mid.lease.release()  # 30 GiB free: the small one fits, the large one not
        small.join(20)
        # Woken by the release, not by its timer (20 s: a TTL of 30 s, a
        # waiter TTL of 60 s), though the larger, older request deferred.
        assert results["small"] - released < 5
        assert "large" not in results
        big.lease.release()
        large.join(20)
        assert "large" in results
        gate.try_admit("batch", vram=0)  # the gate still answers
        assert gate.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT


# Timers far away (a retry estimate of 20 s, jittered to at least 10 s): a
# blocked admission goes to Redis again only when a wake-up sends it.
_FAR_TIMERS = {"lease_ttl": "60s", "waiter_ttl": "60s", "retry_max": "60s"}


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def _asleep(gate: Gate) -> int:
    """How many blocked admissions of ``gate`` have their answer and sleep on it
    (-1 while one is deciding or sent)."""
    herd = gate._herd
    with herd._lock:
        members = [m for ms in herd._shapes.values() for m in ms]
        if any(m.busy or m.settled != herd.generation for m in members):
            return -1
        return len(members)


def _blocked(gate: Gate, *tenants: str | None, vram: str = "20GiB") -> list[threading.Thread]:
    """One blocked ``batch`` admission per tenant, oldest first, each asleep
    before the next starts; they end when the gate closes."""

    def admit(tenant: str | None) -> None:
        with (
            contextlib.suppress(AdmissionTimeout, UsageError),
            gate.admit("batch", vram=vram, timeout=30, tenant=tenant),
        ):
            pass

    threads = []
    for n, tenant in enumerate(tenants, 1):
        threads.append(threading.Thread(target=admit, args=(tenant,), daemon=True))
        threads[-1].start()
        _until(lambda n=n: _asleep(gate) == n, "the request blocked and asleep")  # type: ignore[misc]
    return threads


def _watched(make_gate: Callable[..., Gate], pol: Policy, host: str) -> tuple[Gate, Any]:
    """A gate of one simulated 80 GiB GPU on ``host``, and its metrics' registry."""
    from prometheus_client import CollectorRegistry

    from gpugate.metrics import Metrics

    registry = CollectorRegistry()
    gate = make_gate(pol, SimulatedSampler(["80GiB"], name=host), metrics=Metrics(registry))
    return gate, registry


def _decided_on(
    gate: Gate, registry: Any, server: RedisProcess, pool: str, publish: Callable[[], object]
) -> float:
    """The decisions ``gate``'s blocked admissions (all asleep) ask Redis for
    on the wake message that ``publish`` sends on the pool's wake channel."""
    channel = PoolKeys(pool).wake
    _until(
        lambda: read_redis(server, lambda r: r.pubsub_numsub(channel)[0][1]) >= 1,
        "the gate listening for wake-ups",
    )
    herd = gate._herd
    before, decided = herd.generation, _decisions(registry)
    publish()
    # Those it sends are marked in the same step: once it is taken, they are
    # deciding, then asleep again or admitted (gone), their decisions counted.
    _until(lambda: herd.generation > before, "the gate taking the wake-up")
    _until(lambda: _asleep(gate) >= 0, "the requests it sent answered")
    return _decisions(registry) - decided


class TestWakeUpsThatConcernAWaiter:
    """A lease end sends a gate's blocked admissions to Redis only when what it
    freed may change their answer (the herd's rules: test_herd.py)."""

    def test_a_woken_waiter_kept_off_a_device_by_a_ghost_asks_again_after_a_sample(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # The first decision after the release still counts its ghost on dev0
        # and finds dev1 held back by a pinned interactive waiter: "priority".
        # The freed room is usable at the next sample, not at its next timer
        # (1.25 s or more with the default waiter TTL).
        pol = policy(
            interactive={"priority": 100}, notebook={"priority": 50}, batch={"priority": 10}
        )
        sim = SimulatedSampler(["80GiB", "80GiB"])
        holder = make_gate(pol, sim)
        big = holder.try_admit("batch", vram="60GiB", device="SIM-sim-0")
        assert big.lease is not None
        assert holder.try_admit("batch", vram="50GiB", device="SIM-sim-1").lease is not None
        waiting = make_gate(pol, sim)

        def interactive() -> None:  # 35 GiB on dev1 (30 free): waits throughout
            with contextlib.suppress(AdmissionTimeout, UsageError):  # until the gate closes
                waiting.admit("interactive", vram="35GiB", device="SIM-sim-1", timeout=10)

        threading.Thread(target=interactive, daemon=True).start()
        time.sleep(0.3)
        gate = make_gate(pol, sim)
        admitted: list[float] = []

        def notebook() -> None:
            ticket = gate.admit("notebook", vram="25GiB", timeout=10)
            admitted.append(time.monotonic())
            ticket.release()

        t = threading.Thread(target=notebook)
        t.start()
        time.sleep(0.5)
        released = time.monotonic()
        big.lease.release()
        t.join(15)
        assert admitted
        assert admitted[0] - released < 1.0

    def test_a_lease_end_on_another_hosts_device_leaves_a_memory_waiter_asleep(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        pol = policy(_FAR_TIMERS, batch={"priority": 10})
        gate, registry = _watched(make_gate, pol, "a")
        other_host = make_gate(pol, SimulatedSampler(["80GiB"], name="b"))
        full = gate.try_admit("batch", vram="70GiB")
        assert full.lease is not None
        (thread,) = _blocked(gate, None)

        def release_on_the_other_host() -> None:
            d = other_host.try_admit("batch", vram="1GiB")
            assert d.lease is not None
            d.lease.release()

        assert _decided_on(gate, registry, server, pool_name, release_on_the_other_host) == 0
        # A lease end on its own host's device sends it, and admits it.
        assert _decided_on(gate, registry, server, pool_name, full.lease.release) >= 1
        thread.join(30)
        assert not thread.is_alive()

    def test_a_cap_waiter_wakes_on_a_release_of_its_class_on_any_host_only(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        pol = policy(
            _FAR_TIMERS, batch={"priority": 10, "max_concurrent": 1}, inter={"priority": 50}
        )
        gate, registry = _watched(make_gate, pol, "a")
        other_host = make_gate(pol, SimulatedSampler(["80GiB"], name="b"))
        at_cap = other_host.try_admit("batch", vram="1GiB")
        assert at_cap.lease is not None
        (thread,) = _blocked(gate, None, vram="1GiB")

        def release_another_class() -> None:
            d = other_host.try_admit("inter", vram="1GiB")
            assert d.lease is not None
            d.lease.release()

        assert _decided_on(gate, registry, server, pool_name, release_another_class) == 0
        assert _decided_on(gate, registry, server, pool_name, at_cap.lease.release) == 1
        thread.join(30)
        assert not thread.is_alive()

    def test_a_paused_request_sleeps_through_releases_until_the_pause_is_lifted(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        pol = policy(_FAR_TIMERS, batch={"priority": 10})
        gate, registry = _watched(make_gate, pol, "a")
        held = gate.try_admit("batch", vram="1GiB")
        assert held.lease is not None
        gate.pause("batch")
        (thread,) = _blocked(gate, None, vram="1GiB")
        assert _decided_on(gate, registry, server, pool_name, held.lease.release) == 0
        resume = lambda: gate.resume("batch")  # noqa: E731
        assert _decided_on(gate, registry, server, pool_name, resume) == 1
        thread.join(30)
        assert not thread.is_alive()

    def test_a_policy_stored_wakes_everyone(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        pol = policy(_FAR_TIMERS, batch={"priority": 10, "max_concurrent": 1})
        gate, registry = _watched(make_gate, pol, "a")
        held = gate.try_admit("batch", vram="1GiB")
        assert held.lease is not None
        (thread,) = _blocked(gate, None, vram="1GiB")
        raised = policy(_FAR_TIMERS, batch={"priority": 10, "max_concurrent": 2})

        def apply_raised_cap() -> None:
            make_gate(raised, register=False).apply_policy()

        assert _decided_on(gate, registry, server, pool_name, apply_raised_cap) == 1
        thread.join(30)
        assert not thread.is_alive()

    def test_a_wake_message_of_the_previous_release_wakes_everyone(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # Its gates published only the uuid of the device a lease ended on.
        pol = policy(_FAR_TIMERS, batch={"priority": 10})
        gate, registry = _watched(make_gate, pol, "a")
        full = gate.try_admit("batch", vram="70GiB")
        assert full.lease is not None
        _blocked(gate, None)
        channel = PoolKeys(pool_name).wake

        def publish(message: str) -> Callable[[], object]:
            return lambda: read_redis(server, lambda r: r.publish(channel, message))

        assert _decided_on(gate, registry, server, pool_name, publish("SIM-b-0 batch")) == 0
        # Woken for memory, it decides again once its sampler has read the
        # devices after the wake-up (nothing was freed: it still waits).
        assert _decided_on(gate, registry, server, pool_name, publish("SIM-b-0")) == 2

    def test_requests_of_different_tenants_wait_as_one_shape(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        # A tenant changes no decision: the oldest request answers for the others.
        pol = policy(_FAR_TIMERS, batch={"priority": 10})
        gate, registry = _watched(make_gate, pol, "a")
        full = gate.try_admit("batch", vram="70GiB")
        assert full.lease is not None
        _blocked(gate, "team-a", "team-b", "team-c", None)
        channel = PoolKeys(pool_name).wake

        def on_its_device() -> None:
            read_redis(server, lambda r: r.publish(channel, "SIM-a-0 batch"))

        # The oldest's two decisions (see above), not each one's.
        assert _decided_on(gate, registry, server, pool_name, on_its_device) == 2


class TestHeartbeatSampler:
    """A sampler that fails does not stop leases from being renewed."""

    def test_a_sampler_of_ones_own_that_raises_leaves_renewals_going(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        class Failing(SimulatedSampler):
            broken = False

            def sample(self) -> Any:
                if self.broken:
                    raise RuntimeError("the device plugin went away")
                return super().sample()

        clock = FakeClock()
        sampler = Failing(["80GiB"])
        pol = policy({"lease_ttl": "6s"}, batch={"priority": 10, "max_concurrent": 1})
        gate = make_gate(pol, sampler, _clock_ms=clock)
        lease = gate.try_admit("batch", vram="1GiB").lease
        assert lease is not None
        sampler.broken = True
        for _ in range(4):  # two TTLs, renewed every TTL/3
            clock.advance(3)
            gate.beat_now()
        assert not lease.lost
        other = make_gate(pol, SimulatedSampler(["80GiB"]), _clock_ms=clock)
        assert other.try_admit("batch", vram="1GiB").reason == "cap"


class TestManyThreads:
    """More threads than a client's connections (100) wait for one."""

    def test_150_threads_deciding_at_once_do_not_see_redis_as_down(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 0}))
        threads = 150
        barrier = threading.Barrier(threads)
        reasons: list[str] = []

        def decide() -> None:
            barrier.wait()
            for _ in range(10):
                reasons.append(gate.try_admit("batch", vram=1).reason)

        running = [threading.Thread(target=decide) for _ in range(threads)]
        for t in running:
            t.start()
        for t in running:
            t.join(60)
        # redis-py's pool of 100 failed the rest with "Too many connections",
        # answered as backend_unavailable (85 of 3000 in one run).
        assert set(reasons) == {"cap"}
        assert len(reasons) == threads * 10


class TestRefusals:
    """A Redis that answers but refuses is not called unreachable: the error names the fix."""

    def test_a_wrong_password_is_named_as_such(self, server: RedisProcess, pool_name: str) -> None:
        private = RedisProcess(server.executable).start()
        read_redis(private, lambda client: client.config_set("requirepass", "s3cret"))
        try:
            url = private.url.replace("redis://", "redis://:wrong@")
            gate = Gate(url, pool=pool_name, sampler=SimulatedSampler(["80GiB"]), register=False)
            try:

                def connections() -> int:
                    with redis.Redis.from_url(private.url, password="s3cret") as client:
                        return int(client.info("stats")["total_connections_received"])

                before = connections()
                assert gate.try_admit("batch", vram=1).reason == "backend_unavailable"
                # Refused credentials are not tried again (each try cost a backoff).
                assert connections() - before <= 2  # its own, and the count's
                with pytest.raises(BackendError, match="refused the credentials") as raised:
                    gate.pause("batch")
                assert "check the user and password in the URL" in str(raised.value)
                assert "wrong" not in str(raised.value)  # the password stays masked
            finally:
                gate.close()
        finally:
            private.stop()

    def test_a_user_refused_pubsub_still_has_its_changes_reported_as_made(
        self, server: RedisProcess, pool_name: str
    ) -> None:
        # Scripts publish wake-ups after their writes: refused PUBLISH, they
        # failed after the change took effect (a pause reported as failed, a
        # release sent again).
        private = RedisProcess(server.executable).start()
        read_redis(
            private,
            lambda client: client.execute_command(
                "ACL", "SETUSER", "nopub", "on", ">pw", "~*", "resetchannels", "+@all"
            ),
        )
        try:
            url = private.url.replace("redis://", "redis://nopub:pw@")
            gate = Gate(
                url,
                pool=pool_name,
                policy=policy(),
                sampler=SimulatedSampler(["80GiB"]),
                register=False,
            )
            try:
                d = gate.try_admit("batch", vram=1)
                assert d.lease is not None
                assert d.lease.release() is True
                gate.pause("batch", duration="5m")
                assert gate.try_admit("batch", vram=1).reason == "paused"
                gate.resume("batch")
                assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
            finally:
                gate.close()
        finally:
            private.stop()


class TestWakeListener:
    """The thread that wakes blocked admissions outlives any error Redis replies."""

    def test_a_user_without_pub_sub_still_admits_on_timers(
        self, redis_server: RedisProcess, redis_client: redis.Redis, pool_name: str
    ) -> None:
        user = f"nosub-{pool_name}"
        redis_client.execute_command(
            "ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-subscribe", "-psubscribe"
        )
        url = redis_server.url.replace("redis://", f"redis://{user}:pw@")
        gate = Gate(
            url,
            pool=pool_name,
            policy=policy(),
            sampler=SimulatedSampler(["80GiB"]),
            register=False,
        )
        try:
            with capture_logs() as logs:
                with gate.admit("batch", vram=1, timeout=10) as ticket:
                    assert ticket.device is not None
                deadline = time.monotonic() + 10
                while not any(e["event"] == "wake_listener_failed" for e in logs):
                    assert time.monotonic() < deadline, logs
                    time.sleep(0.05)
            assert gate._wake is not None
            assert gate._wake._thread.is_alive()
        finally:
            gate.close()
            redis_client.execute_command("ACL", "DELUSER", user)


class TestRedisHangs:
    """A hung Redis costs a call one socket timeout; what fails meanwhile is
    sent again, and holders are told when their leases may be gone."""

    @pytest.fixture
    def private(
        self, pool_name: str, server: RedisProcess
    ) -> Iterator[tuple[RedisProcess, Callable[..., Gate]]]:
        """A server of this test's own, of the version ``server`` is (7, 6.2)."""
        server = RedisProcess(server.executable).start()
        gates: list[Gate] = []

        def make(pol: Policy) -> Gate:
            gate = Gate(
                server.url,
                pool=pool_name,
                policy=pol,
                sampler=SimulatedSampler(["80GiB"]),
                socket_timeout_s=0.3,
            )
            gates.append(gate)
            return gate

        try:
            yield server, make
        finally:
            server.stop()
            for gate in gates:
                gate.close()

    @pytest.fixture
    def pair(self, private: tuple[RedisProcess, Callable[..., Gate]]) -> tuple[Gate, Gate]:
        """Two gates on the private server, on a class that admits one job at a
        time, with 60 s leases (none expires while a test runs)."""
        _, make = private
        pol = policy({"lease_ttl": "60s"}, batch={"priority": 10, "max_concurrent": 1})
        return make(pol), make(pol)

    def test_a_call_waits_one_socket_timeout_not_its_retries(
        self, private: tuple[RedisProcess, Callable[..., Gate]]
    ) -> None:
        server, make = private
        gate = make(policy())
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        with frozen(server):
            started = time.monotonic()
            d = gate.try_admit("batch", vram=1)
            took = time.monotonic() - started
            assert (d.outcome, d.reason) == (Outcome.DEFER, "backend_unavailable")
            with pytest.raises(AdmissionTimeout):
                gate.admit("batch", vram=1, timeout=0.5)
            blocked = time.monotonic() - started - took
        # Retried timeouts took 4 x 0.3 s and more (health checks nested theirs).
        assert took < 1.0, took
        assert blocked < 2.0, blocked

    def test_a_release_that_fails_is_sent_again_when_redis_answers(
        self, private: tuple[RedisProcess, Callable[..., Gate]], pair: tuple[Gate, Gate]
    ) -> None:
        server, _ = private
        holder, other = pair
        ticket = holder.admit("batch", vram="1GiB", timeout=5)
        with frozen(server):
            ticket.release("error")  # fails: Redis does not answer
        assert other.try_admit("batch", vram=1).reason == "cap"
        holder.beat_now()  # the heartbeat sends it again, with its outcome
        assert other.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        outcomes = read_redis(
            server, lambda client: client.hget(PoolKeys(other.pool).state, "out:batch:error")
        )
        assert outcomes == "1"

    def test_a_holder_redis_has_not_confirmed_for_a_ttl_is_told(
        self, private: tuple[RedisProcess, Callable[..., Gate]]
    ) -> None:
        server, make = private
        holder = make(policy({"lease_ttl": "1s"}))
        lease = holder.try_admit("batch", vram="1GiB").lease
        assert lease is not None
        with frozen(server):
            time.sleep(1.1)  # a whole TTL since Redis last confirmed it
            with pytest.raises(BackendError):
                holder.beat_now()
        assert (lease.lost, lease.lost_reason) == (True, "unrenewed")
        holder.beat_now()  # released once Redis answers, in case nobody reaped it
        assert holder.leases_held() == []
        assert read_redis(server, lambda client: client.zcard(PoolKeys(holder.pool).exp)) == 0

    def test_a_slow_reply_counts_against_the_unconfirmed_ttl(
        self, private: tuple[RedisProcess, Callable[..., Gate]]
    ) -> None:
        # The lease's TTL runs from when the script ran: a reply that took
        # 0.8 s to arrive leaves 0.2 s of a 1 s TTL, not 1 s. Counted from the
        # reply, the holder was told 0.8 s after another could have its slot.
        server, make = private
        holder = make(policy({"lease_ttl": "1s"}))  # a 0.3 s socket timeout
        run = holder._run_admit

        def slow_reply(*args: Any) -> Any:
            reply = run(*args)
            time.sleep(0.8)
            return reply

        holder._run_admit = slow_reply  # type: ignore[method-assign]
        lease = holder.try_admit("batch", vram="1GiB").lease
        assert lease is not None
        # The beat fails 0.3 to 0.6 s on: over a TTL since the script ran.
        with frozen(server), pytest.raises(BackendError):
            holder.beat_now()
        assert (lease.lost, lease.lost_reason) == (True, "unrenewed")

    def test_a_policy_that_lowers_the_lease_ttl_does_not_make_holders_give_up_leases(
        self, private: tuple[RedisProcess, Callable[..., Gate]]
    ) -> None:
        # Redis granted 30 s at the last renewal: the holder may not judge that
        # by the new 1 s TTL (it gave both leases away, and a cap of 2 ran 4).
        _, make = private
        holder = make(policy({"lease_ttl": "30s"}, batch={"priority": 10, "max_concurrent": 2}))
        held = [holder.try_admit("batch", vram="1GiB").lease for _ in range(2)]
        assert all(lease is not None for lease in held)
        operator = make(policy({"lease_ttl": "1s"}, batch={"priority": 10, "max_concurrent": 2}))
        operator.sync_policy(force=True)  # `gpugate policy apply`
        time.sleep(1.5)  # longer than the new TTL since the leases were confirmed
        assert holder.try_admit("batch", vram="1GiB").reason == "cap"  # it sees the new policy
        holder.beat_now()
        assert [lease.lost for lease in held if lease is not None] == [False, False]
        assert operator.try_admit("batch", vram="1GiB").reason == "cap"

    def test_a_lease_admitted_by_a_decision_whose_reply_was_lost_is_given_back(
        self, pair: tuple[Gate, Gate]
    ) -> None:
        gate, other = pair
        script = gate._scripts.admit_job

        def reply_lost(keys: list[Any], args: list[Any]) -> Any:
            script(keys=keys, args=args)  # Redis admits it...
            raise redis.TimeoutError("Timeout reading from socket")  # ...the reply never comes

        gate._scripts.admit_job = reply_lost  # type: ignore[assignment]
        assert gate.try_admit("batch", vram="1GiB").reason == "backend_unavailable"
        gate._scripts.admit_job = script  # type: ignore[assignment]
        assert other.try_admit("batch", vram="1GiB").reason == "cap"  # the orphan holds it
        time.sleep(1.4)  # older than a socket timeout (and a second): not a decision in flight
        gate.beat_now()  # Redis answers again: the gate gives back what it did not know of
        assert other.try_admit("batch", vram="1GiB").admitted

    @pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
    def test_a_lease_admitted_by_a_decision_cut_short_goes_when_the_gate_closes(
        self, pair: tuple[Gate, Gate], interrupt: type[BaseException]
    ) -> None:
        # Ctrl-C, or sys.exit() from a SIGTERM handler, while a decision
        # waits for its reply: Redis admitted it, nobody holds the lease.
        gate, other = pair
        script = gate._scripts.admit_job

        def interrupted(keys: list[Any], args: list[Any]) -> Any:
            script(keys=keys, args=args)  # Redis admits it...
            raise interrupt()  # ...and the caller is gone before the reply

        gate._scripts.admit_job = interrupted  # type: ignore[assignment]
        with pytest.raises(interrupt):
            gate.admit("batch", vram="1GiB", timeout=5)
        gate._scripts.admit_job = script  # type: ignore[assignment]
        assert other.try_admit("batch", vram="1GiB").reason == "cap"  # the orphan holds it
        gate.close()  # as at exit: it gave back its orphan, not one TTL later
        assert other.try_admit("batch", vram="1GiB").admitted

    def test_a_lease_admitted_by_a_decision_a_closing_signal_handler_cut_short_goes_too(
        self, pair: tuple[Gate, Gate]
    ) -> None:
        # The usual SIGTERM handler closes the gate, in the thread whose
        # decision waits for its reply, then exits: close() ran before the
        # decision knew it was cut short, so it could not look for its lease.
        gate, other = pair
        script = gate._scripts.admit_job

        def interrupted(keys: list[Any], args: list[Any]) -> Any:
            script(keys=keys, args=args)  # Redis admits it...
            gate.close()  # ...the handler closes the gate...
            raise SystemExit(0)  # ...and leaves before the reply

        gate._scripts.admit_job = interrupted  # type: ignore[assignment]
        with pytest.raises(SystemExit):
            gate.try_admit("batch", vram="1GiB")
        assert other.try_admit("batch", vram="1GiB").admitted  # not one TTL later

    @pytest.mark.parametrize("then", ["next-beat", "close-at-exit", "closing-handler"])
    def test_a_release_cut_short_by_an_interrupt_is_sent_again(
        self, pair: tuple[Gate, Gate], then: str
    ) -> None:
        # Ctrl-C, or a SIGTERM handler that closes the gate and exits, lands
        # in a release before Redis has it: the lease was no longer renewed,
        # and nothing gave it back for a whole TTL.
        gate, other = pair
        lease = gate.try_admit("batch", vram="1GiB").lease
        assert lease is not None
        script = gate._scripts.release_lease

        def interrupted(keys: list[Any], args: list[Any]) -> Any:
            gate._scripts.release_lease = script  # cut short before it was sent
            if then == "closing-handler":
                gate.close()
                raise SystemExit(0)
            raise KeyboardInterrupt

        gate._scripts.release_lease = interrupted  # type: ignore[assignment]
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            lease.release()
        if then != "closing-handler":
            assert other.try_admit("batch", vram="1GiB").reason == "cap"  # still held
            if then == "next-beat":
                gate.beat_now()
            else:
                gate.close()  # as at exit
        assert other.try_admit("batch", vram="1GiB").admitted

    def test_closing_while_redis_hangs_waits_one_timeout_not_one_per_lease(
        self, private: tuple[RedisProcess, Callable[..., Gate]]
    ) -> None:
        server, make = private
        gate = make(policy())
        held = [gate.try_admit("batch", vram="1GiB").lease for _ in range(4)]
        assert all(lease is not None for lease in held)
        with frozen(server):
            started = time.monotonic()
            gate.close()
            took = time.monotonic() - started
        assert took < 1.0, took  # one 0.3 s timeout, not five
        assert all(lease is not None and lease.released for lease in held)

    def test_past_maxmemory_no_lease_is_written_even_where_ghosts_end(
        self, private: tuple[RedisProcess, Callable[..., Gate]]
    ) -> None:
        # Ending a ghost deletes (which Redis allows past maxmemory): were that
        # the script's first write, the lease's writes after it would pass too.
        server, make = private
        sampler = SimulatedSampler(["80GiB"])
        gate = Gate(server.url, pool=make(policy()).pool, policy=policy(), sampler=sampler)
        try:
            for _ in range(3):
                lease = gate.try_admit("batch", vram="1GiB").lease
                assert lease is not None
                lease.release()  # a ghost, until a later sample
            time.sleep(0.005)
            sampler.set_used(0, "1GiB")  # a new sample: the next decision ends the ghosts
            read_redis(server, lambda client: client.config_set("maxmemory", 1))
            try:
                answers = [gate.try_admit("batch", vram="1GiB").reason for _ in range(3)]
                live = read_redis(server, lambda client: client.zcard(PoolKeys(gate.pool).exp))
            finally:
                read_redis(server, lambda client: client.config_set("maxmemory", 0))
            assert answers == ["backend_unavailable"] * 3
            assert live == 0
        finally:
            gate.close()

    @pytest.mark.parametrize("flushed", [False, True], ids=["loaded", "flushed"])
    def test_redis_refusing_writes_is_a_backend_error_not_a_redis_one(
        self, private: tuple[RedisProcess, Callable[..., Gate]], flushed: bool
    ) -> None:
        # Refused before a script runs, the error is OutOfMemoryError; refused
        # at a write inside it (a script loaded again first), a script error.
        server, make = private
        gate = make(policy())
        ticket = gate.admit("batch", vram="1GiB", timeout=5)
        read_redis(server, lambda client: client.config_set("maxmemory", 1))
        if flushed:
            read_redis(server, lambda client: client.script_flush())
        try:
            with pytest.raises(ValueError, match="the job's own"), ticket:
                raise ValueError("the job's own error")
            assert gate.try_admit("batch", vram=1).reason == "backend_unavailable"
            with pytest.raises(BackendError):
                gate.pause("batch", duration="1m")
            # What status reads still reads: Redis refuses the transaction, not the reads.
            view = read_redis(server, lambda client: read_pool(client, gate.pool))
            assert [lease.id for lease in view.leases] == [ticket.lease.id]
        finally:
            read_redis(server, lambda client: client.config_set("maxmemory", 0))
        gate.beat_now()  # the failed release goes through now
        assert gate.leases_held() == []


class TestScripts:
    """Every script ships, compiles on the server, and is loaded again after a flush."""

    def test_every_script_loads_with_the_sha_the_client_uses(self, server: RedisProcess) -> None:
        from gpugate.state._scripts import SCRIPT_NAMES, Scripts

        client = redis.Redis.from_url(server.url)
        scripts = Scripts(client)
        for name in SCRIPT_NAMES:
            lua = getattr(scripts, name)
            assert client.script_load(lua.source) == lua.sha
        client.close()

    def test_a_script_flush_costs_one_reload_not_an_error(
        self, make_gate: Callable[..., Gate], server: RedisProcess
    ) -> None:
        gate = make_gate(policy())
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT
        client = redis.Redis.from_url(server.url)
        client.script_flush()
        client.close()
        assert gate.try_admit("batch", vram=1).outcome is Outcome.ADMIT


class TestDecisionCounts:
    """Every answer is counted per minute in Redis, for status."""

    def test_answers_are_counted_by_class_outcome_and_reason(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        clock = FakeClock(start_ms=60_000 * 28_333_333)
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 1}), _clock_ms=clock)
        gate.try_admit("batch", vram=1)
        gate.try_admit("batch", vram=1)
        gate.try_admit("batch", vram="100GiB")
        client = redis.Redis.from_url(server.url, decode_responses=True)
        counts = client.hgetall(f"{PoolKeys(pool_name).prefix}dec:28333333")
        client.close()
        assert counts == {
            "batch admit ok": "1",
            "batch defer cap": "1",
            "batch reject too_large": "1",
        }


class TestWorkerRegistry:
    """A gate lists itself in the pool's registry, beats, and leaves on close."""

    def test_a_gate_registers_beats_and_unregisters(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        import json

        keys = PoolKeys(pool_name)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        gate = make_gate(policy())
        deadline = time.monotonic() + 10
        while client.zscore(keys.workers, gate.owner) is None:
            assert time.monotonic() < deadline, "the gate never registered"
            time.sleep(0.02)
        info = json.loads(client.hget(keys.workerinfo, gate.owner) or "{}")
        assert info["pid"] == os.getpid()
        assert info["policy_version"] == gate.policy.version  # type: ignore[union-attr]
        view = read_pool(client, pool_name)
        (worker,) = [w for w in view.workers if w.owner == gate.owner]
        assert worker.registered
        assert worker.alive(view.now_ms, view.ttl_ms)
        gate.close()
        assert client.zscore(keys.workers, gate.owner) is None
        assert client.hget(keys.workerinfo, gate.owner) is None
        client.close()

    def test_a_silent_worker_is_pruned_after_ten_ttls(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        clock = FakeClock()
        keys = PoolKeys(pool_name)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        client.zadd(keys.workers, {"ghost-host:1:dead": clock.ms})
        client.hset(keys.workerinfo, "ghost-host:1:dead", "{}")
        gate = make_gate(policy({"lease_ttl": "5s"}), _clock_ms=clock)
        gate.beat_now()
        assert client.zscore(keys.workers, "ghost-host:1:dead") is not None
        clock.advance(50.001)
        gate.beat_now()
        assert client.zscore(keys.workers, "ghost-host:1:dead") is None
        assert client.hget(keys.workerinfo, "ghost-host:1:dead") is None
        assert client.zscore(keys.workers, gate.owner) == clock.ms
        client.close()

    def test_one_shot_gates_do_not_register(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        gate = make_gate(policy(), register=False)
        gate.beat_now()
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.zcard(PoolKeys(pool_name).workers) == 0
        client.close()


class TestFragmentation:
    """Jobs report what their allocator holds unused; a class's max_fragmentation keeps it off
    devices above that share."""

    def test_a_fragmented_waiter_does_not_wait_on_a_device_too_small_for_it(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # dev0 (80 GiB) has room but is too fragmented for interactive; dev1
        # (24 GiB) could never hold 40 GiB: it waits for dev0's fragmentation
        # to fall, holding back nobody, and batch may use dev1.
        clock = FakeClock()
        pol = policy(
            interactive={"priority": 100, "max_fragmentation": 0.1}, batch={"priority": 10}
        )
        gate = make_gate(pol, SimulatedSampler(["80GiB", "24GiB"]), _clock_ms=clock)
        a = gate.try_admit("batch", vram="30GiB", device="SIM-sim-0")
        assert a.lease is not None
        a.lease.report_vram("30GiB", idle="20GiB")
        clock.advance(0.05)
        gate.beat_now()
        clock.advance(0.05)
        poller = threading.Thread(
            target=gate.try_admit, args=("interactive",), kwargs={"vram": "40GiB"}
        )
        poller.start()
        poller.join()
        (waiter,) = gate.client.hvals(gate._keys.waiters)
        assert waiter.split()[3] == b"-"
        assert waiter.split()[7] == b"fragmented"
        d = gate.try_admit("batch", vram="10GiB", device="SIM-sim-1")
        assert d.outcome is Outcome.ADMIT

    def test_a_fragmented_waiter_waits_on_a_device_it_could_use(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # dev0 has 50 GiB free but is too fragmented for interactive; dev1 is
        # full. Interactive waits for room on dev1: batch may use dev0.
        clock = FakeClock()
        pol = policy(
            interactive={"priority": 100, "max_fragmentation": 0.1}, batch={"priority": 10}
        )
        gate = make_gate(pol, SimulatedSampler(["80GiB", "80GiB"]), _clock_ms=clock)
        a = gate.try_admit("batch", vram="30GiB", device="SIM-sim-0")
        b = gate.try_admit("batch", vram="75GiB", device="SIM-sim-1")
        assert a.lease is not None
        assert b.lease is not None
        a.lease.report_vram("30GiB", idle="20GiB")  # 25 % of dev0 held unused
        clock.advance(0.05)
        gate.beat_now()
        clock.advance(0.05)
        poller = threading.Thread(
            target=gate.try_admit, args=("interactive",), kwargs={"vram": "20GiB"}
        )
        poller.start()
        poller.join()
        (waiter,) = gate.client.hvals(gate._keys.waiters)
        assert waiter.split()[5:8] == [b"SIM-sim-1", b"interactive", b"fragmented"]
        d = gate.try_admit("batch", vram="10GiB")
        assert (d.outcome, d.device_uuid) == (Outcome.ADMIT, "SIM-sim-0")

    def test_a_fragmented_device_is_skipped_by_a_class_with_a_bound(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        from gpugate.state._inspect import read_pool
        from gpugate.state._verdict import assess

        clock = FakeClock()
        pol = policy(
            interactive={"priority": 100},
            batch={"priority": 10, "max_fragmentation": 0.1},
        )
        sampler = SimulatedSampler(["80GiB"])
        gate = make_gate(pol, sampler, _clock_ms=clock)
        job = gate.try_admit("interactive", vram="20GiB")
        assert job.lease is not None
        job.lease.report_vram("20GiB", idle="12GiB")  # 15 % of the device held unused
        gate.beat_now()
        sampler.set_used(0, "20GiB")
        clock.advance(1)
        d = gate.try_admit("batch", vram="10GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, Reason.FRAGMENTED)
        # An estimate (half the 5 s waiter TTL, shorter than a third of the lease
        # TTL), jittered by ±50 % so pollers spread out.
        retries = {d.retry_after} | {
            gate._decide("batch", 10 * GiB, "w", None, None, False).retry_after for _ in range(7)
        }
        assert len(retries) > 1
        assert all(1.25 <= r < 3.75 for r in retries), retries
        assert gate.try_admit("interactive", vram="10GiB").outcome is Outcome.ADMIT
        client = redis.Redis.from_url(server.url)
        view = read_pool(client, pool_name, now_ms=clock.ms)
        client.close()
        (device,) = view.devices
        assert device.fragmentation == pytest.approx(12 / 80)
        # The job alone holds more idle cache than batch's bound: its worker is told,
        # and status says which GPU wants its workers recycled.
        assert job.lease.recycle_recommended
        assert any("fragmented" in note and "batch" in note for note in assess(view).notes)
        # The job gives memory back to the driver: its allocator holds less.
        job.lease.report_vram("20GiB", idle="4GiB")
        gate.beat_now()
        clock.advance(1)
        assert gate.try_admit("batch", vram="10GiB").outcome is Outcome.ADMIT

    def test_a_released_jobs_idle_bytes_stop_counting_after_a_later_sample(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        pol = policy(batch={"priority": 10, "max_fragmentation": 0.1})
        gate = make_gate(pol, SimulatedSampler(["80GiB", "80GiB"]), _clock_ms=clock)
        job = gate.try_admit("batch", vram="20GiB", device="SIM-sim-0")
        assert job.lease is not None
        job.lease.report_vram("20GiB", idle="20GiB")
        gate.beat_now()
        clock.advance(1)
        # Device 0 is fragmented: batch goes to device 1 instead.
        assert gate.try_admit("batch", vram="10GiB").device_uuid == "SIM-sim-1"
        job.lease.release()
        clock.advance(1)
        assert gate.try_admit("batch", vram="10GiB", device="SIM-sim-0").outcome is Outcome.ADMIT

    def test_a_request_kept_off_fragmented_devices_waits_for_memory_like_any_other(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        # Given sim-0 with room but fragmented for interactive, sim-1 full,
        clock = FakeClock()
        pol = policy(
            interactive={"priority": 100, "max_fragmentation": 0.1}, batch={"priority": 10}
        )
        sampler = SimulatedSampler(["40GiB", "40GiB"])
        gate = make_gate(pol, sampler, _clock_ms=clock)
        job = gate.try_admit("batch", vram="10GiB", device="SIM-sim-0")
        assert job.lease is not None
        job.lease.report_vram("10GiB", idle="9GiB")
        gate.beat_now()
        sampler.set_used(0, "10GiB")
        sampler.set_used(1, "35GiB")
        clock.advance(1)
        assert gate.try_admit("interactive", vram="20GiB").reason == Reason.FRAGMENTED
        # when sim-1 frees, batch may not take the room interactive needs there,
        sampler.set_used(1, 0)
        clock.advance(0.1)
        d = gate.try_admit("batch", vram="35GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")
        # which interactive gets.
        assert gate.try_admit("interactive", vram="20GiB").device_uuid == "SIM-sim-1"

    def test_without_pytorch_there_is_nothing_to_report(self) -> None:
        import sys

        from gpugate.sampling import torch_memory_stats

        if "torch" in sys.modules:
            pytest.skip("PyTorch is imported in this process")
        assert torch_memory_stats() is None


class TestHostSnapshots:
    """Each heartbeat publishes its host's GPUs, so status sees them from anywhere."""

    def test_utilisation_and_quarantined_devices_reach_the_pool_view(
        self, make_gate: Callable[..., Gate], server: RedisProcess, pool_name: str
    ) -> None:
        from gpugate import DeviceFault, DeviceSample, Snapshot

        class Host:
            backend = "test"

            def sample(self) -> Snapshot:
                return Snapshot(
                    devices=(DeviceSample("GPU-ok", 0, 80 * GiB, 10 * GiB, "H100", 0.5),),
                    taken_mono=time.monotonic(),
                    host="gpu-07",
                    backend="test",
                    faults=(DeviceFault("GPU-lost", 1, 15, "GPU_IS_LOST", quarantined=True),),
                )

        gate = make_gate(policy(), Host())
        gate.beat_now()
        client = redis.Redis.from_url(server.url)
        view = read_pool(client, pool_name)
        client.close()
        devices = {d.uuid: d for d in view.devices}
        assert devices["GPU-ok"].utilization == 0.5
        assert devices["GPU-ok"].quarantined is False
        assert devices["GPU-ok"].host == "gpu-07"
        assert devices["GPU-ok"].total == 80 * GiB
        assert devices["GPU-lost"].quarantined is True
