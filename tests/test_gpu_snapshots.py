"""Every registered gate's GPU snapshot counts, not only its host's last one.

Each registered gate's heartbeat publishes what its sampler sees (devices,
utilisation, faults) in ``P gpus``, under its worker id; status, the verdict
and the metrics merge the entries per device. Gates sharing a host name may
see different devices (host-network containers with one GPU each): here,
gates on one test host with simulated GPUs of their own. Against a real
Redis (the newest and 6.2), with the scripts' injectable clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from conftest import FakeClock
from gpugate import Gate, Policy, SimulatedSampler
from gpugate.metrics import PoolCollector
from gpugate.sampling._sample import hostname
from gpugate.state._inspect import DeviceView, PoolView, _host_gpus, read_pool
from gpugate.state._keys import PoolKeys
from gpugate.state._server import RedisProcess
from gpugate.state._verdict import assess

GiB = 1 << 30
TTL_S = 30
POLICY = Policy.from_dict(
    {"pool": {"lease_ttl": f"{TTL_S}s"}, "classes": {"batch": {"priority": 10}}}
)


class Host:
    """One host name, gates on it each with simulated GPUs of its own, and the pool."""

    def __init__(self, url: str, pool: str) -> None:
        self.url = url
        self.pool = pool
        self.keys = PoolKeys(pool)
        self.clock = FakeClock.from_now(ahead_s=3600)
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.gates: list[Gate] = []

    def gate(
        self, name: str, devices: int = 1, lost: Sequence[int] = ()
    ) -> tuple[Gate, SimulatedSampler]:
        """A registered gate seeing ``devices`` GPUs ``SIM-<name>-<i>``, whose
        heartbeats come only from the test (``beat_now``); those of ``lost``
        are lost before it starts."""
        sim = SimulatedSampler(["80GiB"] * devices, name=name)
        for i in lost:
            sim.lose(i)
        g = Gate(self.url, pool=self.pool, policy=POLICY, sampler=sim, _clock_ms=self.clock)
        if g._heartbeat is not None:
            g._heartbeat.stop()
        self.gates.append(g)
        return g, sim

    def entries(self) -> set[str]:
        """The fields of ``P gpus``."""
        return set(self.redis.hkeys(self.keys.gpus))

    def view(self) -> PoolView:
        client = redis.Redis.from_url(self.url)
        try:
            return read_pool(client, self.pool, now_ms=self.clock.ms)
        finally:
            client.close()

    def device(self, uuid: str) -> DeviceView:
        return next(d for d in self.view().devices if d.uuid == uuid)

    def metric(self, name: str, **labels: str) -> float | None:
        """One series of the pool exporter, scraped now."""
        registry = CollectorRegistry()
        client = redis.Redis.from_url(self.url)
        try:
            registry.register(PoolCollector(client, self.pool, now_ms=self.clock))
            return registry.get_sample_value(name, {"pool": self.pool, **labels})
        finally:
            client.close()

    def gpus_metric(self) -> float | None:
        return self.metric("gpugate_gpus")

    def close(self) -> None:
        for g in self.gates:
            g.close()
        self.redis.close()


@pytest.fixture
def host(redis_both: RedisProcess, pool_name: str) -> Iterator[Host]:
    h = Host(redis_both.url, pool_name)
    yield h
    h.close()


class TestGatesOfOneHost:
    """Gates of one host name each keep their own devices in the pool's view."""

    def test_a_gpu_lost_to_one_gate_is_degraded_while_another_gate_of_the_host_beats(
        self, host: Host
    ) -> None:
        # given a busy gate and an idle one on the same host, their devices apart
        busy, _ = host.gate("a")
        idle, sim = host.gate("b", devices=2)
        assert busy.try_admit("batch", vram="10GiB").admitted
        # when the idle gate's first device is lost, and the busy gate beats last
        sim.lose(0)
        host.clock.advance(20)
        idle.beat_now()
        busy.beat_now()
        # then the loss shows, and every device still seen is fresh
        view = host.view()
        verdict = assess(view)
        assert verdict.level == "DEGRADED", verdict.line
        assert any("lost (quarantined)" in r for r in verdict.reasons), verdict.reasons
        by_uuid = {d.uuid: d for d in view.devices}
        assert by_uuid["SIM-b-0"].quarantined is True
        for uuid in ("SIM-a-0", "SIM-b-1"):
            assert by_uuid[uuid].quarantined is False
            assert by_uuid[uuid].sample_age_s(view.now_ms) < 5
        assert len(view.reporting_devices()) == 2
        assert host.gpus_metric() == 2

    def test_an_idle_gate_refreshes_its_devices_and_drops_released_memory(self, host: Host) -> None:
        busy, _ = host.gate("a")
        idle, _ = host.gate("b")
        assert busy.try_admit("batch", vram="10GiB").admitted
        done = idle.try_admit("batch", vram="20GiB")
        assert done.lease is not None
        done.lease.release()  # a ghost: its memory counts until a later sample
        assert host.device("SIM-b-0").reserved == 20 * (1 << 30)
        for _ in range(5):
            host.clock.advance(10)
            idle.beat_now()
            busy.beat_now()
        device = host.device("SIM-b-0")
        assert device.sample_age_s(host.clock.ms) < 5
        assert device.reserved == 0
        assert device.host == hostname()


