"""Where the server's time goes in admit_job.lua, for a DEFER on a class at its cap.

Not a pytest benchmark: run it by hand, on a quiet machine.

    PYTHONPATH=src python benchmarks/lua_breakdown.py [ROUNDS]

Registers copies of the script cut short after successive stretches (a
``do return 1 end`` inserted after a marker line), sends each the KEYS and
ARGV of a real decision, and reads the server's µs per call from ``INFO
commandstats``; the copies run in turns, round after round. Each line's step
is what that stretch adds. The markers are regular expressions on the
script's lines: when the script changes they may need to follow.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import resources

from _rig import (
    SERVER_CPU,
    decision_arguments,
    evalsha_stats,
    in_turns,
    make_gate,
    pin_all_threads,
)
from gpugate.state._scripts import script_source
from gpugate.state._server import RedisProcess

# (label, regex of a line, where the copy returns: "after" that line, "before"
# it, or after the "end" closing the block it opens); None: the no-op script;
# "": the whole script.
CUTS: list[tuple[str, str | None, str]] = [
    ("no-op script, same KEYS/ARGV", None, ""),
    ("prelude + ARGV locals", r"^local n_samples", "after"),
    ("+ HMGET state", r"^now = script_now", "before"),
    ("+ TIME (script_now)", r"^now = script_now", "after"),
    ("+ parse pool/class records", r"^burst, reserve_above", "after"),
    ("+ reap check (next_exp bound)", r"^if reaped > 0", "block"),
    ("+ closures, overrides", r"^-- Candidate devices", "before"),
    ("+ samples (HMGET, loop, HSET)", r"^if #fresher > 0", "after"),
    ("+ GPU presence, never-fits", r"^-- Class cap", "before"),
    ("+ cap test + DEFER (waiter HGET + HSET)", r"^if reply\[1\] then", "before"),
    ("whole script: + answer count (HINCRBY)", "", ""),
]
CALLS = 400


def _cut_at(body: list[str], pattern: str, where: str) -> int:
    for i, line in enumerate(body):
        if re.search(pattern, line):
            if where == "before":
                return i
            if where == "block":
                while body[i].strip() != "end":
                    i += 1
            return i + 1
    raise SystemExit(f"marker {pattern!r} not found in admit_job.lua: update CUTS")


def main(rounds: int) -> None:
    lua = resources.files("gpugate") / "lua"
    prelude = (lua / "_prelude.lua").read_text(encoding="utf-8")
    body = (lua / "admit_job.lua").read_text(encoding="utf-8").split("\n")
    with RedisProcess().start() as server:
        assert server.pid is not None
        pin_all_threads(server.pid, {SERVER_CPU})
        os.sched_setaffinity(0, {SERVER_CPU})
        gate = make_gate(server.url, "lua-breakdown")
        assert gate.try_admit("capped", 1).reason == "cap"
        keys, args = decision_arguments(gate)
        client = gate._client
        scripts = {}
        for label, pattern, where in CUTS:
            if pattern is None:
                source = "return 1"
            elif pattern == "":
                source = script_source("admit_job")
            else:
                at = _cut_at(body, pattern, where)
                source = prelude + "\n" + "\n".join([*body[:at], "do return {} end", *body[at:]])
            scripts[label] = client.register_script(source)
        usec: dict[str, list[float]] = {label: [] for label in scripts}
        labels = list(scripts)
        for label in in_turns(labels, rounds):
            script = scripts[label]
            c0, u0 = evalsha_stats(client)
            for _ in range(CALLS):
                script(keys=keys, args=args)
            c1, u1 = evalsha_stats(client)
            usec[label].append((u1 - u0) / (c1 - c0))
        gate.close()
    previous = None
    print(f"server µs per call, median of {rounds} rounds of {CALLS} calls (min in brackets)")
    for label, values in usec.items():
        values.sort()
        median = values[len(values) // 2]
        step = f"  step {median - previous:+6.1f}" if previous is not None else ""
        print(f"{label:46s} {median:7.1f} ({values[0]:6.1f}){step}")
        previous = median


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
