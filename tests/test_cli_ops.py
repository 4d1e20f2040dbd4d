"""The operator surface: the pool view, the verdict, and status/pause/resume/cap/drain/leases.

The commands run in this process (``main([...])``) against the session Redis,
except where what is tested is the process itself (exit status and stderr of
a real ``gpugate`` run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog

from conftest import FakeClock
from gpugate import Gate, NoGpuSampler, Outcome, Policy, SimulatedSampler, UsageError
from gpugate._version import __version__ as gpugate_version
from gpugate.cli import main
from gpugate.cli._status import run_status, to_json
from gpugate.state._connect import connect
from gpugate.state._inspect import PoolView, read_pool
from gpugate.state._keys import PoolKeys
from gpugate.state._verdict import assess

GiB = 1 << 30

POLICY = {
    "pool": {"lease_ttl": "30s", "waiter_ttl": "5s"},
    "classes": {
        "interactive": {"priority": 100, "max_concurrent": 4},
        "notebook": {"priority": 50},
        "batch": {"priority": 10, "max_concurrent": 2, "rate": "1/s", "burst": 5},
    },
}


def _toml(policy: dict[str, Any]) -> str:
    """A policy dict of strings and whole numbers as a TOML file."""
    tables = [("pool", policy.get("pool", {}))]
    tables += [(f"classes.{name}", c) for name, c in policy["classes"].items()]
    lines = []
    for table, knobs in tables:
        lines.append(f"[{table}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in knobs.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def make_gate(redis_url: str, pool_name: str) -> Iterator[Callable[..., Gate]]:
    """Gates on the test's pool (two simulated 80 GiB GPUs by default); closed after."""
    gates: list[Gate] = []

    def make(sampler: Any = None, policy: dict[str, Any] | None = POLICY, **kw: Any) -> Gate:
        g = Gate(
            redis_url,
            pool=pool_name,
            policy=Policy.from_dict(policy) if policy is not None else None,
            sampler=sampler if sampler is not None else SimulatedSampler(["80GiB", "80GiB"]),
            **kw,
        )
        gates.append(g)
        return g

    yield make
    for g in gates:
        g.close()


@pytest.fixture
def view(redis_url: str, pool_name: str) -> Iterator[Callable[..., PoolView]]:
    """Read the test's pool (``now_ms`` to read it at a fake clock's time)."""
    client = connect(redis_url)

    def read(now_ms: int | None = None) -> PoolView:
        return read_pool(client, pool_name, redis_url=redis_url, now_ms=now_ms)

    yield read
    client.close()


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def gpugate(
    redis_url: str, pool_name: str, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., Run]]:
    """Run ``gpugate --redis-url URL --pool POOL ARGS...`` in this process."""
    saved = structlog.get_config()

    def run(*args: str) -> Run:
        capsys.readouterr()  # what the test's own gates logged before
        try:
            code = main(["--redis-url", redis_url, "--pool", pool_name, *args])
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    yield run
    structlog.configure(**saved)


def one_line_error(run: Run) -> str:
    assert run.code == 2, (run.out, run.err)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert "Traceback" not in run.err
    return lines[0]


