"""What the GPUs of this host look like: samplers and their snapshots."""

from ._nogpu import NoGpuSampler
from ._nvml import NvmlError, NvmlSampler, NvmlUnavailable, default_sampler
from ._sample import DeviceFault, DeviceSample, GpuProcess, Sampler, Snapshot
from ._simulated import SimulatedSampler

__all__ = [
    "DeviceFault",
    "DeviceSample",
    "GpuProcess",
    "NoGpuSampler",
    "NvmlError",
    "NvmlSampler",
    "NvmlUnavailable",
    "Sampler",
    "SimulatedSampler",
    "Snapshot",
    "default_sampler",
]
