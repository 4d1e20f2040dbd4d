"""Hypothesis strategies for gpugate's values, shared by the test modules.

Plain functions that return strategies, each named for what it draws; add new
ones anywhere below.
"""

from __future__ import annotations

from hypothesis import strategies as st

from gpugate.policy import ClassPolicy, Policy, PoolSettings

GiB = 1024**3


def class_names() -> st.SearchStrategy[str]:
    """Names a class may have: ``[a-z][a-z0-9_-]{0,31}``."""
    return st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True)


def sizes() -> st.SearchStrategy[int]:
    """Byte counts, round ones and arbitrary ones."""
    return st.one_of(
        st.sampled_from([0, 1024, 512 * 1024**2, 4 * GiB, 8 * GiB, 80 * GiB]),
        st.integers(min_value=0, max_value=2**44),
    )


def durations() -> st.SearchStrategy[float]:
    """Seconds a policy accepts as a positive duration (1ms or more)."""
    return st.one_of(
        st.sampled_from([0.001, 0.25, 1.0, 5.0, 30.0, 90.0, 5400.0, 28800.0]),
        st.integers(min_value=1, max_value=10**9).map(lambda ms: ms / 1000),
        st.floats(min_value=0.001, max_value=1e7, allow_nan=False, allow_infinity=False),
    )


def rates() -> st.SearchStrategy[float]:
    """Positive event rates, per second."""
    return st.one_of(
        st.sampled_from([0.1, 1.0, 2.5, 10.0, 100 / 60, 1 / 3600]),
        st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False),
    )


def priorities() -> st.SearchStrategy[int]:
    """Class priorities, often tied."""
    return st.one_of(
        st.sampled_from([0, 10, 50, 100]), st.integers(min_value=0, max_value=1_000_000)
    )


def pool_settings() -> st.SearchStrategy[PoolSettings]:
    """Valid ``[pool]`` settings."""
    return st.builds(
        PoolSettings,
        safety_margin=sizes(),
        lease_ttl_s=durations(),
        placement=st.sampled_from(["best-fit", "spread"]),
        sample_max_age_s=durations(),
        waiter_ttl_s=durations(),
        priority_aging=st.one_of(st.just(0.0), rates()),
        retry_max_s=durations(),
        max_per_device=st.none() | st.integers(min_value=0, max_value=64),
    )


@st.composite
def class_policies(draw: st.DrawFn, name: str | None = None) -> ClassPolicy:
    """Valid class policies, named *name* or a drawn name."""
    rate = draw(st.none() | rates())
    burst = None if rate is None else draw(st.none() | st.integers(min_value=1, max_value=1000))
    bound = draw(st.none() | durations())
    contended = draw(st.none() | durations())
    if bound is not None and contended is not None and contended > bound:
        bound, contended = contended, bound
    return ClassPolicy(
        name=draw(class_names()) if name is None else name,
        priority=draw(priorities()),
        max_concurrent=draw(st.none() | st.integers(min_value=0, max_value=1000)),
        max_per_device=draw(st.none() | st.integers(min_value=0, max_value=64)),
        rate=rate,
        burst=burst,
        reserve=draw(sizes()),
        max_duration_s=bound,
        max_duration_contended_s=contended,
        max_fragmentation=draw(st.none() | st.floats(min_value=0, max_value=1)),
        no_gpu=draw(st.sampled_from(["defer", "reject", "cpu"])),
        on_backend_error=draw(st.sampled_from(["closed", "open"])),
    )


def policies(max_classes: int = 5) -> st.SearchStrategy[Policy]:
    """Valid policies with one to *max_classes* classes."""
    classes = st.lists(
        class_policies(), min_size=1, max_size=max_classes, unique_by=lambda c: c.name
    ).map(lambda drawn: {c.name: c for c in drawn})
    return st.builds(Policy, pool_settings(), classes)
