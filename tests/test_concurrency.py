"""Admission across processes: caps, VRAM and rates hold under contention; kill -9 frees.

Each worker process has its own Gate on one pool of a real Redis. The checks
are independent of gpugate's own counters: workers record, on the host's
monotonic clock, the interval from the moment ``try_admit`` returned ADMIT to
the moment they called ``release``. That interval lies inside the lease's real
lifetime, so any overlap among the recorded intervals is a real overlap: the
largest overlap must stay within every cap and every device's memory.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import redis

from conftest import keep_busy
from gpugate import Gate, Outcome, Policy, SimulatedSampler
from gpugate.state._keys import PoolKeys
from gpugate.state._server import RedisProcess

GiB = 1 << 30
WORKERS = 8

STRESS_POLICY = {
    "pool": {"lease_ttl": "10s", "safety_margin": 0, "max_per_device": 4},
    "classes": {
        "interactive": {"priority": 100, "max_concurrent": 3},
        "batch": {"priority": 10, "max_concurrent": 5, "max_per_device": 3},
    },
}
DEVICE_TOTAL = 40 * GiB


def _stress_worker(url: str, pool: str, seed: int, seconds: float, out: Any) -> None:
    rng = random.Random(seed)
    gate = Gate(
        url,
        pool=pool,
        policy=Policy.from_dict(STRESS_POLICY),
        sampler=SimulatedSampler(["40GiB", "40GiB"]),
    )
    intervals = []
    reasons: dict[str, int] = {}
    end = time.monotonic() + seconds
    held: list[tuple[Any, float, float]] = []
    while time.monotonic() < end:
        now = time.monotonic()
        for item in [h for h in held if h[1] <= now]:
            lease, _, t0 = item
            t1 = time.monotonic()
            lease.release()
            intervals.append((t0, t1, lease.cls, lease.device_uuid, lease.vram))
            held.remove(item)
        cls = rng.choice(["interactive", "batch", "batch"])
        d = gate.try_admit(cls, vram=rng.choice([5, 10, 20]) * GiB)
        t0 = time.monotonic()
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
        if d.outcome is Outcome.ADMIT:
            held.append((d.lease, t0 + rng.uniform(0.001, 0.03), t0))
            if rng.random() < 0.3:  # some jobs report what they really use
                d.lease.report_vram(int(d.vram * rng.uniform(0.5, 1.5)))  # type: ignore[union-attr]
                gate.beat_now()
        else:
            time.sleep(rng.uniform(0, 0.002))
    for lease, _, t0 in held:
        t1 = time.monotonic()
        lease.release()
        intervals.append((t0, t1, lease.cls, lease.device_uuid, lease.vram))
    gate.close()
    out.put((intervals, reasons))


def _max_overlap(events: list[tuple[float, int]]) -> int:
    """Largest running sum of +w at starts and -w at ends (ends first on ties)."""
    level = peak = 0
    for _, w in sorted(events, key=lambda e: (e[0], e[1])):
        level += w
        peak = max(peak, level)
    return peak


def _run_workers(target: Any, args_for: Any, n: int) -> list[Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(i), out)) for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return results


class TestStress:
    """Eight processes hammering one pool never exceed a cap or a device's memory."""

    def test_caps_and_vram_hold_across_processes(
        self, redis_server: RedisProcess, pool_name: str
    ) -> None:
        results = _run_workers(
            _stress_worker, lambda i: (redis_server.url, pool_name, 1000 + i, 4.0), WORKERS
        )
        intervals = [iv for ivs, _ in results for iv in ivs]
        reasons: dict[str, int] = {}
        for _, r in results:
            for k, v in r.items():
                reasons[k] = reasons.get(k, 0) + v
        # The run must have contended for real: many admissions and deferrals for each limit.
        assert len(intervals) >= 200, reasons
        assert reasons.get("cap", 0) > 0, reasons
        assert reasons.get("vram", 0) > 0, reasons

        def events(select: Any, weight: Any) -> list[tuple[float, int]]:
            ev: list[tuple[float, int]] = []
            for t0, t1, cls, dev, vram in intervals:
                if select(cls, dev):
                    ev += [(t0, weight(vram)), (t1, -weight(vram))]
            return ev

        caps = STRESS_POLICY["classes"]
        for cls in ("interactive", "batch"):
            assert (
                _max_overlap(events(lambda c, d, cls=cls: c == cls, lambda v: 1))
                <= caps[cls]["max_concurrent"]
            )
        devices = {iv[3] for iv in intervals}
        for dev in devices:
            assert _max_overlap(events(lambda c, d, dev=dev: d == dev, lambda v: v)) <= DEVICE_TOTAL
            assert _max_overlap(events(lambda c, d, dev=dev: d == dev, lambda v: 1)) <= 4
            assert (
                _max_overlap(events(lambda c, d, dev=dev: d == dev and c == "batch", lambda v: 1))
                <= caps["batch"]["max_per_device"]
            )
        # Every lease was given back: the pool's own counters agree with the check.
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        counts = client.hgetall(PoolKeys(pool_name).state)
        client.close()
        assert all(int(v) == 0 for k, v in counts.items() if k.startswith(("n:", "d:")))
        # The per-device memory sums equal the records they summarise.
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        for dev in devices:
            records = client.hvals(PoolKeys(pool_name).device(dev))
            reserved = sum(max(int(r.split()[0]), int(r.split()[1])) for r in records)
            actual = sum(int(r.split()[1]) for r in records)
            m = counts.get(f"m:{dev}", "0 0 0").split()
            assert (int(m[0]), int(m[1])) == (reserved, actual)
        client.close()


