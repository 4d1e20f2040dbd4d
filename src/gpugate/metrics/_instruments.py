"""The process-side Prometheus instruments a gate updates.

Names follow ``gpugate_<what>_<unit>`` with base units and low-cardinality
labels only (pool, class, outcome, reason). State that lives in Redis (leases,
tokens, waiters, GPU memory) is exported by a collector reading Redis at
scrape time (:mod:`gpugate.metrics._collector`), not here.

What a gate counts carries its pool (``pool``): one Prometheus scraping the
workers of several pools must not add one pool's decisions to another's. A
gate updates them through :meth:`Metrics.for_pool`, the same instruments with
the pool label set, so a process with gates of several pools counts each
under its own. The samplers' instruments have no pool: a host's sampler serves
every gate of the process, whatever their pools.

``sampler_seconds`` and ``nvml_errors`` are for the samplers: the NVML
sampler observes every sample and counts every failed NVML call there.

The decisions (``gpugate_decisions_total``, ``gpugate_decision_duration_seconds``)
are counted by :class:`DecisionRecorder`, a collector of its own: recording one
takes one lock and a few dict updates (0.7 µs), where prometheus_client's
``Counter.inc`` and ``Histogram.observe`` take 1.4 µs, on every decision.
"""

from __future__ import annotations

import copy
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterator
from functools import partial

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# How a job ended, as a release tells the pool and gpugate_job_outcomes_total
# (a label: a fixed set). "dropped": released unused, or by the gate for its
# holder (the object dropped, the gate closed).
JOB_OUTCOMES = ("ok", "error", "oom", "dropped")

# Decisions take tens of microseconds to a few milliseconds. 0.05 is the
# threshold of the GpugateHighDecisionLatency alert: a bound there keeps
# histogram_quantile from reading a p99 just over 25 ms as over 50 ms.
_LATENCY_BUCKETS = (
    5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.05, 0.1, 0.25, 0.5, 2.0,
)  # fmt: skip
# An NVML sample of every device takes tens of microseconds to milliseconds.
_SAMPLER_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0)


