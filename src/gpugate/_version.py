"""The version of gpugate, in one place (pyproject reads it from here)."""

__version__ = "0.3.0"
