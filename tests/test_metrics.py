"""Prometheus metrics: the pool collector, the instruments, the endpoint, the event log."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from conftest import notebook_gate, spawn_gpugate_metrics
from gpugate import Gate, Policy, SimulatedSampler, UsageError
from gpugate.cli._serve import PoolEvents
from gpugate.metrics import Metrics, PoolCollector, start_metrics_server
from gpugate.state._connect import connect
from gpugate.state._inspect import read_pool
from gpugate.state._keys import PoolKeys
from gpugate.state._verdict import assess

GiB = 1 << 30

POLICY = Policy.from_dict(
    {
        "pool": {"lease_ttl": "30s"},
        "classes": {
            "interactive": {"priority": 100, "max_concurrent": 4},
            "batch": {"priority": 10, "max_concurrent": 3, "rate": "1/s", "burst": 4},
        },
    }
)

# The only labels a gpugate series may carry: never a lease, job, task or worker id.
ALLOWED_LABELS = {
    "pool",
    "class",
    "device",
    "reason",
    "outcome",
    "kind",
    "state",
    "version",
    "le",
    "backend",
    "call",
    "queue",
}


@pytest.fixture
def gate(redis_url: str, pool_name: str) -> Iterator[Gate]:
    """A gate on two simulated GPUs (device 0 has 10 GiB in use outside gpugate)."""
    sampler = SimulatedSampler(["80GiB", "40GiB"], name=pool_name)
    sampler.set_used(0, "10GiB")
    g = Gate(
        redis_url,
        pool=pool_name,
        policy=POLICY,
        sampler=sampler,
        metrics=Metrics(CollectorRegistry()),
    )
    yield g
    g.close()


@pytest.fixture
def scrape(redis_url: str, pool_name: str) -> Iterator[Callable[..., CollectorRegistry]]:
    """A fresh registry holding only the pool's collector."""
    client = connect(redis_url)

    def make(**kw: Any) -> CollectorRegistry:
        registry = CollectorRegistry()
        registry.register(PoolCollector(client, pool_name, redis_url=redis_url, **kw))
        return registry

    yield make
    client.close()


