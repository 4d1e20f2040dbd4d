"""Where the server's time goes in admit_job.lua, stretch by stretch, for a
cap DEFER, a VRAM DEFER and an ADMIT made by a real gate.

Not a pytest benchmark: run it by hand, on a quiet machine.

    PYTHONPATH=src:benchmarks python benchmarks/lua_profile.py [DECISIONS]

The gates run an instrumented copy of the script: before each marker line a
``MARK`` reads Redis ``TIME`` (µs), and at the end the script adds each
stretch's µs to a scratch hash. Unlike ``lua_breakdown.py`` (copies cut
short, a cap DEFER only), every path runs whole, in its steady state: the
ADMIT loop releases each lease before the next decision, so every ADMIT ends
the ghost the previous release left, as in the latency benchmark. A MARK
costs about one ``TIME`` call; MARKs with nothing between measure that cost
(the lesser of two such stretches), and it is taken off every stretch.
Stretches a path does not reach are not shown; "end of decide" is from the
last MARK reached to the reply.
The markers are regular expressions on top-level lines of ``decide()``:
when the script changes they may need to follow.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

import gpugate.state._scripts as scripts_module
from _rig import SERVER_CPU, GiB, fill, make_gate, pin_all_threads
from gpugate.state._server import RedisProcess

# (label of the stretch that ENDS at the marker, regex of the marker line)
MARKERS: list[tuple[str, str]] = [
    ("state HMGET", r"^now = script_now"),
    ("TIME (script_now)", r"^if not st\[2\]"),
    ("parse pool/class records", r"^-- A DEFER or REJECT writes"),
    ("reap check", r"^-- An estimated retry"),
    ("closures, overrides", r"^-- Candidate devices"),
    ("samples (HMGET, loop, HSET)", r"^-- GPU presence"),
    ("presence, never-fits, cap", r"^-- Per-device caps"),
    ("per-device counts HMGET", r"^local slotted = \{\}"),
    ("per-device caps loop", r"^-- Devices that a live waiter"),
    ("waiters HGETALL + loop", r"^-- Ghosts end once"),
    ("ghosts", r"^-- VRAM per device"),
    ("VRAM loop", r"^-- Memory sums changed above"),
    ("closures", r"^if best == nil then"),
    ("token bucket", r"^-- The lease; its id"),
    ("lease record", r"^redis.call\('HSET', prefix \.\. 'dev:'"),
    ("lease HSET", r"^redis.call\('ZADD', exp_key"),
    ("expiry ZADD", r"^local more = dirty_fields"),
    ("dirty memory sums", r"^redis.call\('HSET', state_key, 'seq'"),
    ("state HSET", r"^if waiting then redis.call"),
]
SCRATCH = "gpugate-lua-profile"
HEAD = """
local __marks = {}
local function MARK(label)
  local t = redis.call('TIME')
  __marks[#__marks + 1] = label
  __marks[#__marks + 1] = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
MARK('start')
MARK('(a MARK)')
MARK('(a MARK, again)')
"""
TAIL = f"""MARK('answer count (HINCRBY)')
for i = 3, #__marks, 2 do
  redis.call('HINCRBY', '{SCRATCH}', __marks[i], __marks[i + 1] - __marks[i - 1])
end
redis.call('HINCRBY', '{SCRATCH}', '#', 1)
return reply"""


def instrumented(source: str) -> str:
    """admit_job's full source (prelude included) with the MARKs put in."""
    lines = source.split("\n")
    found = {label: False for label, _ in MARKERS}
    out: list[str] = []
    for line in lines:
        for label, pattern in MARKERS:
            if re.search(pattern, line):
                out.append(f"MARK('{label}')")
                found[label] = True
        if line == "return reply":
            out.append(TAIL)
            continue
        out.append(line)
        if line == "local now":
            out.append(HEAD)
        elif line.startswith("local reply = decide()"):
            out.append("MARK('end of decide')")
    missing = [label for label, ok in found.items() if not ok]
    if missing or TAIL not in out or HEAD not in out:
        what = missing or "the head or the tail"
        raise SystemExit(f"not found in admit_job.lua: {what}: update MARKERS")
    return "\n".join(out)


@contextmanager
def profiled_admit_job() -> Iterator[None]:
    """Gates made inside the block load the instrumented admit_job."""
    real = scripts_module.script_source

    def source(name: str) -> str:
        text = real(name)
        return instrumented(text) if name == "admit_job" else text

    scripts_module.script_source = source  # type: ignore[assignment]
    try:
        yield
    finally:
        scripts_module.script_source = real


def collect(client: redis.Redis) -> tuple[int, dict[str, float]]:
    raw = {k.decode(): int(v) for k, v in client.hgetall(SCRATCH).items()}
    client.delete(SCRATCH)
    calls = raw.pop("#", 0)
    return calls, {label: usec / calls for label, usec in raw.items()} if calls else {}


def show(title: str, calls: int, per_call: dict[str, float]) -> None:
    mark = min(per_call.pop("(a MARK)", 0.0), per_call.pop("(a MARK, again)", 0.0))
    net = {label: max(0.0, usec - mark) for label, usec in per_call.items()}
    print(f"\n{title}: {calls} decisions; server µs per decision, less a MARK ({mark:.1f} µs)")
    for label, usec in net.items():
        print(f"  {label:32s} {usec:6.1f}")
    print(f"  {'sum (script body)':32s} {sum(net.values()):6.1f}")


def run(decisions: int) -> None:
    with RedisProcess().start() as server, profiled_admit_job():
        assert server.pid is not None
        pin_all_threads(server.pid, {SERVER_CPU})
        os.sched_setaffinity(0, {SERVER_CPU})
        gate = make_gate(server.url, "lua-profile")
        vram_gate = make_gate(server.url, "lua-profile-vram")
        held = fill(vram_gate, 20, 79 * GiB)  # 10 leases per device, 1 GiB left on each
        client = gate._client

        def defer_cap() -> Any:
            return gate.try_admit("capped", 1)

        def defer_vram() -> Any:
            return vram_gate.try_admit("batch", 2 * GiB)

        def admit() -> Any:
            d = gate.try_admit("batch", 1)
            d.lease.release()
            return d

        for title, call, reason in (
            ("DEFER on the class cap", defer_cap, "cap"),
            ("DEFER on VRAM, 10 leases per device", defer_vram, "vram"),
            ("ADMIT (each lease released before the next decision)", admit, "ok"),
        ):
            for _ in range(200):  # warm up, then count afresh
                assert call().reason == reason
            client.delete(SCRATCH)
            for _ in range(decisions):
                call()
            show(title, *collect(client))
        for lease in held:
            lease.release()
        gate.close()
        vram_gate.close()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
