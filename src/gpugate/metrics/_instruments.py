"""The process-side Prometheus instruments a gate updates.

Names follow ``gpugate_<what>_<unit>`` with base units and low-cardinality
labels only (class, outcome, reason). State that lives in Redis (leases,
tokens, waiters, GPU memory) is exported by a collector reading Redis at
scrape time (:mod:`gpugate.metrics._collector`), not here.

``sampler_seconds`` and ``nvml_errors`` are for the samplers: the NVML
sampler observes every sample and counts every failed NVML call there.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

# Decisions take tens of microseconds to a few milliseconds.
_LATENCY_BUCKETS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.0)
# An NVML sample of every device takes tens of microseconds to milliseconds.
_SAMPLER_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0)


class Metrics:
    """One set of instruments on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "gpugate_decisions",
            "Admission decisions, by class, outcome and reason.",
            ["class", "outcome", "reason"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "gpugate_decision_duration_seconds",
            "Time to decide one request, Redis round trip included.",
            ["class"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
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