def _rate_worker(url: str, pool: str, seconds: float, out: Any) -> None:
    pol = Policy.from_dict(
        {
            "pool": {"lease_ttl": "10s"},
            "classes": {"batch": {"priority": 10, "rate": "40/s", "burst": 10}},
        }
    )
    gate = Gate(url, pool=pool, policy=pol, sampler=SimulatedSampler(["80GiB"]))
    admitted = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        d = gate.try_admit("batch", vram=1)
        if d.outcome is Outcome.ADMIT:
            admitted += 1
            d.lease.release()  # type: ignore[union-attr]
    gate.close()
    out.put(admitted)


class TestTokenBucket:
    """Under contention a class never gets more than burst + rate x elapsed (+1)."""

    def test_admissions_stay_within_burst_plus_rate(
        self, redis_server: RedisProcess, pool_name: str
    ) -> None:
        client = redis.Redis.from_url(redis_server.url)
        # Publish the policy first so the bucket starts with the first decision.
        pol = Policy.from_dict(
            {
                "pool": {"lease_ttl": "10s"},
                "classes": {"batch": {"priority": 10, "rate": "40/s", "burst": 10}},
            }
        )
        Gate(
            redis_server.url, pool=pool_name, policy=pol, sampler=SimulatedSampler(["80GiB"])
        ).close()
        t_start = client.time()
        admitted = sum(
            _run_workers(_rate_worker, lambda i: (redis_server.url, pool_name, 2.0), WORKERS)
        )
        t_end = client.time()
        client.close()
        elapsed = (t_end[0] - t_start[0]) + (t_end[1] - t_start[1]) / 1e6
        assert admitted <= 10 + 40 * elapsed + 1
        # And the bucket did refill: far more than the burst got through.
        assert admitted > 10 + 40 * 1.0


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from gpugate import Gate, Policy, SimulatedSampler
    pol = Policy.from_dict(
        {"pool": {"lease_ttl": "2s"}, "classes": {"batch": {"priority": 10, "max_concurrent": 1}}}
    )
    gate = Gate(sys.argv[1], pool=sys.argv[2], policy=pol, sampler=SimulatedSampler(["80GiB"]))
    d = gate.try_admit("batch", vram="1GiB")
    print("LEASE", d.outcome.value, d.lease.device_uuid, d.lease.id, flush=True)
    time.sleep(600)
    """
)


class TestKilledHolder:
    """A SIGKILLed holder's slot is free again within one lease TTL."""

    def test_killed_worker_frees_its_slot_within_one_ttl(
        self, redis_server: RedisProcess, pool_name: str
    ) -> None:
        child = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, redis_server.url, pool_name],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            line = ""
            while not line.startswith("LEASE"):  # skip the child's log lines
                line = child.stdout.readline()  # type: ignore[union-attr]
                assert line, "the holder exited before taking its lease"
            _, outcome, dev, lease_id = line.split()
            assert outcome == "admit"
            pol = Policy.from_dict(
                {
                    "pool": {"lease_ttl": "2s"},
                    "classes": {"batch": {"priority": 10, "max_concurrent": 1}},
                }
            )
            gate = Gate(
                redis_server.url, pool=pool_name, policy=pol, sampler=SimulatedSampler(["80GiB"])
            )
            # The child's heartbeat keeps renewing: the slot stays taken past one TTL.
            time.sleep(2.5)
            assert gate.try_admit("batch", vram="1GiB").reason == "cap"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()  # type: ignore[union-attr]
        client = redis.Redis.from_url(redis_server.url)
        sec, usec = client.time()
        killed_ms = sec * 1000 + usec // 1000
        expires_ms = client.zscore(PoolKeys(pool_name).exp, f"{dev}\t{lease_id}")
        assert expires_ms is not None
        assert expires_ms - killed_ms <= 2000  # its last renewal ends it within one TTL
        while True:
            sec, usec = client.time()
            if sec * 1000 + usec // 1000 > expires_ms:
                break
            time.sleep(0.05)
        client.close()
        d = gate.try_admit("batch", vram="1GiB")
        assert d.outcome is Outcome.ADMIT
        d.lease.release()  # type: ignore[union-attr]
        gate.close()


