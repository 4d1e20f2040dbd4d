"""Redis commands per deferred decision: 16 workers polling a host whose GPUs are all full.

``try_admit`` answers DEFER without Redis when this host's sample shows no
device with room and this request's waiter entry was refreshed in Redis
within ``waiter_ttl / 3`` (``Gate._local_defer_ok``). This benchmark counts
what that saves.

16 spawned processes (not threads: each is a worker of its own, with its own
gate, client and heartbeat, as in production), each with a ``Gate`` on one
pool of the session's private redis-server and a ``SimulatedSampler`` whose
two 80 GiB devices are full (used = total), call ``try_admit("batch",
10GiB)`` in a loop. The pool's policy has the default timings (``lease_ttl``
30 s, ``waiter_ttl`` 5 s, ``retry_max`` 30 s). The processes run these phases
one after the other, all starting together at a barrier, each phase starting
cold (the gate's record of its last remote DEFER is cleared):

* ``precheck_5ms`` / ``precheck_10ms`` (10 s each): poll every 5 / 10 ms (a
  sleep between decisions), the pre-check on, as shipped;
* ``no_precheck_5ms`` (3 s): the same 5 ms polling with the pre-check turned off
  (``Gate._local_defer_ok`` answering False on each gate): every decision
  goes to Redis;
* ``retry_after`` (10 s): the pre-check on, but each worker sleeps the
  ``retry_after`` each decision returns before the next one (what a poller
  that follows the advice sends; with these timings 5 to 15 s, so one or two
  decisions per worker in the phase).

Heartbeats (one ``renew_leases`` per worker every ``lease_ttl / 3`` = 10 s,
also without leases: the worker registry) are counted too: they are what
the pollers send. ``admit_job`` EVALSHAs and the rest are shown apart.

What the server executed is counted two ways over each phase, from just
after ``CONFIG RESETSTAT`` to just before ``INFO commandstats``:

* ``all commands``: the sum of ``calls`` over ``INFO commandstats``, the
  benchmark's own commands (``info``, ``config|resetstat``, ``echo``) left
  out. Redis counts there the commands a script runs too (an ``admit_job``
  runs about a dozen), so one EVALSHA weighs ~12.
* ``round trips``: the commands clients sent, read from ``MONITOR`` (which
  marks commands run by a script as ``[0 lua]``); EVALSHA is split by script.

Both are divided by the number of decisions, and the share of decisions
answered locally (``Decision.local``) is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any
from urllib.parse import urlparse

import pytest
import redis

from _rig import ALL_CPUS, SUMMARY, GiB, percentile
from gpugate import Gate, Outcome, Policy, SimulatedSampler
from gpugate.state._scripts import SCRIPT_NAMES, script_source
from gpugate.state._server import RedisProcess

POLLERS = 16
VRAM = 10 * GiB
TARGET_COMMANDS_PER_DECISION = 0.05
POLL_POLICY: dict[str, Any] = {
    # The default timings, spelled out: the pre-check's window is waiter_ttl / 3.
    "pool": {"safety_margin": 0, "lease_ttl": "30s", "waiter_ttl": "5s", "retry_max": "30s"},
    "classes": {"batch": {"priority": 10}},
}
# Every device of the host is full: nothing fits, the pre-check answers False.
HOST_DEVICES = ("80GiB", "80GiB")
MARK = "gpugate-bench-phase"


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    interval_s: float | None  # None: sleep the decision's retry_after
    precheck: bool


# 10 s: one heartbeat period (lease_ttl / 3), so every phase but the short one
# holds one heartbeat per worker, as a steady state would, and six pre-check
# windows (waiter_ttl / 3).
PHASES = (
    Phase("precheck_5ms", 10.0, 0.005, True),
    Phase("precheck_10ms", 10.0, 0.010, True),
    Phase("no_precheck_5ms", 3.0, 0.005, False),
    Phase("retry_after", 10.0, None, True),
)


def _never(*_args: Any) -> bool:
    return False


def poller(
    url: str,
    pool: str,
    phases: tuple[Phase, ...],
    cpus: set[int],
    barrier: Barrier,
    results: Queue[list[dict[str, Any]]],
) -> None:
    """One worker: a gate on a full host, polling ``try_admit`` through every phase."""
    os.sched_setaffinity(0, cpus)
    sampler = SimulatedSampler(list(HOST_DEVICES), name="full-host")
    for i, total in enumerate(HOST_DEVICES):
        sampler.set_used(i, total)
    gate = Gate(url, pool=pool, policy=Policy.from_dict(POLL_POLICY), sampler=sampler)
    report: list[dict[str, Any]] = []
    try:
        for phase in phases:
            # Each phase starts cold: no remote DEFER yet, so the first decision asks Redis.
            gate._recent_defer.clear()
            if phase.precheck:
                gate.__dict__.pop("_local_defer_ok", None)
            else:
                gate._local_defer_ok = _never  # type: ignore[method-assign,assignment]
            round_trips = gate.stats["round_trips"]
            barrier.wait(timeout=300)  # ready: the parent resets the server's counters
            barrier.wait(timeout=60)  # go
            local_ns: list[int] = []
            remote_ns: list[int] = []
            unexpected: list[str] = []
            retry_after: list[float] = []
            started = time.monotonic()
            end = started + phase.seconds
            while True:
                t0 = time.perf_counter_ns()
                d = gate.try_admit("batch", VRAM)
                elapsed = time.perf_counter_ns() - t0
                if d.outcome is not Outcome.DEFER or d.reason != "vram":
                    unexpected.append(f"{d.outcome.value}/{d.reason}")
                (local_ns if d.local else remote_ns).append(elapsed)
                if not d.local:
                    retry_after.append(d.retry_after)
                pause = d.retry_after if phase.interval_s is None else phase.interval_s
                now = time.monotonic()
                if now + pause >= end:
                    time.sleep(max(0.0, end - now))  # every phase lasts its full time
                    break
                time.sleep(pause)
            ran_s = time.monotonic() - started
            barrier.wait(timeout=60)  # done: the parent reads the server's counters
            local_ns.sort()
            remote_ns.sort()
            report.append(
                {
                    "local": len(local_ns),
                    "remote": len(remote_ns),
                    "round_trips": gate.stats["round_trips"] - round_trips,
                    "unexpected": unexpected[:5],
                    "ran_s": ran_s,
                    "remote_retry_after_mean_s": sum(retry_after) / len(retry_after)
                    if retry_after
                    else float("nan"),
                    "local_p50_us": percentile(local_ns, 0.5) / 1000,
                    "local_p99_us": percentile(local_ns, 0.99) / 1000,
                    "remote_p50_us": percentile(remote_ns, 0.5) / 1000,
                    "remote_p99_us": percentile(remote_ns, 0.99) / 1000,
                }
            )
        results.put(report)
    finally:
        gate.close()


class CommandMonitor:
    """Counts, from ``MONITOR``, the commands clients send between two ECHO markers.

    A raw socket, read by a thread: redis-py's Monitor parses every line with
    a regex, too slow for the tens of thousands of lines a second of the
    phase without the pre-check. Commands a script runs (``[0 lua]``) are
    counted apart; EVALSHA is named by its script.
    """

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self._sock = socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379))
        self._sock.sendall(b"MONITOR\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += self._sock.recv(64)
        assert reply.startswith(b"+OK"), reply
        self._scripts = {
            hashlib.sha1(script_source(name).encode()).hexdigest().encode(): name
            for name in SCRIPT_NAMES
        }
        self._phase: str | None = None
        self.top: dict[str, Counter[str]] = {}
        self.nested: Counter[str] = Counter()
        self._ended: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()

    def ended(self, phase: str) -> threading.Event:
        with self._lock:
            return self._ended.setdefault(phase, threading.Event())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)

    def _run(self) -> None:
        pending = b""
        while True:
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\r\n")
            for line in lines:
                self._line(line)

    def _line(self, line: bytes) -> None:
        # +1795420061.158371 [0 127.0.0.1:43990] "EVALSHA" "2472c3dc..." "5" ...
        close = line.find(b"] ")
        if not line.startswith(b"+") or close < 0:
            return
        source = line[line.find(b"[") + 1 : close]
        parts = line[close + 2 :].split(b'"', 4)
        if len(parts) < 2:
            return
        name = parts[1].decode(errors="replace").lower()
        if name == "echo" and len(parts) >= 4 and parts[3].startswith(MARK.encode()):
            _, edge, marked = parts[3].decode().split(":", 2)
            if edge == "start":
                self._phase = marked
                self.top[marked] = Counter()
                self.nested[marked] = 0
            else:
                self._phase = None
                self.ended(marked).set()
            return
        phase = self._phase
        if phase is None:
            return
        if source.endswith(b" lua"):
            self.nested[phase] += 1
            return
        if name == "evalsha" and len(parts) >= 4:
            name = f"evalsha {self._scripts.get(parts[3], parts[3][:8].decode())}"
        self.top[phase][name] += 1


# Commands the benchmark itself sends to the server during a phase.
_OWN = frozenset({"info", "config|resetstat", "echo"})


@dataclass
class PhaseResult:
    phase: Phase
    reports: list[dict[str, Any]]
    commandstats: dict[str, int]
    top: Counter[str]
    nested: int
    wall_s: float
    derived: dict[str, Any] = field(default_factory=dict)

    def derive(self) -> dict[str, Any]:
        local = sum(r["local"] for r in self.reports)
        remote = sum(r["remote"] for r in self.reports)
        decisions = local + remote
        all_commands = sum(n for name, n in self.commandstats.items() if name not in _OWN)
        round_trips = sum(self.top.values())
        ran_s = max(r["ran_s"] for r in self.reports)

        def median_of(key: str) -> float:
            values = sorted(r[key] for r in self.reports if r[key] == r[key])
            return percentile(values, 0.5) if values else float("nan")

        self.derived = {
            "decisions": decisions,
            "decisions_per_s": round(decisions / ran_s),
            "local_share": round(local / decisions, 4),
            "remote_decisions": remote,
            "gate_round_trips": sum(r["round_trips"] for r in self.reports),
            "all_commands": all_commands,
            "all_commands_per_decision": round(all_commands / decisions, 4),
            "round_trips": round_trips,
            "round_trips_per_decision": round(round_trips / decisions, 4),
            "decision_round_trips": self.top["evalsha admit_job"],
            "other_round_trips": round_trips - self.top["evalsha admit_job"],
            "script_commands": self.nested,
            "all_commands_per_s": round(all_commands / self.wall_s, 1),
            "round_trips_per_s": round(round_trips / self.wall_s, 1),
            "round_trips_by_command": dict(self.top.most_common()),
            "commandstats": dict(sorted(self.commandstats.items())),
            "local_p50_us": round(median_of("local_p50_us"), 1),
            "remote_p50_us": round(median_of("remote_p50_us"), 1),
            "remote_p99_us": round(median_of("remote_p99_us"), 1),
            "remote_retry_after_median_s": round(median_of("remote_retry_after_mean_s"), 2),
            "phase_s": self.phase.seconds,
            "wall_s": round(self.wall_s, 2),
            "unexpected": sorted({u for r in self.reports for u in r["unexpected"]}),
        }
        return self.derived


def _commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _run_pollers(url: str, pool: str) -> list[PhaseResult]:
    """Spawn the pollers, run every phase, count what the server executed in each."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(POLLERS + 1)
    results: Queue[list[dict[str, Any]]] = ctx.Queue()
    workers = [
        ctx.Process(
            target=poller,
            args=(url, pool, PHASES, set(ALL_CPUS), barrier, results),
            name=f"poller-{i}",
        )
        for i in range(POLLERS)
    ]
    stats = redis.Redis.from_url(url)
    stats.ping()
    monitor = CommandMonitor(url)
    counted: list[tuple[Phase, dict[str, int], float]] = []
    try:
        for w in workers:
            w.start()
        for phase in PHASES:
            barrier.wait(timeout=300)  # every poller is ready and idle
            stats.config_resetstat()
            stats.echo(f"{MARK}:start:{phase.name}")
            t0 = time.monotonic()
            barrier.wait(timeout=60)  # go
            barrier.wait(timeout=phase.seconds + 60)  # done
            wall_s = time.monotonic() - t0
            stats.echo(f"{MARK}:end:{phase.name}")
            counted.append((phase, _commandstats(stats), wall_s))
            assert monitor.ended(phase.name).wait(30), "MONITOR fell behind"
        reports = [results.get(timeout=60) for _ in workers]
        for w in workers:
            w.join(30)
            assert w.exitcode == 0, f"{w.name} exited with {w.exitcode}"
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        monitor.close()
        stats.close()
    return [
        PhaseResult(
            phase,
            [report[i] for report in reports],
            commandstats,
            monitor.top.get(phase.name, Counter()),
            monitor.nested.get(phase.name, 0),
            wall_s,
        )
        for i, (phase, commandstats, wall_s) in enumerate(counted)
    ]


