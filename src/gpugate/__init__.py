"""gpugate: race-free admission of GPU jobs — admit, defer with a retry-after, or reject.

Every decision is one atomic Lua script in Redis, shared by every worker of a
pool; see the README for the two-minute tour.
"""

from ._exceptions import (
    AdmissionError,
    AdmissionRejected,
    AdmissionTimeout,
    BackendError,
    ConfigError,
    GpugateError,
    NvmlError,
    NvmlUnavailable,
    UsageError,
)
from ._units import format_duration, format_size, parse_duration, parse_rate, parse_size
from ._version import __version__
from .admission import Decision, Gate, Lease, Outcome, Reason, Ticket
from .metrics import start_metrics_server
from .policy import ClassPolicy, Policy, PoolSettings
from .sampling import (
    DeviceFault,
    DeviceSample,
    GpuProcess,
    NoGpuSampler,
    NvmlSampler,
    Sampler,
    SimulatedSampler,
    Snapshot,
    default_sampler,
)

__all__ = [
    "AdmissionError",
    "AdmissionRejected",
    "AdmissionTimeout",
    "BackendError",
    "ClassPolicy",
    "ConfigError",
    "Decision",
    "DeviceFault",
    "DeviceSample",
    "Gate",
    "GpuProcess",
    "GpugateError",
    "Lease",
    "NoGpuSampler",
    "NvmlError",
    "NvmlSampler",
    "NvmlUnavailable",
    "Outcome",
    "Policy",
    "PoolSettings",
    "Reason",
    "Sampler",
    "SimulatedSampler",
    "Snapshot",
    "Ticket",
    "UsageError",
    "__version__",
    "default_sampler",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "start_metrics_server",
]