class TestALostGpuInTheMetrics:
    """A lost (quarantined) GPU is exported as such, whether it ever sent a sample or not."""

    def test_a_gpu_lost_before_its_worker_started_is_exported_quarantined(self, host: Host) -> None:
        # given a worker started on a host whose second GPU is lost already
        gate, _ = host.gate("a", devices=2, lost=[1])
        # when it admits on the other one and beats
        held = gate.try_admit("batch", vram="10GiB")
        assert held.device_uuid == "SIM-a-0"
        gate.beat_now()
        # then status and the exporter both say the lost one is quarantined
        view = host.view()
        lost = next(d for d in view.devices if d.uuid == "SIM-a-1")
        assert lost.sample_ms == 0  # it never sent a sample
        assert lost.quarantined is True
        assert "lost (quarantined)" in assess(view).line
        assert host.metric("gpugate_gpu_quarantined", device="SIM-a-1") == 1
        assert host.metric("gpugate_gpu_leases", device="SIM-a-1") == 0
        assert host.metric("gpugate_gpu_memory_reserved_bytes", device="SIM-a-1") == 0
        # its memory is unknown, not zero
        assert host.metric("gpugate_gpu_memory_used_bytes", device="SIM-a-1") is None
        assert host.metric("gpugate_gpu_memory_total_bytes", device="SIM-a-1") is None
        assert host.metric("gpugate_gpu_sample_age_seconds", device="SIM-a-1") is None
        assert host.metric("gpugate_gpu_quarantined", device="SIM-a-0") == 0
        assert host.metric("gpugate_gpu_leases", device="SIM-a-0") == 1
        assert host.metric("gpugate_pool_health") == 1
        assert host.gpus_metric() == 1


