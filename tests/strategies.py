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
        lease_ttl_s=durations().filter(lambda s: s >= 1.0),
        placement=st.sampled_from(["best-fit", "spread"]),
        sample_max_age_s=durations(),
        waiter_ttl_s=durations().filter(lambda s: s >= 0.2),
        priority_aging=st.one_of(st.just(0.0), rates()),
        retry_max_s=durations().filter(lambda s: s >= 0.1),
        max_per_device=st.none() | st.integers(min_value=1, max_value=64),
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
    name = draw(class_names()) if name is None else name
    # Prefixed with the class name: a queue belongs to one class only.
    queues = draw(st.lists(st.text(min_size=1, max_size=8), max_size=3, unique=True))
    return ClassPolicy(
        name=name,
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
        queues=tuple(f"{name}/{q}" for q in queues),
    )


def policies(max_classes: int = 5) -> st.SearchStrategy[Policy]:
    """Valid policies with one to *max_classes* classes."""
    classes = st.lists(
        class_policies(), min_size=1, max_size=max_classes, unique_by=lambda c: c.name
    ).map(lambda drawn: {c.name: c for c in drawn})
    return st.builds(Policy, pool_settings(), classes)


# -- steps for the stateful admission tests (tests/test_stateful.py) ----------
#
# Their gates see two simulated 40 GiB devices and a policy with the classes
# "interactive", "notebook" and "batch"; the sizes below straddle what each
# class may ever hold there (38, 34 and 32 GiB: 40 less the margin and the
# reserves of the classes above).

ADMISSION_CLASSES = ("interactive", "notebook", "batch")


def request_sizes() -> st.SearchStrategy[int]:
    """VRAM requests in bytes: small, large, and too large for some classes."""
    return st.sampled_from([1 * GiB, 5 * GiB, 10 * GiB, 20 * GiB, 33 * GiB, 36 * GiB, 45 * GiB])


def device_usages() -> st.SearchStrategy[int]:
    """Memory in use on a simulated 40 GiB device as its sampler reports it, in bytes."""
    return st.sampled_from([0, 3 * GiB, 12 * GiB, 28 * GiB, 30 * GiB])


def clock_steps_ms() -> st.SearchStrategy[int]:
    """Forward steps of a fake script clock, in ms, around the edges of a
    100 ms sample refresh, a 4 s waiter TTL and a 10 s lease TTL."""
    return st.sampled_from(
        [1, 50, 99, 100, 400, 1000, 2500, 3999, 4000, 4001, 9999, 10_000, 10_001, 30_000]
    )


def override_durations() -> st.SearchStrategy[str | None]:
    """How long a runtime pause or cap lasts; ``None`` until cleared."""
    return st.sampled_from([None, "500ms", "2s", "5s"])


def admission_steps(
    min_size: int = 0, max_size: int = 60
) -> st.SearchStrategy[list[tuple[object, ...]]]:
    """Sequences of operations on gates sharing one pool, as plain tuples.

    ``("admit", gate, cls, vram, fresh)``, ``("release", pick, outcome)``,
    ``("drop", pick)``, ``("report", pick, factor)``, ``("beat", gate)``,
    ``("advance", ms)``, ``("edge", pick, delta_ms)`` (to a moment when
    something expires, ± 1 ms), ``("back", ms)``, ``("used", device, bytes)``,
    ``("cap", cls, n, duration)``, ``("uncap", cls)``, ``("pause", cls,
    duration)``, ``("resume", cls)``. ``gate`` and ``pick`` are taken modulo
    the number of gates and of lease objects held.
    """
    gates = st.integers(min_value=0, max_value=1)
    picks = st.integers(min_value=0, max_value=15)
    classes = st.sampled_from(ADMISSION_CLASSES)
    admit = st.tuples(st.just("admit"), gates, classes, request_sizes(), st.booleans())
    step = st.one_of(
        admit,
        admit,
        admit,
        st.tuples(st.just("release"), picks, st.sampled_from(["ok", "error", "oom"])),
        st.tuples(st.just("drop"), picks),
        st.tuples(st.just("report"), picks, st.sampled_from([0.5, 1.0, 2.0])),
        st.tuples(st.just("beat"), gates),
        st.tuples(st.just("advance"), clock_steps_ms()),
        st.tuples(st.just("edge"), picks, st.sampled_from([-1, 0, 1])),
        st.tuples(st.just("back"), st.sampled_from([1, 700, 3000])),
        st.tuples(st.just("used"), st.integers(min_value=0, max_value=1), device_usages()),
        st.tuples(
            st.just("cap"), classes, st.integers(min_value=0, max_value=3), override_durations()
        ),
        st.tuples(st.just("uncap"), classes),
        st.tuples(st.just("pause"), classes, override_durations()),
        st.tuples(st.just("resume"), classes),
    )
    return st.lists(step, min_size=min_size, max_size=max_size)