_CLOSING_HOLDER = textwrap.dedent(
    """
    import signal, sys, time
    from gpugate import Gate, Policy, SimulatedSampler
    url, pool, cap, then = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    batch = {"priority": 10, "max_concurrent": cap}
    pol = Policy.from_dict({"pool": {"lease_ttl": "60s"}, "classes": {"batch": batch}})
    gate = Gate(
        url, pool=pool, policy=pol, sampler=SimulatedSampler(["80GiB"]), socket_timeout_s=10
    )

    def on_sigterm(signum, frame):
        gate.close()  # the usual graceful shutdown: give everything back, then leave
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    d = gate.try_admit("batch", vram="1GiB")
    for _ in range(1000):  # registered at once; after that beat the heartbeat idles for 20 s
        if gate._heartbeat.beats:
            break
        time.sleep(0.01)
    print("LEASE", d.outcome.value, d.lease.device_uuid, d.lease.id, flush=True)
    sys.stdin.readline()  # Redis is busy now: the next call on the script lane waits
    if then == "release":
        d.lease.release()
    while True:  # the worker polls for more work
        gate.try_admit("batch", vram="1GiB")
        time.sleep(0.01)
    """
)


class TestSigtermHandler:
    """A worker whose SIGTERM handler closes its gate exits and frees its slots at once."""

    @pytest.mark.parametrize(
        ("cap", "then"),
        [(1, "poll"), (2, "poll"), (1, "release")],
        ids=["mid-decision-that-defers", "mid-decision-that-admits", "mid-release"],
    )
    def test_a_handler_that_closes_the_gate_mid_call_exits_and_frees_the_slots(
        self, redis_server: RedisProcess, pool_name: str, cap: int, then: str
    ) -> None:
        # The signal lands while the worker's call (a poll that Redis defers
        # or admits, a release) waits for Redis on the script lane, Redis busy
        # with another client's slow script. close() in the handler waited
        # for the lane that the interrupted call, in the same thread, held:
        # the worker hung until SIGKILL. Once it no longer waits, what the
        # interrupted call did in Redis must not outlive the worker either.
        child = subprocess.Popen(
            [sys.executable, "-c", _CLOSING_HOLDER, redis_server.url, pool_name, str(cap), then],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert child.stdin is not None
        assert child.stdout is not None

        busy = threading.Thread(target=keep_busy, args=(redis_server.url, 1_500_000))
        try:
            line = ""
            while not line.startswith("LEASE"):  # skip the child's log lines
                line = child.stdout.readline()
                assert line, "the worker exited before taking its lease"
            _, outcome, dev, lease_id = line.split()
            assert outcome == "admit"
            busy.start()
            time.sleep(0.2)  # the slow script runs
            child.stdin.write("go\n")
            child.stdin.flush()
            time.sleep(0.3)  # the worker's call waits for its reply
            child.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=20)
            exited = child.returncode
        finally:
            if busy.ident is not None:
                busy.join()
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdin.close()
            child.stdout.close()
        assert exited == 0, "the worker still ran 20 s after SIGTERM"
        client = redis.Redis.from_url(redis_server.url)
        exp = PoolKeys(pool_name).exp
        # Given back at once, not left to their 60 s TTL: the lease held, and
        # any the interrupted call admitted.
        assert client.zscore(exp, f"{dev}\t{lease_id}") is None
        assert client.zrange(exp, 0, -1) == []
        client.close()


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Any:
    yield
    for p in mp.active_children():
        p.kill()
