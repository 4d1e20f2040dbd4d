"""How close to the floor a decision could come on this machine: skeleton scripts.

Not a pytest benchmark: run it by hand, on a quiet machine.

    PYTHONPATH=src python benchmarks/lower_bound.py [ROUNDS]

The issue's target is a ``try_admit`` within 1.3x a no-op EVALSHA (the
floor) at p50. This prices the Redis work the issue itself asks of a
decision, with nothing else around it: *skeleton* scripts that run only the
commands a decision cannot do without, on the gate's own connection (its
lane), with a decision's own KEYS and ARGV, and no parsing, no policy, no
Python decision:

* skeleton DEFER (a class at its cap): Redis ``TIME``; one ``HMGET`` of the
  pool state (overrides, the class count, the reaping bound); the waiter
  entry every DEFER registers (``HSET``).
* skeleton ADMIT: the same read, the waiters for priority (``HGETALL``),
  then the lease (``HSET``), its expiry (``ZADD``) and the counters
  (``HSET``), rewritten in place so the pool does not grow.

Every call is timed end to end (``perf_counter_ns``), all variants in turns,
round after round, the server and this process on CPU 0 (as the latency
benchmarks run). Each line gives the p50 and its ratio to the floor; the
last lines say what the skeletons leave of the target's budget for
everything else (gpugate's Python, the samples, the policy, the VRAM check).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from _rig import (
    SERVER_CPU,
    decision_arguments,
    in_turns,
    make_gate,
    percentile,
    pin_all_threads,
)
from gpugate import Lease
from gpugate.state._server import RedisProcess

SKELETON_DEFER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cls = ARGV[3]
redis.call('HMGET', KEYS[1], 'clock', 'pool', 'c:' .. cls, 'pause:' .. cls, 'cap:' .. cls,
           'n:' .. cls, 'seq', 'next_exp')
redis.call('HSET', KEYS[3], ARGV[5],
           '10 ' .. now .. ' 1 - ' .. (now + 5000) .. ' - ' .. cls .. ' cap')
return {'defer', 'cap', 1000, '', '', 0, 'class at its cap', -1}
"""

SKELETON_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cls, uuid = ARGV[3], ARGV[10]
redis.call('HMGET', KEYS[1], 'clock', 'pool', 'c:' .. cls, 'pause:' .. cls, 'cap:' .. cls,
           'n:' .. cls, 'seq', 'next_exp')
redis.call('HGETALL', KEYS[3])
redis.call('HSET', ARGV[1] .. 'skeleton:' .. uuid, '1',
           '1 0 0 0 ' .. cls .. ' ' .. now .. ' 0 o 0 -')
redis.call('ZADD', ARGV[1] .. 'skeleton-exp', now + 5000, uuid .. '\\t1')
redis.call('HSET', ARGV[1] .. 'skeleton-state', 'seq', 1, 'clock', now, 'n:' .. cls, 1,
           'd:' .. cls .. ':' .. uuid, 1, 'd::' .. uuid, 1, 'm:' .. uuid, '1 0 0 0')
return {'admit', 'ok', 0, uuid, '1', now + 5000, '', 1}
"""

BATCH = 25
WARMUP_CALLS = 2


def main(rounds: int) -> None:
    with RedisProcess().start() as server:
        assert server.pid is not None
        pin_all_threads(server.pid, {SERVER_CPU})
        os.sched_setaffinity(0, {SERVER_CPU})
        gate = make_gate(server.url, "lower-bound")
        client = gate._client
        lane = gate._scripts._lane
        assert lane is not None, "the lane serves plain Redis clients only"
        defer_keys, defer_args = decision_arguments(gate, "capped")
        admit_keys, admit_args = decision_arguments(gate, "batch")
        noop = client.register_script("return 1")
        noop()
        shas = {
            "noop": noop.sha,
            "defer": client.script_load(SKELETON_DEFER),
            "admit": client.script_load(SKELETON_ADMIT),
        }

        def on_lane(sha: str, keys: list[str], args: list[Any]) -> Callable[[], Any]:
            def call() -> Any:
                return lane.call(sha, keys, args)

            return call

        held: list[Lease] = []

        def admit() -> None:
            d = gate.try_admit("batch", 1)
            assert d.lease is not None
            held.append(d.lease)

        variants: dict[str, Callable[[], Any]] = {
            "floor: no-op EVALSHA through redis-py": noop,
            "no-op on the lane, no arguments": on_lane(shas["noop"], [], []),
            "no-op on the lane, a decision's KEYS/ARGV": on_lane(
                shas["noop"], defer_keys, defer_args
            ),
            "skeleton DEFER on the lane": on_lane(shas["defer"], defer_keys, defer_args),
            "skeleton ADMIT on the lane": on_lane(shas["admit"], admit_keys, admit_args),
            "gpugate try_admit, DEFER on cap": lambda: gate.try_admit("capped", 1),
            "gpugate try_admit, ADMIT": admit,
        }
        assert on_lane(shas["defer"], defer_keys, defer_args)()[0] == b"defer"
        assert on_lane(shas["admit"], admit_keys, admit_args)()[0] == b"admit"
        times: dict[str, list[int]] = {name: [] for name in variants}
        names = list(variants)
        for name in in_turns(names, rounds):
            call = variants[name]
            for i in range(BATCH):
                t0 = time.perf_counter_ns()
                call()
                elapsed = time.perf_counter_ns() - t0
                if i >= WARMUP_CALLS:
                    times[name].append(elapsed)
            while held:
                held.pop().release()
        gate.close()
    p50 = {name: percentile(sorted(v), 0.5) / 1000 for name, v in times.items()}
    floor = p50[names[0]]
    print(f"p50 µs of {rounds} rounds of {BATCH} calls per variant, in turns; ratio to the floor")
    for name in names:
        print(f"{name:44s} {p50[name]:7.1f}  {p50[name] / floor:5.2f}x")
    budget = 1.3 * floor
    for kind in ("DEFER", "ADMIT"):
        skeleton = p50[f"skeleton {kind} on the lane"]
        print(
            f"target 1.3x = {budget:.1f} µs; the skeleton {kind} leaves "
            f"{budget - skeleton:+.1f} µs for everything else"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
