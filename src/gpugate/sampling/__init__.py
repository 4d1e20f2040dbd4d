"""What the GPUs of this host look like: samplers and their snapshots."""

from .._exceptions import NvmlError, NvmlUnavailable
from ._nogpu import NoGpuSampler
from ._nvml import NvmlSampler, default_sampler
from ._sample import DeviceFault, DeviceSample, GpuProcess, Sampler, Snapshot
from ._simulated import SimulatedSampler
from ._torch import TorchMemory, torch_memory_stats

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
    "TorchMemory",
    "default_sampler",
    "torch_memory_stats",
]