class TestPoolCollector:
    """The pool's state in Redis, read at each scrape."""

    def test_gpu_memory_leases_waiters_tokens_caps_and_counters_are_exported(
        self, gate: Gate, scrape: Callable[..., CollectorRegistry], pool_name: str
    ) -> None:
        held = gate.try_admit("batch", vram="30GiB")
        done = gate.try_admit("batch", vram="5GiB")
        assert held.lease is not None
        assert done.lease is not None
        assert gate.try_admit("interactive", vram="75GiB").reason == "vram"
        gate.cap("batch", 2, duration="10m", reason="hot", who="alice@ops")
        done.lease.release("oom")  # last: no later decision's sample drops its ghost
        registry = scrape()

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"pool": pool_name, **labels})

        dev0, dev1 = gate.sampler.sample().devices
        assert value("gpugate_pool_up") == 1
        assert value("gpugate_gpus") == 2
        assert value("gpugate_gpu_memory_total_bytes", device=dev0.uuid) == 80 * GiB
        assert value("gpugate_gpu_memory_used_bytes", device=dev0.uuid) == 10 * GiB
        assert value("gpugate_gpu_memory_free_bytes", device=dev0.uuid) == 70 * GiB
        assert value("gpugate_gpu_memory_unmanaged_bytes", device=dev0.uuid) == 10 * GiB
        reserved = sum(
            value("gpugate_gpu_memory_reserved_bytes", device=d.uuid) or 0 for d in (dev0, dev1)
        )
        assert reserved == 35 * GiB  # the OOMed lease is a ghost until a later sample
        assert value("gpugate_gpu_utilization_ratio", device=dev0.uuid) is None  # unknown, absent
        assert value("gpugate_leases", **{"class": "batch"}) == 1
        assert value("gpugate_class_reserved_bytes", **{"class": "batch"}) == 30 * GiB
        assert value("gpugate_waiters", **{"class": "interactive", "reason": "vram"}) == 1
        assert (value("gpugate_waiter_oldest_seconds", **{"class": "interactive"}) or 0) >= 0
        assert 1.9 < (value("gpugate_tokens", **{"class": "batch"}) or 0) <= 4
        assert value("gpugate_tokens", **{"class": "interactive"}) is None
        assert value("gpugate_class_cap", **{"class": "batch"}) == 2
        assert value("gpugate_class_cap", **{"class": "interactive"}) == 4
        assert value("gpugate_class_priority", **{"class": "interactive"}) == 100
        assert value("gpugate_override_active", **{"class": "batch", "kind": "cap"}) == 1
        expiry = value(
            "gpugate_override_expiry_timestamp_seconds", **{"class": "batch", "kind": "cap"}
        )
        assert expiry is not None
        assert 590 < expiry - time.time() <= 600
        assert value("gpugate_pool_admissions_total", **{"class": "batch"}) == 2
        assert value("gpugate_pool_ooms_total", **{"class": "batch"}) == 1
        assert (
            value("gpugate_pool_lease_releases_total", **{"class": "batch", "outcome": "oom"}) == 1
        )
        assert (
            value("gpugate_pool_lease_releases_total", **{"class": "batch", "outcome": "ok"}) == 0
        )
        assert value("gpugate_pool_leases_expired_total", **{"class": "batch"}) == 0
        assert value("gpugate_workers", state="alive") == 1
        assert value("gpugate_pool_health") == 0
        assert value("gpugate_pool_policy_info", version=POLICY.version) == 1

    def test_names_are_gpugate_base_units_and_labels_low_cardinality(
        self, gate: Gate, scrape: Callable[..., CollectorRegistry]
    ) -> None:
        d = gate.try_admit("batch", vram="1GiB")
        assert d.lease is not None
        text = generate_latest(scrape()).decode()
        families = list(text_string_to_metric_families(text))
        assert len(families) > 20
        for family in families:
            assert family.name.startswith("gpugate_"), family.name
            assert not re.search(r"_(ms|milliseconds|gib|mib|percent)$", family.name), family.name
            for sample in family.samples:
                assert set(sample.labels) <= ALLOWED_LABELS, sample
        assert d.lease.id not in {v for f in families for s in f.samples for v in s.labels.values()}

    def test_decisions_of_the_last_5_minutes_are_a_gauge_read_from_redis(
        self, redis_url: str, pool_name: str, scrape: Callable[..., CollectorRegistry]
    ) -> None:
        now = [(int(time.time() * 1000) // 60_000 + 60) * 60_000 + 10_000]
        sampler = SimulatedSampler(["80GiB", "40GiB"], name=pool_name)
        sampler.set_used(0, "10GiB")
        gate = Gate(
            redis_url,
            pool=pool_name,
            policy=POLICY,
            sampler=sampler,
            metrics=Metrics(CollectorRegistry()),
            _clock_ms=lambda: now[0],
        )
        try:
            assert gate.try_admit("batch", vram="1GiB").admitted
            assert gate.try_admit("interactive", vram="100GiB").reason == "too_large"
            now[0] += 7 * 60_000  # those two are 7 minutes old now
            assert gate.try_admit("batch", vram="1GiB").admitted
            assert gate.try_admit("interactive", vram="75GiB").reason == "vram"
            registry = scrape(now_ms=lambda: now[0])
        finally:
            gate.close()

        def decisions(cls: str, outcome: str, reason: str) -> float | None:
            labels = {"pool": pool_name, "class": cls, "outcome": outcome, "reason": reason}
            return registry.get_sample_value("gpugate_pool_decisions", labels)

        assert decisions("batch", "admit", "ok") == 1
        assert decisions("interactive", "defer", "vram") == 1
        assert decisions("interactive", "reject", "too_large") == 0  # seen within 15 minutes
        assert decisions("interactive", "admit", "ok") is None  # never answered

    def test_an_overdue_lease_on_an_idle_pool_leaves_the_device_series_as_the_class_ones(
        self, redis_url: str, pool_name: str, scrape: Callable[..., CollectorRegistry]
    ) -> None:
        now = [int(time.time() * 1000) + 3_600_000]
        gate = Gate(
            redis_url,
            pool=pool_name,
            policy=POLICY,
            sampler=SimulatedSampler(["80GiB"], name=pool_name),
            metrics=Metrics(CollectorRegistry()),
            register=False,  # no beat at once: its first renews a TTL/3 later
            _clock_ms=lambda: now[0],
        )
        try:
            d = gate.try_admit("batch", vram="30GiB")
            assert d.lease is not None
            # Its holder stops renewing it (SIGKILLed) and no decision comes to reap it.
            now[0] += 31_000
            body = generate_latest(scrape(now_ms=lambda: now[0])).decode()
        finally:
            gate.close()
        series = {
            (s.name, s.labels.get("class") or s.labels.get("device")): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        (dev,) = gate.sampler.sample().devices
        device = dev.uuid
        assert series["gpugate_leases_overdue", "batch"] == 1
        assert series["gpugate_leases", "batch"] == series["gpugate_gpu_leases", device] == 0
        assert series["gpugate_class_reserved_bytes", "batch"] == 0
        assert series["gpugate_gpu_memory_reserved_bytes", device] == 0

    def test_a_lease_its_max_duration_ended_counts_apart_from_expired_ones(
        self, redis_url: str, pool_name: str, scrape: Callable[..., CollectorRegistry]
    ) -> None:
        now = [1_700_000_000_000]
        gate = notebook_gate(redis_url, pool_name, lambda: now[0])
        notebook = {"pool": pool_name, "class": "notebook"}
        try:
            # Given a notebook lease whose holder renews it every 10 s until told
            # that its class's max duration is reached,
            nb = gate.try_admit("notebook", vram="4GiB")
            assert nb.lease is not None
            while not nb.lease.max_duration_reached:
                now[0] += 10_000
                gate.beat_now()
            # when its last expiry has passed, it is not overdue (its holder is alive),
            now[0] += 30_000
            overdue = scrape(now_ms=lambda: now[0]).get_sample_value(
                "gpugate_leases_overdue", notebook
            )
            # and once a decision reaps it, it counts as ended by max_duration.
            assert gate.try_admit("interactive", vram="1GiB").admitted
            after = scrape(now_ms=lambda: now[0])
        finally:
            gate.close()
        assert overdue == 0
        assert after.get_sample_value("gpugate_pool_leases_expired_total", notebook) == 0
        released = {"outcome": "max_duration", **notebook}
        assert after.get_sample_value("gpugate_pool_lease_releases_total", released) == 1
        assert after.get_sample_value("gpugate_pool_admissions_total", notebook) == 1

    def test_an_extended_pause_is_exported_as_in_force_since_its_first_setting(
        self, redis_url: str, pool_name: str, scrape: Callable[..., CollectorRegistry]
    ) -> None:
        now = [1_700_000_000_000]
        gate = Gate(
            redis_url,
            pool=pool_name,
            policy=POLICY,
            sampler=SimulatedSampler(["80GiB"], name=pool_name),
            metrics=Metrics(CollectorRegistry()),
            register=False,
            _clock_ms=lambda: now[0],
        )
        try:
            # Given a pause extended half an hour after it was set,
            gate.pause("batch", duration="1h", reason="incident 42")
            now[0] += 30 * 60_000
            gate.pause("batch", duration="1h", reason="incident 42, extended")
            registry = scrape(now_ms=lambda: now[0])
        finally:
            gate.close()

        # then the series the alert reads keeps its start; the set time is the change's.
        def value(name: str) -> float | None:
            labels = {"pool": pool_name, "class": "batch", "kind": "pause"}
            return registry.get_sample_value(name, labels)

        assert value("gpugate_override_since_timestamp_seconds") == 1_700_000_000
        assert value("gpugate_override_set_timestamp_seconds") == 1_700_000_000 + 30 * 60
        assert value("gpugate_override_expiry_timestamp_seconds") == 1_700_000_000 + 90 * 60

    @pytest.mark.parametrize(
        "url",
        ["redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0?cluster=1"],
        ids=["plain", "cluster"],
    )
    def test_an_unreachable_redis_scrapes_as_pool_up_0_and_nothing_else(self, url: str) -> None:
        client = connect(url, socket_timeout_s=0.5)
        registry = CollectorRegistry()
        registry.register(PoolCollector(client, "p"))  # registering reads nothing
        families = list(text_string_to_metric_families(generate_latest(registry).decode()))
        assert registry.get_sample_value("gpugate_pool_up", {"pool": "p"}) == 0
        assert {f.name for f in families} == {
            "gpugate_pool_up",
            "gpugate_pool_read_duration_seconds",
        }
        client.close()

    def test_gpus_that_stopped_reporting_leave_the_count_and_make_the_pool_critical(
        self, gate: Gate, scrape: Callable[..., CollectorRegistry], pool_name: str, redis_url: str
    ) -> None:
        assert gate.try_admit("batch", vram="1GiB").admitted
        gate.close()  # its host stops: no more decisions, no more heartbeats
        registry = scrape()
        assert registry.get_sample_value("gpugate_gpus", {"pool": pool_name}) == 2
        assert registry.get_sample_value("gpugate_pool_health", {"pool": pool_name}) == 0
        # Make the last samples five minutes old (past the two-minute window and the TTL).
        keys = PoolKeys(pool_name)
        client = connect(redis_url)
        client.delete(keys.gpus)
        for uuid, raw in client.hgetall(keys.samples).items():
            total, used, taken = raw.split()
            client.hset(keys.samples, uuid, f"{int(total)} {int(used)} {int(taken) - 300_000}")
        registry = scrape()
        assert registry.get_sample_value("gpugate_gpus", {"pool": pool_name}) == 0
        assert registry.get_sample_value("gpugate_pool_health", {"pool": pool_name}) == 2
        # Their last figures are not exported as current memory; their age is.
        for dev in gate.sampler.sample().devices:
            labels = {"pool": pool_name, "device": dev.uuid}
            assert registry.get_sample_value("gpugate_gpu_memory_used_bytes", labels) is None
            assert registry.get_sample_value("gpugate_gpu_memory_total_bytes", labels) is None
            age = registry.get_sample_value("gpugate_gpu_sample_age_seconds", labels)
            assert age is not None
            assert age >= 300
        verdict = assess(read_pool(client, pool_name))
        assert verdict.line.startswith("CRITICAL: no GPU has reported for 5m"), verdict.line
        client.close()

    def test_a_pool_without_a_policy_is_health_unknown(
        self, scrape: Callable[..., CollectorRegistry], pool_name: str
    ) -> None:
        registry = scrape()
        assert registry.get_sample_value("gpugate_pool_health", {"pool": pool_name}) == -1
        assert registry.get_sample_value("gpugate_gpus", {"pool": pool_name}) == 0


class TestInstruments:
    """The process-side instruments, sampler ones included, on a fresh registry."""

    def test_sampler_and_nvml_instruments_exist_with_base_unit_names(self) -> None:
        registry = CollectorRegistry()
        m = Metrics(registry)
        m.sampler_seconds.labels("nvml").observe(0.002)
        m.nvml_errors.labels("nvmlDeviceGetMemoryInfo").inc()
        assert (
            registry.get_sample_value("gpugate_sampler_duration_seconds_count", {"backend": "nvml"})
            == 1
        )
        assert (
            registry.get_sample_value(
                "gpugate_nvml_errors_total", {"call": "nvmlDeviceGetMemoryInfo"}
            )
            == 1
        )

    def test_each_gate_counts_under_its_own_pool_on_one_registry(
        self, redis_url: str, pool_name: str
    ) -> None:
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        now = [int(time.time() * 1000) + 3_600_000]
        policy = Policy.from_dict(
            {
                "pool": {"lease_ttl": "5s"},
                "classes": {
                    "batch": {"priority": 10, "max_concurrent": 1},
                    "notebook": {"priority": 50, "max_duration": "10s"},
                },
            }
        )

        def gate(pool: str) -> Gate:
            return Gate(
                redis_url,
                pool=pool,
                policy=policy,
                sampler=SimulatedSampler(["80GiB"], name=pool),
                metrics=metrics,
                register=False,
                _clock_ms=lambda: now[0],
            )

        # Given two gates of two pools in one process, on one set of instruments,
        a, b = gate(f"{pool_name}-a"), gate(f"{pool_name}-b")
        try:
            # when pool a admits, defers for its cap and ends a job,
            held = a.try_admit("batch", vram="1GiB")
            assert held.lease is not None
            assert a.try_admit("batch", vram="1GiB").reason == "cap"
            held.lease.release()
            # and pool b's notebook lease reaches its max duration, then is lost,
            nb = b.try_admit("notebook", vram="1GiB")
            assert nb.lease is not None
            for step_s in (3, 3, 3, 1.5):
                now[0] += int(step_s * 1000)
                b.beat_now()
            assert nb.lease.max_duration_reached
            now[0] += 5001
            b.beat_now()
            assert nb.lease.lost
        finally:
            a.close()
            b.close()

        # then each pool's series carry its own name.
        def value(name: str, pool: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"pool": f"{pool_name}-{pool}", **labels})

        batch, notebook = {"class": "batch"}, {"class": "notebook"}
        admitted, capped = (
            {"outcome": "admit", "reason": "ok"},
            {"outcome": "defer", "reason": "cap"},
        )
        assert value("gpugate_decisions_total", "a", **batch, **admitted) == 1
        assert value("gpugate_decisions_total", "a", **batch, **capped) == 1
        assert value("gpugate_decisions_total", "b", **notebook, **admitted) == 1
        assert value("gpugate_decisions_total", "b", **batch, **admitted) is None
        assert value("gpugate_decision_duration_seconds_count", "a", **batch) == 2
        assert value("gpugate_decision_duration_seconds_count", "b", **notebook) == 1
        assert value("gpugate_job_outcomes_total", "a", **batch, outcome="ok") == 1
        assert value("gpugate_leases_max_duration_total", "b", **notebook) == 1
        assert value("gpugate_leases_lost_total", "b", **notebook) == 1
        assert value("gpugate_leases_lost_total", "a", **batch) is None

    def test_decisions_are_exposed_as_a_prometheus_counter_and_histogram_would_be(
        self,
    ) -> None:
        from prometheus_client import Counter, Histogram

        from gpugate import Outcome
        from gpugate.metrics._instruments import _LATENCY_BUCKETS

        seen = [
            ("a", "batch", Outcome.ADMIT, "ok", 3e-5),
            ("a", "batch", Outcome.DEFER, "cap", 1e-4),  # on a bucket's bound: counted in it
            ("a", "batch", Outcome.DEFER, "cap", 0.7),
            ("a", "interactive", Outcome.REJECT, "too_large", 9.0),  # past the last bound: +Inf
            ("b", "batch", Outcome.ADMIT, "ok", 0.002),  # another pool's gate, same process
        ]
        ours = CollectorRegistry()
        m = Metrics(ours)
        reference = CollectorRegistry()
        counter = Counter(
            "gpugate_decisions", "d", ["pool", "class", "outcome", "reason"], registry=reference
        )
        hist = Histogram(
            "gpugate_decision_duration_seconds",
            "s",
            ["pool", "class"],
            buckets=_LATENCY_BUCKETS,
            registry=reference,
        )
        for pool, cls, outcome, reason, seconds in seen:
            m.for_pool(pool).decisions.record(cls, outcome, reason, seconds)
            counter.labels(pool, cls, outcome.value, reason).inc()
            hist.labels(pool, cls).observe(seconds)

        def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[Any, ...], float]]:
            return {
                (s.name, tuple(sorted(s.labels.items())), s.value)
                for family in registry.collect()
                for s in family.samples
                if not s.name.endswith("_created")
            }

        assert samples(ours) == samples(reference)
        assert len(samples(ours)) == 4 + 3 * (len(_LATENCY_BUCKETS) + 3)
        body = generate_latest(ours).decode()
        assert (
            'gpugate_decisions_total{class="batch",outcome="defer",pool="a",reason="cap"} 2.0'
            in body
        )
        assert "gpugate_decisions_created" in body
        assert (
            'gpugate_decision_duration_seconds_bucket{class="batch",le="0.0001",pool="a"} 2.0'
            in body
        )