class TestPoolView:
    """read_pool sees what the scripts wrote, and writes nothing."""

    def test_devices_classes_waiters_and_workers_follow_the_decisions(
        self,
        make_gate: Callable[..., Gate],
        view: Callable[..., PoolView],
        redis_client: Any,
        pool_name: str,
    ) -> None:
        sampler = SimulatedSampler(["80GiB", "40GiB"], name=pool_name)
        sampler.set_used(0, "10GiB")
        # Unregistered: a heartbeat's host snapshot, taken after the release
        # below, would (rightly) end the ghost this test looks at.
        gate = make_gate(sampler, register=False)
        first = gate.try_admit("batch", vram="30GiB")
        second = gate.try_admit("batch", vram="30GiB")
        assert gate.try_admit("batch", vram="30GiB").reason == "cap"
        assert gate.try_admit("interactive", vram="75GiB").reason == "vram"
        assert first.lease is not None
        assert second.lease is not None
        first.lease.release("oom")
        keys_before = sorted(redis_client.keys(f"gpugate:{{{pool_name}}}:*"))

        v = view()

        assert sorted(redis_client.keys(f"gpugate:{{{pool_name}}}:*")) == keys_before
        assert [d.uuid for d in v.devices] == sampler.uuids
        dev0, dev1 = v.devices
        assert (dev0.total, dev0.used) == (80 * GiB, 10 * GiB)
        assert dev0.reserved + dev1.reserved == 60 * GiB  # the released lease is a ghost still
        assert dev0.unmanaged == 10 * GiB
        batch, interactive = v.classes["batch"], v.classes["interactive"]
        assert (batch.leases, batch.admitted, batch.released) == (1, 2, {"oom": 1})
        assert batch.waiting_by_reason == {"cap": 1}
        assert batch.tokens is not None
        assert 2.9 < batch.tokens <= 5
        assert interactive.waiting_by_reason == {"vram": 1}
        assert interactive.tokens is None
        assert interactive.cap == 4
        assert [(w.pid, w.leases, w.waiting) for w in v.workers] == [(os.getpid(), 1, 2)]
        assert v.workers[0].alive(v.now_ms, v.ttl_ms)

    def test_an_unrenewed_lease_is_overdue_until_reaped_then_counted_expired(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        clock = FakeClock.from_now(ahead_s=3600)
        holder = make_gate(_clock_ms=clock)
        d = holder.try_admit("notebook", vram="10GiB")
        assert d.outcome is Outcome.ADMIT
        clock.advance(31)

        v = view(now_ms=clock.ms)
        assert v.classes["notebook"].overdue == 1
        assert v.classes["notebook"].leases == 0
        assert any("past expiry" in note for note in assess(v).notes)
        assert not v.workers[0].alive(v.now_ms, v.ttl_ms)

        make_gate(_clock_ms=clock).try_admit("batch", vram="1GiB")  # any decision reaps
        v = view(now_ms=clock.ms)
        assert v.classes["notebook"].overdue == 0
        assert v.classes["notebook"].expired == 1
        assert v.classes["notebook"].admitted == 1

    def test_an_overdue_lease_counts_on_its_device_as_in_its_class_on_an_idle_pool(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        clock = FakeClock()
        # Not registered: no beat at once, the first renews a TTL/3 later.
        gate = make_gate(SimulatedSampler(["80GiB"]), register=False, _clock_ms=clock)
        assert gate.try_admit("notebook", vram="20GiB").admitted  # expires at 30 s
        clock.advance(15)
        assert gate.try_admit("batch", vram="10GiB").admitted  # expires at 45 s
        # Given the notebook's holder silent past its expiry and no decision to reap it,
        clock.advance(16)

        v = view(now_ms=clock.ms)
        (dev,) = v.devices
        assert (v.classes["notebook"].leases, v.classes["notebook"].overdue) == (0, 1)
        # the device counts what the classes count: the batch lease alone,
        assert dev.leases == sum(c.leases for c in v.classes.values()) == 1
        assert dev.reserved == sum(c.reserved for c in v.classes.values()) == 10 * GiB
        # and so does status.
        gpu = to_json(v, assess(v), False, None)["gpus"][0]
        assert (gpu["leases"], gpu["reserved_bytes"]) == (1, 10 * GiB)

    def test_overrides_carry_who_why_and_expiry_and_vanish_once_expired(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        clock = FakeClock.from_now(ahead_s=3600)
        gate = make_gate(_clock_ms=clock)
        gate.pause("batch", duration="60s", reason="incident 42", who="alice@ops")
        gate.cap("interactive", 1, reason="load test", who="bob@ops")

        v = view(now_ms=clock.ms)
        pause, cap = v.classes["batch"].pause, v.classes["interactive"].cap_override
        assert pause is not None
        assert cap is not None
        assert (pause.who, pause.why, pause.remaining_s(v.now_ms)) == (
            "alice@ops",
            "incident 42",
            60,
        )
        assert (cap.n, cap.who, cap.remaining_s(v.now_ms)) == (1, "bob@ops", None)
        assert v.classes["interactive"].cap == 1
        assert v.classes["interactive"].cap_policy == 4

        clock.advance(61)
        v = view(now_ms=clock.ms)
        assert [o.kind for o in v.overrides] == ["cap"]

    def test_decisions_are_counted_by_minute_into_1_5_and_15_minute_windows(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        clock = FakeClock.from_now(ahead_s=3600)
        gate = make_gate(_clock_ms=clock)
        m = clock.next_minute(10)
        assert gate.try_admit("batch", vram="1GiB").admitted
        assert gate.try_admit("interactive", vram="100GiB").reason == "too_large"
        clock.ms = (m + 5) * 60_000 + 10_000  # the leases above expired: reaped now
        assert gate.try_admit("batch", vram="1GiB").admitted
        assert gate.try_admit("batch", vram="1GiB").admitted
        assert gate.try_admit("batch", vram="2GiB").reason == "cap"
        clock.ms = (m + 10) * 60_000 + 10_000
        assert gate.try_admit("interactive", vram="70GiB").admitted
        assert gate.try_admit("interactive", vram="70GiB").admitted
        assert gate.try_admit("interactive", vram="60GiB").reason == "vram"

        v = view(now_ms=(m + 10) * 60_000 + 30_000)
        batch, interactive = v.classes["batch"].recent, v.classes["interactive"].recent
        assert set(batch.by_minute) == {m, m + 5}
        assert (interactive.last_1m.admitted, interactive.last_1m.deferred) == (2, 1)
        assert interactive.last_1m.reasons["defer"] == {"vram": 1}
        assert interactive.last_5m.rejected == 0
        assert interactive.last_15m.reasons["reject"] == {"too_large": 1}
        assert batch.last_1m.total == 0
        w = batch.last_5m
        assert (w.admitted, w.deferred, w.rejected, w.span_s) == (2, 1, 0, 330.0)
        assert w.describe() == "2 admitted, 1 deferred (cap)"
        assert batch.last_15m.admitted == 3
        assert v.classes["notebook"].recent.last_15m.describe() == "no decisions"

        later = view(now_ms=(m + 16) * 60_000)  # minute m is 16 minutes old: out of every window
        assert later.classes["batch"].recent.last_15m.admitted == 2
        assert later.classes["interactive"].recent.last_15m.rejected == 0

    @pytest.mark.slow
    def test_a_pool_on_redis_cluster_reads_the_same(self, pool_name: str) -> None:
        from gpugate.state._server import cluster

        with cluster() as url:
            gate = Gate(
                url,
                pool=pool_name,
                policy=Policy.from_dict(POLICY),
                sampler=SimulatedSampler(["80GiB"]),
            )
            client = connect(url)
            try:
                held = gate.try_admit("batch", vram="10GiB")
                assert held.admitted
                gate.pause("notebook", duration="1m", who="alice@ops")
                v = read_pool(client, pool_name, redis_url=url)
            finally:
                client.close()
                gate.close()
        assert type(client).__name__ != "Redis"  # a cluster client
        assert v.classes["batch"].leases == 1
        assert v.classes["batch"].recent.last_1m.admitted == 1
        assert [d.total for d in v.devices] == [80 * GiB]
        assert assess(v).line.startswith("DEGRADED: notebook paused by alice@ops")


class TestMilliseconds:
    """Status converts the policy's durations to ms as the scripts are sent them."""

    def test_the_view_ttl_is_the_one_the_scripts_enforce(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        # 1.001 s is 1000.999... ms as a float: truncated it read 1000.
        pol = {**POLICY, "pool": {**POLICY["pool"], "lease_ttl": "1.001s"}}
        gate = make_gate(policy=pol)
        wire = json.loads(json.dumps(Policy.from_dict(pol).to_wire()))
        assert view().ttl_ms == wire["pool"]["ttl_ms"] == 1001
        assert gate.lease_ttl_s == 1.001


class TestVerdict:
    """One line: OK, DEGRADED or CRITICAL, with the reasons that matter."""

    def test_a_pool_without_a_policy_is_unknown_and_says_how_to_fix_it(
        self, view: Callable[..., PoolView]
    ) -> None:
        verdict = assess(view())
        assert verdict.level == "UNKNOWN"
        assert "no policy" in verdict.line
        assert "--pool" in verdict.line

    def test_no_gpu_sample_in_the_pool_is_critical(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        make_gate(NoGpuSampler()).try_admit("batch", vram="1GiB")
        verdict = assess(view())
        assert verdict.level == "CRITICAL"
        assert verdict.line.startswith("CRITICAL: no GPU visible")

    def test_an_idle_pool_with_gpus_is_ok(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        make_gate().try_admit("batch", vram="1GiB").lease.release()  # type: ignore[union-attr]
        assert assess(view()).line == "OK"

    def test_requests_waiting_for_a_fresh_sample_name_the_newest_samples_age(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        import dataclasses

        from gpugate.state._inspect import WaiterView

        clock = FakeClock.from_now(ahead_s=3600)
        old = make_gate(SimulatedSampler(["80GiB"], name="old"), _clock_ms=clock)
        old.try_admit("batch", vram="1GiB").lease.release()  # type: ignore[union-attr]
        clock.advance(60)
        new = make_gate(SimulatedSampler(["80GiB"], name="new"), _clock_ms=clock)
        new.try_admit("batch", vram="1GiB").lease.release()  # type: ignore[union-attr]
        clock.advance(5)
        waiting = WaiterView(
            id="w", owner="o", cls="batch", priority=10, since_ms=clock.ms, vram=1,
            wants="-", expires_ms=clock.ms + 5000, device=None, reason="stale_sample",
        )  # fmt: skip
        seen = dataclasses.replace(view(now_ms=clock.ms), waiters=[waiting])
        # Samples 65 s and 5 s old: the newest is 5 s old (it said 1m5s).
        assert "no fresh GPU sample (newest is 5s old)" in assess(seen).line

    def test_the_highest_class_waiting_half_a_minute_is_degraded(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        clock = FakeClock.from_now(ahead_s=3600)
        gate = make_gate(SimulatedSampler(["80GiB"]), _clock_ms=clock)
        held = gate.try_admit("batch", vram="70GiB")  # kept: a dropped lease is released
        assert held.admitted
        assert gate.try_admit("interactive", vram="20GiB").reason == "vram"
        clock.advance(4)
        gate.try_admit("interactive", vram="20GiB")  # still polling: the waiter lives on
        assert assess(view(now_ms=clock.ms)).level == "OK"
        for _ in range(10):
            clock.advance(4)
            gate.beat_now()  # the batch job holds on
            assert gate.try_admit("interactive", vram="20GiB").reason == "vram"
        verdict = assess(view(now_ms=clock.ms))
        assert verdict.line == "DEGRADED: interactive waits 44s (vram)"

    def test_a_class_deferred_for_minutes_without_an_admission_is_degraded(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        # Requests that give up and come back: no single one waits long, but
        # the class has admitted nothing for minutes (5 for the highest class,
        # 10 for the others).
        sampler = SimulatedSampler(["80GiB"])
        sampler.set_used(0, "75GiB")
        clock = FakeClock.from_now(ahead_s=3600)
        gate = make_gate(sampler, _clock_ms=clock)
        m = clock.next_minute(1)
        verdicts = []
        for k in range(12):
            clock.ms = (m + k) * 60_000 + 1_000
            # A new size each time: a request the worker's pre-check cannot answer.
            assert gate.try_admit("interactive", vram=10 * GiB + k).reason == "vram"
            assert gate.try_admit("batch", vram=10 * GiB + k).outcome is Outcome.DEFER
            verdicts.append(assess(view(now_ms=clock.ms)))
        assert [v.level for v in verdicts[:6]] == ["OK"] * 6
        assert verdicts[6].line == "DEGRADED: interactive admitted none in 5m (6 deferred: vram)"
        assert len(verdicts[10].reasons) == 1
        assert verdicts[11].reasons[1].startswith("batch admitted none in 10m (11 deferred: ")

        sampler.set_used(0, "10GiB")
        clock.advance(1)
        assert gate.try_admit("interactive", vram="10GiB").admitted
        assert assess(view(now_ms=clock.ms)).reasons == verdicts[11].reasons[1:]

    def test_memory_nearly_full_and_a_pause_are_degraded_and_a_cap_is_a_note(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        sampler = SimulatedSampler(["80GiB"])
        sampler.set_used(0, "78GiB")
        gate = make_gate(sampler)
        gate.try_admit("batch", vram="1GiB")
        gate.pause("batch", duration="10m", who="alice@ops")
        gate.cap("notebook", 1, who="bob@ops")
        verdict = assess(view())
        assert verdict.level == "DEGRADED"
        assert any("memory 97% used" in r for r in verdict.reasons)
        assert any(r.startswith("batch paused by alice@ops (reverts in") for r in verdict.reasons)
        assert verdict.notes == ("notebook capped at 1 by bob@ops (until `gpugate uncap`)",)

    def test_a_lost_gpu_is_degraded(
        self, make_gate: Callable[..., Gate], view: Callable[..., PoolView]
    ) -> None:
        sampler = SimulatedSampler(["80GiB", "80GiB"])
        gate = make_gate(sampler)
        gate.try_admit("batch", vram="1GiB")
        assert assess(view()).level == "OK"
        sampler.lose(0)
        gate.beat_now()  # the heartbeat publishes the host's snapshot, faults included
        verdict = assess(view())
        assert verdict.level == "DEGRADED"
        assert any("lost (quarantined)" in r for r in verdict.reasons), verdict.reasons

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "garbage",
            "123",
            "123 not json",
            "123 []",
            '123 {"devices": 5}',
            '123 {"devices": [{"uuid": "GPU-x", "total": "lots"}]}',
        ],
    )
    def test_an_unreadable_gpus_entry_is_skipped(
        self,
        make_gate: Callable[..., Gate],
        view: Callable[..., PoolView],
        redis_client: Any,
        pool_name: str,
        value: str,
    ) -> None:
        sampler = SimulatedSampler(["80GiB"])
        make_gate(sampler).beat_now()
        redis_client.hset(PoolKeys(pool_name).gpus, "somewhere", value)
        assert [d.uuid for d in view().devices] == sampler.uuids
        assert assess(view()).line == "OK"


class TestStatusCommand:
    """gpugate status: GPUs, classes, overrides, workers and a verdict; JSON; watch."""

    def test_text_shows_each_gpu_class_override_and_worker_without_colours_off_a_terminal(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run], pool_name: str
    ) -> None:
        sampler = SimulatedSampler(["80GiB", "40GiB"], name=pool_name)
        sampler.set_used(0, "20GiB")
        gate = make_gate(sampler)
        held = gate.try_admit("batch", vram="10GiB")
        assert held.admitted
        gate.pause("notebook", duration="30m", reason="incident 42", who="alice@ops")

        run = gpugate("status")

        assert run.code == 0, run.err
        lines = run.out.splitlines()
        assert pool_name in lines[0]
        assert "fast path" in lines[0]
        assert lines[1].startswith("DEGRADED: notebook paused by alice@ops")
        assert "\x1b[" not in run.out
        gpu0 = next(line for line in lines if line.startswith(sampler.uuid(0)))
        assert "20GiB" in gpu0
        assert "80GiB" in gpu0
        assert "█" in gpu0
        batch = next(line for line in lines if line.startswith("batch"))
        assert batch.split()[:3] == ["batch", "10", "1"]
        assert any("notebook paused until" in line and "incident 42" in line for line in lines)
        worker = next(
            line.split()
            for line in lines
            if line.split()[:2] == [gate.owner.split(":")[0], str(os.getpid())]
        )
        assert gpugate_version in worker  # which workers run which release, mid-upgrade

    def test_each_class_shows_its_answers_of_the_last_5_minutes_as_text_and_json(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        clock = FakeClock.from_now(ahead_s=3600)  # never advanced: the batch bucket does not refill
        gate = make_gate(_clock_ms=clock)
        held = [gate.try_admit("batch", vram="1GiB").lease for _ in range(2)]
        assert gate.try_admit("batch", vram="2GiB").reason == "cap"
        for _ in range(3):
            for lease in held:
                if lease is not None:
                    lease.release()
            held = [gate.try_admit("batch", vram="1GiB").lease]  # 5 tokens: admits 3 to 5
        assert gate.try_admit("batch", vram="3GiB").reason == "rate"
        assert gate.try_admit("batch", vram="4GiB").reason == "rate"
        assert gate.try_admit("interactive", vram="100GiB").reason == "too_large"

        run = gpugate("status")  # at the pool's clock: its last lease change
        doc = json.loads(gpugate("status", "--json").out)

        lines = run.out.splitlines()
        assert [line.split(None, 1)[1] for line in lines if "last 5m:" in line] == [
            "last 5m: 0 admitted, 1 rejected (too_large)",
            "last 5m: no decisions",
            "last 5m: 5 admitted, 3 deferred (rate 2, cap 1)",
        ]
        assert lines[1] == "OK"
        batch = doc["classes"]["batch"]["recent"]
        assert set(batch) == {"1m", "5m", "15m"}
        assert batch["5m"] == {
            "span_s": batch["5m"]["span_s"],
            "admitted": 5,
            "deferred": 3,
            "rejected": 0,
            "admitted_by_reason": {"ok": 5},
            "deferred_by_reason": {"rate": 2, "cap": 1},
            "rejected_by_reason": {},
        }
        assert 300 <= batch["5m"]["span_s"] < 360
        assert batch["1m"]["span_s"] == pytest.approx(batch["5m"]["span_s"] - 240)
        assert {**batch["1m"], "span_s": 0} == {**batch["5m"], "span_s": 0}
        assert doc["classes"]["interactive"]["recent"]["15m"]["rejected_by_reason"] == {
            "too_large": 1
        }
        assert doc["classes"]["batch"]["unadmitted_s"] == 0

    def test_colours_can_be_forced(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        make_gate().try_admit("batch", vram="1GiB")
        assert "\x1b[" in gpugate("status", "--color", "always").out

    def test_json_has_the_verdict_gpus_classes_overrides_and_workers(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        gate = make_gate()
        held = gate.try_admit("batch", vram="10GiB")
        assert held.admitted
        gate.cap("batch", 1, duration="5m", reason="why not", who="carol@ops")

        doc = json.loads(gpugate("status", "--json").out)

        assert doc["verdict"] == {
            "level": "OK",
            "line": "OK",
            "reasons": [],
            "notes": [doc["verdict"]["notes"][0]],
        }
        assert [g["total_bytes"] for g in doc["gpus"]] == [80 * GiB, 80 * GiB]
        assert sum(g["reserved_bytes"] for g in doc["gpus"]) == 10 * GiB
        assert doc["classes"]["batch"]["cap"] == 1
        assert doc["classes"]["batch"]["cap_policy"] == 2
        assert doc["classes"]["batch"]["leases"] == 1
        (o,) = doc["overrides"]
        assert (o["kind"], o["who"], o["why"]) == ("cap", "carol@ops", "why not")
        assert 299 <= o["reverts_in_s"] <= 300
        assert doc["workers"][0]["pid"] == os.getpid()
        assert "queues" not in doc  # no Asynq queues configured

    def test_redis_url_and_pool_may_follow_the_command(
        self,
        make_gate: Callable[..., Gate],
        redis_url: str,
        pool_name: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        make_gate()
        saved = structlog.get_config()
        try:
            capsys.readouterr()
            assert (
                main(
                    [
                        "--pool",
                        "elsewhere",
                        "status",
                        "--json",
                        "--redis-url",
                        redis_url,
                        "--pool",
                        pool_name,
                    ]
                )
                == 0
            )
            assert json.loads(capsys.readouterr().out)["pool"] == pool_name
            assert main(["--redis-url", redis_url, "--pool", pool_name, "leases", "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["pool"] == pool_name
        finally:
            structlog.configure(**saved)

    def test_watch_refreshes_and_gives_rates_from_the_second_frame(
        self, make_gate: Callable[..., Gate], redis_url: str, pool_name: str
    ) -> None:
        import io

        gate = make_gate()
        gate.try_admit("batch", vram="1GiB")
        stream = io.StringIO()
        client = connect(redis_url)
        try:
            code = run_status(
                client,
                pool_name,
                redis_url,
                embedded=False,
                as_json=True,
                watch=0.05,
                color="never",
                stream=stream,
                frames=2,
            )
        finally:
            client.close()
        assert code == 0
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        assert first["classes"]["batch"]["admitted_per_min"] is None
        assert second["classes"]["batch"]["admitted_per_min"] == 0

    @pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
    def test_watch_goes_on_through_a_redis_outage(
        self, redis_server: Any, pool_name: str, as_json: bool
    ) -> None:
        import io

        from gpugate.state._server import RedisProcess

        private = RedisProcess(redis_server.executable).start()
        url = private.url
        make = Gate(url, pool=pool_name, policy=Policy.from_dict(POLICY), register=False)
        make.close()
        stream = io.StringIO()
        client = connect(url, socket_timeout_s=0.5)
        frames: list[str] = []

        def outage() -> None:
            private.stop()  # after the first frame: the next ones cannot read
            frames.append("stopped")

        try:
            timer = threading.Timer(0.3, outage)
            timer.start()
            code = run_status(
                client,
                pool_name,
                url,
                embedded=False,
                as_json=as_json,
                watch=0.4,
                color="never",
                stream=stream,
                frames=3,
            )
            timer.join()
        finally:
            client.close()
            private.stop()
        lines = stream.getvalue().splitlines()
        if as_json:
            # Every line is a JSON document (jq reads on): the first the status,
            # the last the failed frame saying why.
            docs = [json.loads(line) for line in lines]
            assert docs[0]["pool"] == pool_name
            assert "error" not in docs[0]
            assert docs[-1]["pool"] == pool_name
            assert docs[-1]["redis"] == url
            assert docs[-1]["error"].startswith("cannot read the pool: ")
            assert isinstance(docs[-1]["time"], float)
        else:
            assert "cannot read the pool" not in lines[0], lines
            assert "cannot read the pool: " in lines[-1], lines
        assert code == 2  # the last frame could not be read
        assert frames == ["stopped"]

    def test_without_a_redis_url_and_no_embedded_redis_it_says_what_to_set(
        self,
        gpugate: Callable[..., Run],
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv("GPUGATE_EMBEDDED_DIR", str(tmp_path))
        code = main(["status"])
        err = capsys.readouterr().err
        assert code == 2
        assert "GPUGATE_REDIS_URL" in err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "redis.sock").exists()  # status never starts one


class TestOverrideCommands:
    """pause, resume, drain, cap, uncap: who, why, and when each reverts."""

    def test_pause_for_a_while_defers_the_class_and_says_who_why_and_until_when(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        gate = make_gate()
        run = gpugate(
            "pause", "batch", "--for", "30m", "--reason", "incident 42", "--who", "alice@ops"
        )
        assert run.code == 0, run.err
        assert run.out.startswith("batch paused until ")
        assert "(in 30m" in run.out
        assert "set by alice@ops" in run.out
        assert ": incident 42" in run.out
        d = gate.try_admit("batch", vram="1GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "paused")
        assert 1790 < d.retry_after <= 1800

    def test_pause_all_pauses_the_highest_class_too(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        gate = make_gate()
        run = gpugate("pause", "--all", "--reason", "maintenance")
        assert run.code == 0, run.err
        assert "no expiry" in run.out
        assert {line.split()[0] for line in run.out.splitlines()} == {
            "interactive",
            "notebook",
            "batch",
        }
        assert gate.try_admit("interactive", vram="1GiB").reason == "paused"

    def test_drain_keeps_the_highest_class_and_resume_lifts_every_pause(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        gate = make_gate()
        gpugate("cap", "interactive", "2", "--for", "1h")
        run = gpugate("drain", "--for", "10m")
        assert run.code == 0, run.err
        assert "interactive (the highest class) keeps running" in run.out
        assert gate.try_admit("notebook", vram="1GiB").reason == "paused"
        assert gate.try_admit("interactive", vram="1GiB").admitted

        run = gpugate("resume")
        assert run.code == 0, run.err
        assert sorted(run.out.splitlines()[:2]) == ["batch resumed", "notebook resumed"]
        assert "still in force: interactive capped at 2" in run.out
        assert gate.try_admit("notebook", vram="1GiB").admitted
        assert gpugate("resume").out.strip() == f"nothing is paused in pool {gate.pool}"

    def test_drain_keeps_every_class_tied_for_the_highest_priority(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        tied = {"classes": {"a": {"priority": 100}, "b": {"priority": 100}, "c": {"priority": 1}}}
        gate = make_gate(policy=tied)
        run = gpugate("drain", "--for", "10m")
        assert run.code == 0, run.err
        assert "a, b (the highest priority, 2 classes) keep running" in run.out
        assert gate.try_admit("c", vram="1GiB").reason == "paused"
        assert gate.try_admit("b", vram="1GiB").admitted

    def test_drain_with_every_class_of_one_priority_has_nothing_to_drain(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        make_gate(policy={"classes": {"a": {"priority": 5}, "b": {"priority": 5}}})
        line = one_line_error(gpugate("drain"))
        assert "only classes of one priority" in line
        assert "pause --all" in line

    def test_cap_lowers_the_cap_shows_the_policys_and_uncap_restores_it(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        gate = make_gate()
        run = gpugate("cap", "batch", "1", "--for", "5m", "--reason", "hot GPU")
        assert run.code == 0
        assert run.out.startswith("batch capped at 1 until")
        held = gate.try_admit("batch", vram="1GiB")
        assert held.admitted
        assert gate.try_admit("batch", vram="1GiB").reason == "cap"
        status = gpugate("status").out
        assert "1 (policy 2)" in status

        noop = gpugate("cap", "batch", "3")
        assert "only lowers it, so this changes nothing" in noop.out

        run = gpugate("uncap", "batch")
        assert run.out.strip() == "batch uncapped: the policy's cap (2) applies again"
        assert gate.try_admit("batch", vram="1GiB").admitted

    @pytest.mark.parametrize(
        ("setup", "args", "kind"),
        [
            (("pause", "batch"), ("resume", "batch"), "resume"),
            (("cap", "batch", "1"), ("uncap", "batch"), "uncap"),
        ],
        ids=["resume", "uncap"],
    )
    def test_resume_and_uncap_take_a_reason_and_log_it(
        self,
        make_gate: Callable[..., Gate],
        gpugate: Callable[..., Run],
        setup: tuple[str, ...],
        args: tuple[str, ...],
        kind: str,
    ) -> None:
        make_gate()
        assert gpugate(*setup).code == 0
        run = gpugate("-v", "--log-format", "json", *args, "--reason", "fixed", "--who", "bob")
        assert run.code == 0, run.err
        events = [json.loads(line) for line in run.err.splitlines() if line.startswith("{")]
        lifted = [e for e in events if e["event"] == "override_set" and e["kind"] == kind]
        assert [(e["cls"], e["who"], e["reason"]) for e in lifted] == [("batch", "bob", "fixed")]

    def test_an_unknown_option_of_a_command_points_at_that_commands_help(
        self, gpugate: Callable[..., Run]
    ) -> None:
        line = one_line_error(gpugate("status", "--nosuch"))
        assert "unrecognized arguments: --nosuch" in line
        assert line.endswith("(see `gpugate status --help`)")

    def test_a_policy_that_drops_a_class_lifts_its_overrides(
        self,
        make_gate: Callable[..., Gate],
        gpugate: Callable[..., Run],
        tmp_path: Path,
        redis_client: redis.Redis,
        pool_name: str,
    ) -> None:
        gate = make_gate()
        gpugate("pause", "batch", "--for", "2h")
        gpugate("cap", "batch", "1")
        gpugate("pause", "notebook", "--for", "1h")
        without = {
            **POLICY,
            "classes": {k: v for k, v in POLICY["classes"].items() if k != "batch"},
        }
        f = tmp_path / "gpugate.toml"
        f.write_text(_toml(without))
        run = gpugate("policy", "apply", str(f))
        assert run.code == 0, run.err
        assert "batch's pause lifted: the policy has no class batch now" in run.out
        assert "batch's cap of 1 lifted" in run.out
        assert "still in force: notebook paused until" in run.out
        state = redis_client.hgetall(PoolKeys(pool_name).state)
        assert b"pause:batch" not in state
        assert b"cap:batch" not in state
        assert set(gate.overrides()["pause"]) == {"notebook"}
        assert gate.overrides()["cap"] == {}
        run = gpugate("resume")  # every pause: notebook's, nothing left of batch
        assert run.code == 0, run.err
        assert run.out.splitlines()[0] == "notebook resumed"
        # The class back: it starts without the old pause or cap.
        f.write_text(_toml(POLICY))
        assert gpugate("policy", "apply", str(f)).code == 0
        assert gate.try_admit("batch", vram="1GiB").admitted
        assert gate.try_admit("batch", vram="1GiB").admitted

    def test_a_policy_that_drops_a_class_reports_only_its_overrides_still_in_force(
        self,
        make_gate: Callable[..., Gate],
        gpugate: Callable[..., Run],
        tmp_path: Path,
        redis_client: redis.Redis,
        pool_name: str,
    ) -> None:
        # Given batch's pause and cap set an hour ago for 10 minutes (a gate on a
        # clock an hour behind Redis TIME: both ended 50 minutes ago, still stored)
        # and notebook's pause without expiry
        gate = make_gate(_clock_ms=FakeClock.from_now(ahead_s=-3600))
        gate.pause("batch", duration="10m", reason="short")
        gate.cap("batch", 1, duration="10m")
        gate.pause("notebook", reason="long")
        shown = json.loads(gpugate("status", "--json").out)["overrides"]
        assert [(o["kind"], o["class"]) for o in shown] == [("pause", "notebook")]
        # When a policy without batch or notebook is applied (the CLI on Redis TIME)
        only = {**POLICY, "classes": {"interactive": POLICY["classes"]["interactive"]}}
        f = tmp_path / "gpugate.toml"
        f.write_text(_toml(only))
        run = gpugate("policy", "apply", str(f))
        # Then only notebook's pause is reported lifted; batch's records go all the same
        assert run.code == 0, run.err
        assert "notebook's pause lifted: the policy has no class notebook now" in run.out
        assert "batch" not in run.out, run.out
        state = redis_client.hgetall(PoolKeys(pool_name).state)
        assert not {b"pause:batch", b"cap:batch", b"pause:notebook"} & set(state)
        assert gate.overrides() == {"pause": {}, "cap": {}}

    def test_a_pause_left_from_a_dropped_class_can_be_lifted(
        self,
        make_gate: Callable[..., Gate],
        gpugate: Callable[..., Run],
        redis_client: redis.Redis,
        pool_name: str,
    ) -> None:
        # As an earlier version left it: the class gone, its pause still stored.
        gate = make_gate()
        gate.pause("batch")
        state = PoolKeys(pool_name).state
        redis_client.hdel(state, "c:batch")
        run = gpugate("resume")
        assert run.code == 0, run.err
        assert "batch resumed" in run.out
        assert not redis_client.hexists(state, "pause:batch")
        with pytest.raises(UsageError, match="no class"):
            gate.pause("batch")  # only lifting is allowed for a class the policy lacks

    def test_an_unknown_class_is_one_line_with_a_suggestion(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        make_gate()
        line = one_line_error(gpugate("pause", "bacth", "--for", "5m"))
        assert 'unknown class "bacth"; did you mean "batch"?' in line

    def test_a_pool_without_a_policy_is_one_line_naming_the_fix(
        self, gpugate: Callable[..., Run]
    ) -> None:
        line = one_line_error(gpugate("drain"))
        assert "has no policy yet" in line
        assert "gpugate policy apply" in line

    @pytest.mark.parametrize(
        ("args", "needle"),
        [
            (("pause", "batch", "--for", "3x"), '"3x" is not a duration'),
            (("cap", "batch", "-1"), "not a whole number"),
            (("cap", "batch"), "required"),
            (("metrics", "--port", "70000"), "not a TCP port"),
            # 0 would be the scripts' "no expiry": "for 0s" must not mean "forever".
            (("pause", "batch", "--for", "0s"), '"0s" is zero'),
            (("cap", "batch", "1", "--for", "0"), '"0" is zero'),
            (("drain", "--for", "0ms"), '"0ms" is zero'),
            (("status", "--watch", "0"), '"0" is zero'),
        ],
        ids=[
            "duration",
            "negative-cap",
            "missing-n",
            "port",
            "pause-for-0",
            "cap-for-0",
            "drain-for-0",
            "watch-0",
        ],
    )
    def test_bad_arguments_are_one_line(
        self, gpugate: Callable[..., Run], args: tuple[str, ...], needle: str
    ) -> None:
        line = one_line_error(gpugate(*args))
        assert needle in line
        assert "--help" in line


class TestLeasesCommand:
    """gpugate leases lists live leases and ends one with --expire."""

    def test_lists_live_leases_by_class_as_text_and_json(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        gate = make_gate()
        b = gate.try_admit("batch", vram="10GiB")
        n = gate.try_admit("notebook", vram="20GiB")
        assert b.lease is not None
        assert n.lease is not None

        text = gpugate("leases").out.splitlines()
        assert text[0].split()[:4] == ["ID", "CLASS", "DEVICE", "VRAM"]
        assert [line.split()[:2] for line in text[1:]] == [
            [b.lease.id, "batch"],
            [n.lease.id, "notebook"],
        ]
        assert gate.owner in text[1]

        doc = json.loads(gpugate("leases", "--class", "notebook", "--json").out)
        (row,) = doc["leases"]
        assert (row["id"], row["class"], row["estimate_bytes"]) == (
            n.lease.id,
            "notebook",
            20 * GiB,
        )
        assert 29 < row["expires_in_s"] <= 30
        assert not row["overdue"]

    def test_expire_ends_a_lease_that_its_holder_then_finds_lost(
        self,
        make_gate: Callable[..., Gate],
        gpugate: Callable[..., Run],
        view: Callable[..., PoolView],
    ) -> None:
        gate = make_gate()
        d = gate.try_admit("batch", vram="10GiB")
        assert d.lease is not None
        run = gpugate("leases", "--expire", d.lease.id, "--reason", "stuck job")
        assert run.code == 0, run.err
        assert f"lease {d.lease.id} (batch" in run.out
        assert "stuck job" in run.out
        gate.beat_now()
        assert d.lease.lost
        assert view().classes["batch"].released == {"expired_by_operator": 1}
        assert "no live leases" in gpugate("leases").out
        # Status counts it, beside the leases that expired unrenewed.
        (row,) = [line for line in gpugate("status").out.splitlines() if line.startswith("batch ")]
        assert row.rstrip().endswith("0 +1 by operator"), row

    def test_expiring_an_unknown_lease_is_one_line(
        self, make_gate: Callable[..., Gate], gpugate: Callable[..., Run]
    ) -> None:
        make_gate()
        assert "no live lease '999'" in one_line_error(gpugate("leases", "--expire", "999"))


class TestAPoolWithoutAPolicy:
    """The read commands refuse a pool without a policy (a wrong --pool?), as the overrides do."""

    @pytest.mark.parametrize(
        "args",
        [("leases",), ("leases", "--json"), ("leases", "--expire", "1"), ("queues",)],
        ids=["leases", "leases-json", "leases-expire", "queues"],
    )
    def test_is_one_line_naming_the_fix_and_exit_2(
        self, gpugate: Callable[..., Run], args: tuple[str, ...]
    ) -> None:
        line = one_line_error(gpugate(*args))
        assert "has no policy yet" in line
        assert "check --pool" in line
        assert "gpugate policy apply" in line

    def test_status_still_reads_it_as_unknown(self, gpugate: Callable[..., Run]) -> None:
        run = gpugate("status")
        assert run.code == 0, run.err
        assert "UNKNOWN" in run.out


class TestConfigCheck:
    """gpugate config check FILE validates without Redis and says what the file sets."""

    def test_a_good_file_lists_its_classes(
        self, tmp_path: Path, gpugate: Callable[..., Run]
    ) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text(
            '[classes.interactive]\npriority = 100\n[classes.batch]\npriority = 10\nrate = "5/s"\n'
        )
        run = gpugate("config", "check", str(f))
        assert run.code == 0
        assert "ok, policy version" in run.out
        assert "class batch: priority 10, rate 5/s burst 5" in run.out
        assert "class interactive: priority 100" in run.out
        assert "highest" in run.out

    def test_a_bad_file_is_one_line_naming_the_key(
        self, tmp_path: Path, gpugate: Callable[..., Run]
    ) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text("[classes.batch]\npriority = 10\nmax_concurent = 2\n")
        line = one_line_error(gpugate("config", "check", str(f)))
        assert str(f) in line
        assert 'did you mean "max_concurrent"' in line


class TestTheProcess:
    """A real gpugate process: one-line errors and exit statuses, never a traceback."""

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        return subprocess.run(
            [sys.executable, "-m", "gpugate", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    def test_status_of_an_unreachable_redis_is_one_line_without_the_password(self) -> None:
        result = self.run("--redis-url", "redis://:s3cret@127.0.0.1:1/0", "status")
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "unreachable" in result.stderr
        assert "s3cret" not in result.stderr

    def test_pause_of_an_unknown_class_exits_2(
        self, make_gate: Callable[..., Gate], redis_url: str, pool_name: str
    ) -> None:
        make_gate()
        result = self.run("--redis-url", redis_url, "--pool", pool_name, "pause", "nope")
        assert result.returncode == 2
        assert result.stderr.startswith("gpugate: error: unknown class")
        assert "Traceback" not in result.stderr