class TestDevicesThatStoppedReporting:
    """A host that died leaves its devices' last samples behind: they stop
    counting as current once the devices stopped reporting (2 minutes, or a
    lease TTL), and the living gates' heartbeats remove them 10 TTLs on."""

    def test_a_dead_hosts_last_memory_figures_are_neither_exported_nor_judged(
        self, host: Host
    ) -> None:
        # given a host at 97.5 % memory that admitted once, and a living host
        dead, sim = host.gate("dead")
        live, _ = host.gate("live")
        sim.set_used(0, "78GiB")
        held = dead.try_admit("batch", vram="1GiB")
        assert held.admitted
        dead.beat_now()
        assert host.metric("gpugate_gpu_memory_used_bytes", device="SIM-dead-0") == 78 * GiB
        assert "SIM-dead-0 memory 97% used" in assess(host.view()).line
        # when its worker is killed (it never beats again) and 2 minutes pass
        host.clock.advance(121)
        live.beat_now()
        # then its last figures are not current: the exporter and the verdict leave them
        view = host.view()
        assert {d.uuid for d in view.reporting_devices()} == {"SIM-live-0"}
        assert assess(view).line == "OK"
        for name in (
            "gpugate_gpu_memory_used_bytes",
            "gpugate_gpu_memory_total_bytes",
            "gpugate_gpu_memory_free_bytes",
            "gpugate_gpu_memory_unmanaged_bytes",
            "gpugate_gpu_memory_available_bytes",
        ):
            assert host.metric(name, device="SIM-dead-0") is None, name
            assert host.metric(name, device="SIM-live-0") is not None, name
        # its age says how long it has been silent; its lease expired and was reaped
        assert (host.metric("gpugate_gpu_sample_age_seconds", device="SIM-dead-0") or 0) >= 121
        assert host.metric("gpugate_gpu_leases", device="SIM-dead-0") == 0
        assert host.gpus_metric() == 1

    def test_a_dead_hosts_samples_go_ten_ttls_on_and_its_device_with_them(self, host: Host) -> None:
        # given two hosts that admitted once each, one of which dies
        dead, _ = host.gate("dead")
        live, _ = host.gate("live")
        for gate in (dead, live):
            held = gate.try_admit("batch", vram="1GiB")
            assert held.lease is not None
            held.lease.release()
        live.beat_now()
        # when 200 s pass, the living host beating (and deciding nothing)
        for _ in range(20):
            host.clock.advance(10)
            live.beat_now()
        # then the dead host's sample is still there: status shows how old it is
        assert set(host.redis.hkeys(host.keys.samples)) == {"SIM-dead-0", "SIM-live-0"}
        age = host.metric("gpugate_gpu_sample_age_seconds", device="SIM-dead-0")
        assert age == pytest.approx(200, abs=1)
        # when 10 TTLs have passed since
        for _ in range(11):
            host.clock.advance(10)
            live.beat_now()
        # then both samples are gone; the dead device leaves the pool, the idle
        # living one stays, fresh by its host's snapshot
        assert host.redis.hkeys(host.keys.samples) == []
        view = host.view()
        assert [d.uuid for d in view.devices] == ["SIM-live-0"]
        assert [d.uuid for d in view.reporting_devices()] == ["SIM-live-0"]
        assert host.metric("gpugate_gpu_sample_age_seconds", device="SIM-dead-0") is None
        assert host.metric("gpugate_gpu_leases", device="SIM-dead-0") is None
        assert host.metric("gpugate_gpu_memory_total_bytes", device="SIM-live-0") == 80 * GiB
        # and a decision on the living one stores its sample again
        assert live.try_admit("batch", vram="1GiB").admitted
        assert host.redis.hkeys(host.keys.samples) == ["SIM-live-0"]

    def state_of(self, host: Host, uuid: str) -> list[str]:
        """What the pool keeps about device ``uuid``: its state fields, lease
        records and ghosts."""
        fields = [f for f in host.redis.hkeys(host.keys.state) if f.endswith(":" + uuid)]
        records = host.redis.hkeys(host.keys.device(uuid))
        ghosts = [g for g in host.redis.zrange(host.keys.ghosts, 0, -1) if uuid in g]
        return sorted(fields) + records + ghosts

    def test_a_departed_device_leaves_nothing_in_the_pool(self, host: Host) -> None:
        # given a host that admitted and released (its ghost not yet ended) and died
        dead, _ = host.gate("dead")
        live, _ = host.gate("live")
        held = dead.try_admit("batch", vram="1GiB")
        assert held.lease is not None
        held.lease.release()
        assert self.state_of(host, "SIM-dead-0") != []
        # when 10 TTLs pass, the living host beating and deciding nothing
        for _ in range(31):
            host.clock.advance(10)
            live.beat_now()
        # then its sample went, and so did every count, memory sum, record and ghost
        assert "SIM-dead-0" not in host.redis.hkeys(host.keys.samples)
        assert self.state_of(host, "SIM-dead-0") == []

    def test_a_device_holding_a_lease_keeps_its_state_until_it_is_free(self, host: Host) -> None:
        # given a job running on for 10 TTLs, its gate renewing, no decision made
        gate, _ = host.gate("a")
        held = gate.try_admit("batch", vram="1GiB")
        assert held.lease is not None
        for _ in range(31):
            host.clock.advance(10)
            gate.beat_now()
        # then its device's sample and state stay: the lease counts there
        assert host.redis.hkeys(host.keys.samples) == ["SIM-a-0"]
        assert host.redis.hget(host.keys.state, "d::SIM-a-0") == "1"
        assert not held.lease.lost
        # when the job ends: the ghost stays until older than sample_max_age
        held.lease.release()
        gate.beat_now()
        assert self.state_of(host, "SIM-a-0") != []
        host.clock.advance(TTL_S)
        gate.beat_now()
        # then the device leaves the pool's state, and comes back with a decision
        assert self.state_of(host, "SIM-a-0") == []
        assert host.redis.hkeys(host.keys.samples) == []
        assert gate.try_admit("batch", vram="1GiB").admitted
        assert host.redis.hget(host.keys.state, "d::SIM-a-0") == "1"

    def test_lost_gpus_whose_samples_went_leave_a_verdict_without_an_age(self, host: Host) -> None:
        # given a host whose only GPU is lost after one decision, its gate beating on
        gate, sim = host.gate("a")
        held = gate.try_admit("batch", vram="1GiB")
        assert held.lease is not None
        held.lease.release()
        sim.lose(0)
        # when 10 TTLs pass: its last sample goes, the device stays known as lost
        for _ in range(31):
            host.clock.advance(10)
            gate.beat_now()
        assert host.redis.hkeys(host.keys.samples) == []
        (device,) = host.view().devices
        assert device.quarantined is True
        assert device.sample_ms == 0
        # then the verdict says no GPU reports, not since the epoch
        assert assess(host.view()).reasons == (
            "no GPU has reported lately "
            "(no decision's sample, no host heartbeat: are the GPU hosts' workers running?)",
            "GPU SIM-a-0 lost (quarantined): nothing is admitted there",
        )
        assert host.metric("gpugate_gpu_quarantined", device="SIM-a-0") == 1
        assert host.metric("gpugate_gpu_sample_age_seconds", device="SIM-a-0") is None

    def test_samples_are_looked_over_once_per_ttl_pool_wide(self, host: Host) -> None:
        gate, _ = host.gate("a")
        gate.beat_now()
        gone = f"{80 << 30} 0 {host.clock.ms - 400_000}"
        host.redis.hset(host.keys.samples, mapping={"GPU-gone": gone, "GPU-garbled": "x"})
        host.clock.advance(TTL_S - 1)
        gate.beat_now()
        assert set(host.redis.hkeys(host.keys.samples)) == {"GPU-gone", "GPU-garbled"}
        host.clock.advance(1)
        gate.beat_now()
        assert host.redis.hkeys(host.keys.samples) == []


