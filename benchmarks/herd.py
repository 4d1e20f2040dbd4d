"""Many blocked admissions in one process: how many decisions their wake-ups cost.

Not a pytest benchmark: run it by hand.

    PYTHONPATH=src python benchmarks/herd.py [WAITERS] [threads|asyncio] [HOLD_MS] [CAP]

``WAITERS`` blocking admissions of one class (``admit`` in threads, or
``admit_async`` tasks on one event loop) share one gate on a pool whose class
admits ``CAP`` at a time; each holds its lease ``HOLD_MS`` and releases it.
Every release wakes the gate's waiters. The script prints the wall time
against the ideal (``WAITERS / CAP x HOLD_MS``) and the decisions the gate
sent to Redis per admission (from its own ``gpugate_decisions_total``).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from prometheus_client import CollectorRegistry

from gpugate import Gate, Policy, SimulatedSampler
from gpugate.metrics import Metrics
from gpugate.state._server import RedisProcess


def decisions(registry: CollectorRegistry) -> int:
    total = 0.0
    for family in registry.collect():
        if family.name == "gpugate_decisions":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(total)


def main() -> None:
    waiters = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    mode = sys.argv[2] if len(sys.argv) > 2 else "threads"
    hold_s = (float(sys.argv[3]) if len(sys.argv) > 3 else 10.0) / 1000
    cap = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    policy = Policy.from_dict(
        {
            "pool": {"lease_ttl": "30s", "safety_margin": 0},
            "classes": {"batch": {"priority": 10, "max_concurrent": cap}},
        }
    )
    with RedisProcess() as server:
        registry = CollectorRegistry()
        gate = Gate(
            server.url,
            pool="herd",
            policy=policy,
            sampler=SimulatedSampler(["80GiB", "80GiB"]),
            metrics=Metrics(registry),
        )
        started = time.perf_counter()
        if mode == "threads":

            def job() -> None:
                with gate.admit("batch", vram="1GiB", timeout=600):
                    time.sleep(hold_s)

            threads = [threading.Thread(target=job) for _ in range(waiters)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:

            async def job_async() -> None:
                async with gate.admit_async("batch", vram="1GiB", timeout=600):
                    await asyncio.sleep(hold_s)

            async def all_jobs() -> None:
                await asyncio.gather(*(job_async() for _ in range(waiters)))

            asyncio.run(all_jobs())
        wall = time.perf_counter() - started
        sent = decisions(registry)
        gate.close()
    ideal = waiters / cap * hold_s
    print(
        f"{waiters} waiters ({mode}), cap {cap}, hold {hold_s * 1000:g} ms: "
        f"{wall:.2f} s (ideal {ideal:.2f} s, {wall / ideal:.1f}x), "
        f"{sent} decisions ({sent / waiters:.1f} per admission)"
    )


if __name__ == "__main__":
    main()