class TestEndpoint:
    """/metrics over HTTP: in a worker, and standalone (gpugate metrics)."""

    def test_a_worker_serves_its_decisions_and_optionally_the_pool(self, gate: Gate) -> None:
        d = gate.try_admit("batch", vram="1GiB")
        assert d.admitted
        with start_metrics_server(
            0, addr="127.0.0.1", registry=gate.metrics.registry, pool_of=gate
        ) as server:
            body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        decided = f'class="batch",outcome="admit",pool="{gate.pool}",reason="ok"'
        assert f"gpugate_decisions_total{{{decided}}} 1.0" in body
        assert f'gpugate_pool_up{{pool="{gate.pool}"}} 1.0' in body

    def test_a_pool_exporter_can_be_started_again_after_close_but_not_twice_at_once(
        self, gate: Gate
    ) -> None:
        registry = gate.metrics.registry
        with (
            start_metrics_server(0, addr="127.0.0.1", registry=registry, pool_of=gate),
            pytest.raises(UsageError, match="exported on this registry already"),
        ):
            start_metrics_server(0, addr="127.0.0.1", registry=registry, pool_of=gate)
        # Closed: its collector left the registry, so the pool can be exported again.
        with start_metrics_server(0, addr="127.0.0.1", registry=registry, pool_of=gate) as server:
            body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        assert body.count(f'gpugate_pool_up{{pool="{gate.pool}"}}') == 1
        assert registry.get_sample_value("gpugate_pool_up", {"pool": gate.pool}) is None

    def test_a_server_on_every_interface_gives_a_url_a_client_can_use(self, gate: Gate) -> None:
        with start_metrics_server(0, registry=gate.metrics.registry) as server:
            assert server.every_interface
            assert server.url == f"http://127.0.0.1:{server.port}/metrics"
            body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        assert "gpugate_decisions_total" in body

    def test_gpugate_metrics_serves_the_pool_logs_json_and_stops_on_sigterm(
        self, gate: Gate, redis_url: str, pool_name: str
    ) -> None:
        proc = spawn_gpugate_metrics(redis_url, pool_name, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"on (http://127\.0\.0\.1:\d+/metrics)$", line.strip())
            assert match, line
            body = urllib.request.urlopen(match.group(1), timeout=10).read().decode()
            assert f'gpugate_pool_up{{pool="{pool_name}"}} 1.0' in body
            assert "gpugate_gpu_memory_total_bytes" in body
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        events = [line for line in err.splitlines() if line.startswith("{")]
        assert any('"event": "metrics_serving"' in e for e in events), err
        assert any('"event": "pool_verdict"' in e for e in events), err