class _Durations:
    """One class's decision-time histogram: a count per bucket and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0


class PoolDecisions:
    """One pool's decisions in a :class:`DecisionRecorder`: what its gates record into.

    Each pool has its own counts, so recording one costs what it did before
    decisions carried a pool (no label tuple built with the pool in it).
    """

    __slots__ = ("_bounds", "_lock", "counts", "created", "durations")

    def __init__(self, bounds: tuple[float, ...], lock: threading.Lock) -> None:
        self._bounds = bounds
        self._lock = lock
        self.counts: dict[tuple[str, Hashable, str], int] = {}
        self.created: dict[tuple[str, Hashable, str], float] = {}
        self.durations: dict[str, _Durations] = {}

    def record(self, cls: str, outcome: Hashable, reason: str, seconds: float) -> None:
        """Count one decision (``outcome``: an :class:`~gpugate.Outcome` or its value)."""
        key = (cls, outcome, reason)
        with self._lock:
            n = self.counts.get(key)
            if n is None:
                n = 0
                self.created[key] = time.time()
            self.counts[key] = n + 1
            hist = self.durations.get(cls)
            if hist is None:
                hist = self.durations[cls] = _Durations(len(self._bounds))
            hist.counts[bisect_left(self._bounds, seconds)] += 1
            hist.sum += seconds


class DecisionRecorder(Collector):
    """``gpugate_decisions_total`` (pool, class, outcome, reason) and
    ``gpugate_decision_duration_seconds`` (pool, class), exposed as prometheus_client's
    Counter and Histogram expose theirs (buckets ``le`` cumulative, ``+Inf`` last)."""

    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self._bounds = (*buckets, float("inf"))
        self._lock = threading.Lock()
        self._pools: dict[str, PoolDecisions] = {}

    def for_pool(self, pool: str) -> PoolDecisions:
        """Pool ``pool``'s decisions (made on first use)."""
        with self._lock:
            found = self._pools.get(pool)
            if found is None:
                found = self._pools[pool] = PoolDecisions(self._bounds, self._lock)
            return found

    def record(self, pool: str, cls: str, outcome: Hashable, reason: str, seconds: float) -> None:
        """Count one decision of pool ``pool``; a gate records through :meth:`for_pool`."""
        self.for_pool(pool).record(cls, outcome, reason, seconds)

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "gpugate_decisions",
                "Admission decisions, by pool, class, outcome and reason.",
                labels=["pool", "class", "outcome", "reason"],
            ),
            HistogramMetricFamily(
                "gpugate_decision_duration_seconds",
                "Time to decide one request, Redis round trip included.",
                labels=["pool", "class"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        """The two families, empty (for the registry's name checks)."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """The two families as they are now."""
        decisions, durations = self._families()
        with self._lock:
            counts = []
            hists = []
            for pool, mine in self._pools.items():
                for key, n in mine.counts.items():
                    cls, outcome, reason = key
                    labels = [pool, cls, str(getattr(outcome, "value", outcome)), reason]
                    counts.append((labels, n, mine.created[key]))
                for cls, h in mine.durations.items():
                    hists.append(([pool, cls], list(h.counts), h.sum))
        for labels, n, created in sorted(counts):
            decisions.add_metric(labels, n, created=created)
        for labels, bucket_counts, total in sorted(hists):
            cumulative, buckets = 0, []
            for bound, n in zip(self._bounds, bucket_counts, strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            durations.add_metric(labels, buckets, total)
        yield decisions
        yield durations


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


class PoolCounter:
    """A Counter whose first label, ``pool``, is set: ``labels`` takes the others
    (class, and outcome where it has one) and gives the child to ``inc``."""

    __slots__ = ("labels",)

    def __init__(self, counter: Counter, pool: str) -> None:
        self.labels: Callable[..., Counter] = partial(counter.labels, pool)


class Metrics:
    """One set of instruments on one registry.

    ``Metrics(registry)`` makes and registers the instruments; their ``pool``
    label is ``""`` until :meth:`for_pool` gives a view with it set, which is
    what a :class:`~gpugate.Gate` updates (its own pool's). Views share the
    instruments and the registry.
    """

    decisions: PoolDecisions
    leases_lost: PoolCounter
    leases_max_duration: PoolCounter
    job_outcomes: PoolCounter

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.pool = ""
        self._recorder = DecisionRecorder()
        registry.register(self._recorder)
        self._leases_lost = Counter(
            "gpugate_leases_lost",
            "Leases found gone while their holder still held them (expired or reaped).",
            ["pool", "class"],
            registry=registry,
        )
        self._leases_max_duration = Counter(
            "gpugate_leases_max_duration",
            "Leases whose renewal stopped at their class's max duration.",
            ["pool", "class"],
            registry=registry,
        )
        self._job_outcomes = Counter(
            "gpugate_job_outcomes",
            "Released leases by how the job ended (ok, error, oom, dropped).",
            ["pool", "class", "outcome"],
            registry=registry,
        )
        self.sampler_seconds = Histogram(
            "gpugate_sampler_duration_seconds",
            "Time to sample every device of this host, by sampler backend.",
            ["backend"],
            buckets=_SAMPLER_BUCKETS,
            registry=registry,
        )
        self.nvml_errors = Counter(
            "gpugate_nvml_errors",
            "Failed NVML calls, by call (e.g. nvmlDeviceGetMemoryInfo).",
            ["call"],
            registry=registry,
        )
        self._bind()

    def _bind(self) -> None:
        self.decisions = self._recorder.for_pool(self.pool)
        self.leases_lost = PoolCounter(self._leases_lost, self.pool)
        self.leases_max_duration = PoolCounter(self._leases_max_duration, self.pool)
        self.job_outcomes = PoolCounter(self._job_outcomes, self.pool)

    def for_pool(self, pool: str) -> Metrics:
        """The same instruments, as the gates of ``pool`` update them (``pool`` label set)."""
        view = copy.copy(self)
        view.pool = pool
        view._bind()
        return view


_default: Metrics | None = None
_lock = threading.Lock()


def default_metrics() -> Metrics:
    """The instruments on prometheus_client's default registry, made once per process."""
    global _default
    with _lock:
        if _default is None:
            _default = Metrics(REGISTRY)
        return _default
