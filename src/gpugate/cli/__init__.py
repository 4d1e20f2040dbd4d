"""The ``gpugate`` command (also ``python -m gpugate``)."""

from ._main import main

__all__ = ["main"]
