"""Prometheus metrics of gpugate."""

from ._instruments import Metrics, default_metrics

__all__ = ["Metrics", "default_metrics"]
