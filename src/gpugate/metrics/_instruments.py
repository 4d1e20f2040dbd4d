"""The process-side Prometheus instruments a gate updates.

Names follow ``gpugate_<what>_<unit>`` with base units and low-cardinality
labels only (class, outcome, reason). State that lives in Redis (leases,
tokens, waiters, GPU memory) is exported by a collector reading Redis at
scrape time (:mod:`gpugate.metrics._collector`), not here.

``sampler_seconds`` and ``nvml_errors`` are for the samplers: the NVML
sampler observes every sample and counts every failed NVML call there.

The decisions (``gpugate_decisions_total``, ``gpugate_decision_duration_seconds``)
are counted by :class:`DecisionRecorder`, a collector of its own: recording one
takes one lock and a few dict updates (0.7 µs), where prometheus_client's
``Counter.inc`` and ``Histogram.observe`` take 1.4 µs, on every decision.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Hashable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class DecisionRecorder(Collector):
    """``gpugate_decisions_total`` (class, outcome, reason) and
    ``gpugate_decision_duration_seconds`` (class), exposed as prometheus_client's
    Counter and Histogram expose theirs (buckets ``le`` cumulative, ``+Inf`` last)."""

    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self._bounds = (*buckets, float("inf"))
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, Hashable, str], int] = {}
        self._created: dict[tuple[str, Hashable, str], float] = {}
        self._durations: dict[str, _Durations] = {}

    def record(self, cls: str, outcome: Hashable, reason: str, seconds: float) -> None:
        """Count one decision (``outcome``: an :class:`~gpugate.Outcome` or its value)."""
        key = (cls, outcome, reason)
        with self._lock:
            n = self._counts.get(key)
            if n is None:
                n = 0
                self._created[key] = time.time()
            self._counts[key] = n + 1
            hist = self._durations.get(cls)
            if hist is None:
                hist = self._durations[cls] = _Durations(len(self._bounds))
            hist.counts[bisect_left(self._bounds, seconds)] += 1
            hist.sum += seconds

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "gpugate_decisions",
                "Admission decisions, by class, outcome and reason.",
                labels=["class", "outcome", "reason"],
            ),
            HistogramMetricFamily(
                "gpugate_decision_duration_seconds",
                "Time to decide one request, Redis round trip included.",
                labels=["class"],
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
            for key, n in self._counts.items():
                cls, outcome, reason = key
                labels = [cls, str(getattr(outcome, "value", outcome)), reason]
                counts.append((labels, n, self._created[key]))
            hists = [(c, list(h.counts), h.sum) for c, h in sorted(self._durations.items())]
        for labels, n, created in sorted(counts):
            decisions.add_metric(labels, n, created=created)
        for cls, bucket_counts, total in hists:
            cumulative, buckets = 0, []
            for bound, n in zip(self._bounds, bucket_counts, strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            durations.add_metric([cls], buckets, total)
        yield decisions
        yield durations


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


class Metrics:
    """One set of instruments on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = DecisionRecorder()
        registry.register(self.decisions)
        self.leases_lost = Counter(
            "gpugate_leases_lost",
            "Leases found gone while their holder still held them (expired or reaped).",
            ["class"],
            registry=registry,
        )
        self.leases_max_duration = Counter(
            "gpugate_leases_max_duration",
            "Leases whose renewal stopped at their class's max duration.",
            ["class"],
            registry=registry,
        )
        self.job_outcomes = Counter(
            "gpugate_job_outcomes",
            "Released leases by how the job ended (ok, error, oom, dropped).",
            ["class", "outcome"],
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


_default: Metrics | None = None
_lock = threading.Lock()


def default_metrics() -> Metrics:
    """The instruments on prometheus_client's default registry, made once per process."""
    global _default
    with _lock:
        if _default is None:
            _default = Metrics(REGISTRY)
        return _default
