"""Simulation: the demo (and, later, trace replay against baselines)."""

from ._demo import DemoReport, run_demo

__all__ = ["DemoReport", "run_demo"]
