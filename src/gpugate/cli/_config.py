"""``gpugate config check FILE``: validate a policy file and say what it sets.

Nothing touches Redis: this is the check to run in CI before
``gpugate policy apply FILE``. A mistake is one line naming the file, the
dotted key, the value and the fix (exit 2).
"""

from __future__ import annotations

from .._units import format_duration, format_rate, format_size
from ..policy import Policy
from ._common import out


def check_config(path: str) -> int:
    """Load ``path`` as a policy; print its version, pool settings and classes."""
    p = Policy.from_file(path)
    pool = p.pool
    out(f"{path}: ok, policy version {p.version}")
    out(
        f"  pool: lease_ttl {format_duration(pool.lease_ttl_s)}, "
        f"safety_margin {format_size(pool.safety_margin)}, placement {pool.placement}, "
        f"sample_max_age {format_duration(pool.sample_max_age_s)}, "
        f"waiter_ttl {format_duration(pool.waiter_ttl_s)}, "
        f"retry_max {format_duration(pool.retry_max_s)}"
        + (
            ""
            if not pool.priority_aging
            else f", priority_aging {format_rate(pool.priority_aging)}"
        )
        + ("" if pool.max_per_device is None else f", max_per_device {pool.max_per_device}")
    )
    for name, c in p.classes.items():
        parts = [f"priority {c.priority}"]
        if c.max_concurrent is not None:
            parts.append(f"max_concurrent {c.max_concurrent}")
        if c.max_per_device is not None:
            parts.append(f"max_per_device {c.max_per_device}")
        if c.rate is not None:
            parts.append(f"rate {format_rate(c.rate)} burst {c.burst}")
        if c.reserve:
            parts.append(f"reserve {format_size(c.reserve)}")
        if c.max_duration_s is not None:
            parts.append(f"max_duration {format_duration(c.max_duration_s)}")
        if c.max_duration_contended_s is not None:
            parts.append(f"max_duration_contended {format_duration(c.max_duration_contended_s)}")
        if c.max_fragmentation is not None:
            parts.append(f"max_fragmentation {c.max_fragmentation:g}")
        parts.append(f"no_gpu {c.no_gpu}")
        if c.on_backend_error != "closed":
            parts.append(f"on_backend_error {c.on_backend_error}")
        if c.queues:
            parts.append(f"Asynq queues {', '.join(c.queues)}")
        top = " (highest: kept running by `gpugate drain`)" if name in p.highest_classes else ""
        out(f"  class {name}: {', '.join(parts)}{top}")
    return 0
