"""``gpugate demo``: workers of two classes compete for two simulated GPUs.

Every worker is a thread with a Gate of its own (as separate worker processes
would have), all on one pool of a real Redis (the embedded one by default)
and one :class:`SimulatedSampler`, so a job's memory shows in the samples once
it "allocates". Midway an operator pauses ``batch`` for a few seconds; the
pause reverts by itself. The demo prints each decision that is not a plain
admit (a DEFER when its reason changes, an ADMIT that waited, a REJECT) and
ends with a summary: admissions and deferrals per class and reason,
the peak memory per GPU, and OOMs (jobs that would not have fit).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from .._exceptions import BackendError
from .._units import format_size
from ..admission import Gate, Outcome
from ..policy import Policy
from ..sampling import SimulatedSampler
from ..state._keys import PoolKeys

GiB = 1 << 30

DEMO_POLICY = {
    "pool": {
        "lease_ttl": "5s",
        "safety_margin": "1GiB",
        "placement": "best-fit",
        "waiter_ttl": "3s",
    },
    "classes": {
        "interactive": {"priority": 100, "max_concurrent": 4, "reserve": "4GiB"},
        "batch": {"priority": 10, "max_concurrent": 3, "rate": "4/s", "burst": 2},
    },
}

# (class, VRAM choices in GiB, job seconds)
WORKLOADS = {
    "interactive": ([2, 4, 6], (0.2, 0.8)),
    "batch": ([6, 10, 14], (0.8, 2.0)),
}


@dataclass
class DemoReport:
    """What the demo saw."""

    decisions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    jobs_done: Counter[str] = field(default_factory=Counter)
    waited_s: dict[str, list[float]] = field(default_factory=dict)
    peak_used: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    ooms: int = 0


class _Demo:
    def __init__(
        self, url: str | None, seconds: float, workers: int, echo: Callable[[str], None], seed: int
    ) -> None:
        self.url = url
        self.seconds = seconds
        self.workers = workers
        self.echo = echo
        self.rng = random.Random(seed)
        self.pool = f"demo-{uuid.uuid4().hex[:6]}"
        self.policy = Policy.from_dict(DEMO_POLICY)
        self.sampler = SimulatedSampler(["24GiB", "24GiB"], name=self.pool)
        self.report = DemoReport(totals=dict.fromkeys(self.sampler.uuids, 24 * GiB))
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.stop = threading.Event()
        self.output_closed = False

    def log(self, who: str, text: str) -> None:
        with self.lock:
            if self.output_closed:
                return
            try:
                self.echo(f"{time.monotonic() - self.start:6.2f}s  {who:<14} {text}")
            except BrokenPipeError:
                # `gpugate demo | head`: the reader is gone; the run ends, and
                # the main thread's next line ends the command quietly (141).
                self.output_closed = True
                self.stop.set()

    def worker(self, name: str, cls: str) -> None:
        gate = Gate(self.url, pool=self.pool, policy=self.policy, sampler=self.sampler)
        rng = random.Random(self.rng.random())
        sizes, (lo, hi) = WORKLOADS[cls]
        try:
            while not self.stop.is_set():
                vram = rng.choice(sizes) * GiB
                asked = time.monotonic()
                last_reason = None
                while not self.stop.is_set():
                    d = gate.try_admit(cls, vram=vram)
                    with self.lock:
                        self.report.decisions[(cls, d.outcome.value, d.reason)] += 1
                    if d.outcome is Outcome.ADMIT:
                        break
                    if d.reason != last_reason:
                        room = (
                            ""
                            if d.available is None
                            else f", {format_size(max(0, d.available))} free"
                        )
                        self.log(
                            name,
                            f"{d.outcome.value.upper():<6} {format_size(vram):>6}  {d.reason:<9}"
                            f" retry in {d.retry_after:.2f}s  ({d.detail}{room})",
                        )
                        last_reason = d.reason
                    if d.outcome is Outcome.REJECT:
                        break
                    self.stop.wait(min(d.retry_after, 0.5))
                else:
                    break
                if d.outcome is not Outcome.ADMIT or d.lease is None:
                    continue
                waited = time.monotonic() - asked
                with self.lock:
                    self.report.waited_s.setdefault(cls, []).append(waited)
                if last_reason is not None:  # a plain admit is not news
                    self.log(
                        name,
                        f"ADMIT  {format_size(vram):>6}  on GPU {d.device}"
                        f" after waiting {waited:.2f}s",
                    )
                self.run_job(d.lease, d.device or 0, vram, rng.uniform(lo, hi))
                with self.lock:
                    self.report.jobs_done[cls] += 1
        finally:
            gate.close()

    def run_job(self, lease: object, device: int, vram: int, seconds: float) -> None:
        from ..admission import Lease

        assert isinstance(lease, Lease)
        snap = self.sampler.sample()
        dev = snap.devices[device]
        if dev.used + vram > dev.total:  # what a real GPU would answer with CUDA OOM
            with self.lock:
                self.report.ooms += 1
        self.sampler.allocate(device, vram)
        lease.report_vram(vram)
        with self.lock:
            used = self.sampler.sample().devices[device].used
            self.report.peak_used[dev.uuid] = max(self.report.peak_used.get(dev.uuid, 0), used)
        self.stop.wait(seconds)
        self.sampler.free(device, vram)
        lease.release("ok")

    def operator(self, gate: Gate) -> None:
        if self.stop.wait(self.seconds * 0.4):
            return
        # Short enough to revert within the run (3 s in the default 10 s run).
        pause_s = round(min(3.0, max(0.5, self.seconds * 0.3)), 1)
        try:
            gate.pause(
                "batch", duration=pause_s, reason=f"demo: operator drains batch for {pause_s:g} s"
            )
        except BackendError as exc:
            self.log("operator", f"PAUSE  batch failed: {exc}")
            return
        self.log("operator", f"PAUSE  batch for {pause_s:g}s (reverts by itself)")
        if not self.stop.wait(pause_s):
            self.log("operator", "RESUME batch: its pause expired, nobody lifted it")

    def run(self) -> DemoReport:
        control = Gate(
            self.url, pool=self.pool, policy=self.policy, sampler=self.sampler, register=False
        )
        try:
            # Redis unreachable: one line from the CLI, not a run of deferrals.
            control.sync_policy()
        except BaseException:
            control.close()
            raise
        where = "embedded Redis (this host only)" if control.embedded else control.redis_url
        self.echo(f"gpugate demo: pool {self.pool} on {where}; two simulated 24 GiB GPUs")
        self.echo(
            "policy: interactive priority 100, cap 4, 4 GiB reserved; "
            "batch priority 10, cap 3, 4/s burst 2"
        )
        self.echo("")
        classes = ["interactive", "batch"]
        threads = [
            threading.Thread(
                target=self.worker,
                args=(f"{classes[i % 2]}-{i // 2 + 1}", classes[i % 2]),
                daemon=True,
            )
            for i in range(self.workers)
        ]
        threads.append(threading.Thread(target=self.operator, args=(control,), daemon=True))
        for t in threads:
            t.start()
        self.stop.wait(self.seconds)
        self.stop.set()
        for t in threads:
            t.join(10)
        self._cleanup(control)
        return self.report

    def _cleanup(self, control: Gate) -> None:
        """Delete the demo's pool, on the Redis the demo used (an embedded one
        stopped meanwhile is not started again for this)."""
        try:
            client = control.client
            keys = list(client.scan_iter(match=PoolKeys(self.pool).prefix + "*", count=500))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass  # Redis gone: nothing of the pool is left to see
        finally:
            control.close()


def run_demo(
    *,
    redis_url: str | None = None,
    seconds: float = 10.0,
    workers: int = 6,
    echo: Callable[[str], None] = print,
    seed: int = 7,
) -> DemoReport:
    """Run the demo and print what happened; returns the counts it printed."""
    demo = _Demo(redis_url, seconds, workers, echo, seed)
    report = demo.run()
    echo("")
    echo("summary")
    for cls in ("interactive", "batch"):
        waits = sorted(report.waited_s.get(cls, [0.0]))
        p50 = waits[len(waits) // 2]
        p95 = waits[min(len(waits) - 1, int(len(waits) * 0.95))]
        echo(
            f"  {cls:<12} jobs done {report.jobs_done[cls]:>3}   "
            f"wait p50 {p50:5.2f}s  p95 {p95:5.2f}s"
        )
        reasons = Counter(
            {r: n for (c, o, r), n in report.decisions.items() if c == cls and o != "admit"}
        )
        if reasons:
            echo(
                "               not admitted: "
                + ", ".join(f"{r} x{n}" for r, n in reasons.most_common())
            )
    for dev_uuid, total in report.totals.items():
        peak = format_size(report.peak_used.get(dev_uuid, 0))
        echo(f"  {dev_uuid:<22} peak {peak:>8} of {format_size(total)}")
    echo(f"  OOMs: {report.ooms} (jobs that started where their memory did not fit)")
    return report