class TestEntriesLeaveWithTheirGate:
    """A gate's snapshot leaves the pool with its registration."""

    def test_a_closed_gate_takes_its_snapshot_with_it(self, host: Host) -> None:
        staying, _ = host.gate("a")
        leaving, _ = host.gate("b")
        staying.beat_now()
        leaving.beat_now()
        assert host.entries() == {staying.owner, leaving.owner}
        leaving.close()
        assert host.entries() == {staying.owner}
        assert [d.uuid for d in host.view().devices] == ["SIM-a-0"]

    def test_a_gate_silent_for_ten_ttls_is_pruned_with_its_snapshot(self, host: Host) -> None:
        living, _ = host.gate("a")
        dead, _ = host.gate("b")  # its heartbeat is stopped: it never beats again
        living.beat_now()
        dead.beat_now()
        host.clock.advance(10 * TTL_S + 1)
        living.beat_now()
        assert host.entries() == {living.owner}
        assert dead.owner not in {w.owner for w in host.view().workers}


class TestEntriesOfThePreviousVersion:
    """A pool written by the previous version, one entry per host name, still reads."""

    def legacy(self, host: Host, at_ms: int, devices: list[str], lost: list[str]) -> None:
        doc: dict[str, Any] = {
            "backend": "simulated",
            "devices": [
                {
                    "uuid": u,
                    "index": 0,
                    "name": "Old GPU",
                    "total": 80 << 30,
                    "used": 1 << 30,
                    "utilization": 0.5,
                    "age_ms": 0,
                }
                for u in devices
            ],
            "faults": [
                {"uuid": u, "index": 1, "error": "GPU_IS_LOST", "quarantined": True} for u in lost
            ],
        }
        host.redis.hset(host.keys.gpus, hostname(), f"{at_ms} {json.dumps(doc)}")

    def test_a_host_named_entry_is_read(self, host: Host) -> None:
        gate, _ = host.gate("a")
        gate.beat_now()
        self.legacy(host, host.clock.ms, ["SIM-old-0"], ["SIM-old-1"])
        view = host.view()
        by_uuid = {d.uuid: d for d in view.devices}
        assert by_uuid["SIM-old-0"].host == hostname()
        assert by_uuid["SIM-old-0"].utilization == 0.5
        assert by_uuid["SIM-old-1"].quarantined is True
        assert assess(view).level == "DEGRADED"

    def test_a_stale_host_named_entry_goes_with_a_beat_of_that_host(self, host: Host) -> None:
        gate, _ = host.gate("a")
        self.legacy(host, host.clock.ms, ["SIM-old-0"], [])
        host.clock.advance(TTL_S)
        gate.beat_now()
        assert hostname() in host.entries()  # a gate of the old version may still beat
        host.clock.advance(9 * TTL_S)
        gate.beat_now()
        assert host.entries() == {gate.owner}


