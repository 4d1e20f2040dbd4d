"""The policy as the Lua scripts read it: one record string per pool and class.

Scripts parse space-separated records with one ``string.match``, several
times cheaper than decoding JSON on every decision. The field order is the
one documented in ``lua/_prelude.lua``; this is the only writer.
"""

from __future__ import annotations

import json

from ..policy import Policy


def _num(value: float) -> str:
    # repr() of a float round-trips exactly and Lua's tonumber reads it.
    return str(value) if isinstance(value, int) else repr(float(value))


def pool_record(policy: Policy) -> str:
    """The pool record.

    ``margin ttl_ms placement max_age_ms waiter_ttl_ms aging_per_ms retry_max_ms max_per_device``.
    """
    p = policy.to_wire()["pool"]
    return " ".join(
        _num(v) if not isinstance(v, str) else v
        for v in (
            p["margin"], p["ttl_ms"], p["placement"], p["max_age_ms"],
            p["waiter_ttl_ms"], p["aging_per_ms"], p["retry_max_ms"], p["max_per_device"],
        )
    )  # fmt: skip


def class_records(policy: Policy) -> dict[str, str]:
    """The class records, per class.

    ``prio cap dev_cap rate_per_ms burst reserve_above max_ms max_contended_ms no_gpu
    max_frag``.
    """
    wire = policy.to_wire()["classes"]
    out = {}
    for name, c in wire.items():
        fields = (
            c["prio"], c["cap"], c["dev_cap"], c["rate_per_ms"], c["burst"],
            policy.reserve_above(name), c["max_ms"], c["max_contended_ms"],
        )  # fmt: skip
        out[name] = " ".join(_num(v) for v in fields) + f" {c['no_gpu']} {_num(c['max_frag'])}"
    return out


def publish_args(policy: Policy, *, prefix: str, mode: str, clock_ms: int) -> list[str]:
    """ARGV for ``publish_policy.lua`` (``prefix``: the pool's key prefix;
    ``mode``: its ARGV[3]; ``clock_ms`` 0: Redis TIME)."""
    classes = class_records(policy)
    args = [
        prefix,
        policy.version,
        mode,
        str(clock_ms),
        json.dumps(policy.to_dict(), separators=(",", ":")),
        " ".join(classes),
        pool_record(policy),
    ]
    for name, record in classes.items():
        args += [name, record]
    return args