class TestPoolEvents:
    """The standalone exporter logs what changed in the pool between two scrapes."""

    def test_expired_leases_ooms_and_override_changes_are_logged(
        self, redis_url: str, pool_name: str
    ) -> None:
        now = [int(time.time() * 1000) + 3_600_000]
        gate = Gate(
            redis_url,
            pool=pool_name,
            policy=POLICY,
            sampler=SimulatedSampler(["80GiB"]),
            metrics=Metrics(CollectorRegistry()),
            _clock_ms=lambda: now[0],
        )
        client = connect(redis_url)
        events = PoolEvents()
        try:
            gate.pause("interactive", duration="5s", reason="drill", who="alice@ops")
            lost = gate.try_admit("batch", vram="1GiB")
            oom = gate.try_admit("batch", vram="1GiB")
            assert lost.lease is not None
            assert oom.lease is not None
            with capture_logs() as first:
                events(read_pool(client, pool_name, now_ms=now[0]))
            assert [e["event"] for e in first] == ["override_in_force", "pool_verdict"]
            assert first[0]["who"] == "alice@ops"
            assert first[0]["why"] == "drill"

            oom.lease.release("oom")
            now[0] += 31_000  # the other lease's holder "died": nobody renewed it
            gate.cap("batch", 1, who="bob@ops")  # also reaps nothing; the next decision does
            gate.try_admit("interactive", vram="1GiB")
            with capture_logs() as second:
                events(read_pool(client, pool_name, now_ms=now[0]))
        finally:
            client.close()
            gate.close()
        by_event = {e["event"]: e for e in second}
        assert by_event["leases_expired"]["cls"] == "batch"
        assert by_event["leases_expired"]["count"] == 1
        assert by_event["jobs_oom"]["count"] == 1
        assert by_event["jobs_oom"]["log_level"] == "error"
        assert by_event["override_set"]["who"] == "bob@ops"
        assert by_event["override_set"]["n"] == 1
        assert by_event["override_expired"]["cls"] == "interactive"