def entry(at_ms: int, devices: list[dict[str, Any]], faults: Sequence[str] = ()) -> str:
    """A gate's ``P gpus`` value: its snapshot at ``at_ms``, ``faults`` lost."""
    doc = {
        "host": "node-1",
        "devices": devices,
        "faults": [{"uuid": u, "error": "GPU_IS_LOST", "quarantined": True} for u in faults],
    }
    return f"{at_ms} {json.dumps(doc)}"


class TestOneDeviceSeenByManyGates:
    """Several gates' entries on one device merge: its freshest sample, and its
    state as the freshest report of it has it."""

    def test_the_freshest_sample_counts_whichever_entry_beat_last(self) -> None:
        merged = _host_gpus(
            {
                "node-1:1:a": entry(10_000, [{"uuid": "GPU-0", "used": 1, "age_ms": 5_000}]),
                "node-1:2:b": entry(9_000, [{"uuid": "GPU-0", "used": 2, "age_ms": 0}]),
            }
        )
        assert merged["GPU-0"]["used"] == 2
        assert merged["GPU-0"]["taken_ms"] == 9_000
        assert merged["GPU-0"]["host"] == "node-1"

    def test_a_device_is_quarantined_while_its_freshest_report_says_so(self) -> None:
        seen = [{"uuid": "GPU-0", "total": 80, "used": 1, "age_ms": 0}]
        lost_last = _host_gpus(
            {"node-1:1:a": entry(10_000, [], ["GPU-0"]), "node-1:2:b": entry(9_000, seen)}
        )
        assert lost_last["GPU-0"]["quarantined"] is True
        assert lost_last["GPU-0"]["total"] == 80  # the last sample still stands
        same_beat = _host_gpus(
            {"node-1:1:a": entry(10_000, [], ["GPU-0"]), "node-1:2:b": entry(10_000, seen)}
        )
        assert same_beat["GPU-0"]["quarantined"] is True
        back_last = _host_gpus(
            {"node-1:1:a": entry(10_000, [], ["GPU-0"]), "node-1:2:b": entry(11_000, seen)}
        )
        assert back_last["GPU-0"]["quarantined"] is False
