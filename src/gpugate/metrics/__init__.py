"""Prometheus metrics of gpugate.

:class:`Metrics`: the instruments a gate updates in its process (decisions,
latencies, lease outcomes). :class:`PoolCollector`: the pool's state in Redis,
read at scrape time. :func:`start_metrics_server`: the ``/metrics`` endpoint.
"""

from ._collector import PoolCollector
from ._instruments import Metrics, default_metrics
from ._server import DEFAULT_PORT, MetricsServer, start_metrics_server

__all__ = [
    "DEFAULT_PORT",
    "Metrics",
    "MetricsServer",
    "PoolCollector",
    "default_metrics",
    "start_metrics_server",
]