@pytest.mark.benchmark(group="polling")
def test_polling_redis_commands_per_deferred_decision(
    benchmark: Any, redis_server: RedisProcess
) -> None:
    """16 processes polling try_admit on a full host: Redis commands per decision, per phase."""
    pool = f"bench-poll-{uuid.uuid4().hex[:6]}"
    # Publish the policy and load the scripts before the pollers start (as a
    # running cluster would have them), so no phase pays for that.
    sampler = SimulatedSampler(list(HOST_DEVICES), name="full-host")
    for i, total in enumerate(HOST_DEVICES):
        sampler.set_used(i, total)
    first = Gate(redis_server.url, pool=pool, policy=Policy.from_dict(POLL_POLICY), sampler=sampler)
    try:
        d = first.try_admit("batch", VRAM)
        assert (d.outcome, d.reason, d.local) == (Outcome.DEFER, "vram", False), d
    finally:
        first.close()

    phases = benchmark.pedantic(_run_pollers, args=(redis_server.url, pool), rounds=1, iterations=1)
    derived = {p.phase.name: p.derive() for p in phases}
    benchmark.extra_info.update(
        {
            "pollers": POLLERS,
            "pollers_are": "processes (spawned), unpinned",
            "vram_request": VRAM,
            "policy": POLL_POLICY,
            "phases": derived,
        }
    )
    for name, info in derived.items():
        assert not info["unexpected"], (name, info["unexpected"])
        line = (
            f"{info['decisions']} decisions ({info['decisions_per_s']}/s), "
            f"{info['local_share']:.1%} local; round trips {info['round_trips']} "
            f"({info['decision_round_trips']} admit_job + {info['other_round_trips']} other) = "
            f"{info['round_trips_per_decision']:.4f}/decision ({info['round_trips_per_s']}/s); "
            f"all commands incl. those scripts run {info['all_commands']} = "
            f"{info['all_commands_per_decision']:.4f}/decision ({info['all_commands_per_s']}/s); "
            f"p50 local {info['local_p50_us']} µs, remote {info['remote_p50_us']} µs"
        )
        if name.startswith("precheck"):
            rt = info["round_trips_per_decision"]
            allc = info["all_commands_per_decision"]
            line += (
                f"; target <= {TARGET_COMMANDS_PER_DECISION}: round trips "
                f"{'met' if rt <= TARGET_COMMANDS_PER_DECISION else 'MISSED'}, all commands "
                f"{'met' if allc <= TARGET_COMMANDS_PER_DECISION else 'MISSED'}"
            )
        SUMMARY[f"polling {name}"] = line
    follow = derived["retry_after"]
    retry_s = follow["remote_retry_after_median_s"]
    SUMMARY["polling retry_after, steady state"] = (
        f"one round trip per worker per retry_after (median {retry_s} s):"
        f" about {POLLERS / retry_s:.1f} round trips/s for {POLLERS}"
        " workers, each learning of freed memory up to retry_after late"
    )
    with_pre = derived["precheck_5ms"]
    without = derived["no_precheck_5ms"]
    SUMMARY["polling what the pre-check saves at 5 ms"] = (
        f"round trips per decision {without['round_trips_per_decision']:.3f} -> "
        f"{with_pre['round_trips_per_decision']:.4f}, per second {without['round_trips_per_s']} "
        f"-> {with_pre['round_trips_per_s']}"
    )
