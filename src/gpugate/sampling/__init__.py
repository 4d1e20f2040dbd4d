"""What the GPUs of this host look like: samplers and their snapshots."""

from ._nogpu import NoGpuSampler
from ._sample import DeviceSample, Sampler, Snapshot
from ._simulated import SimulatedSampler

__all__ = ["DeviceSample", "NoGpuSampler", "Sampler", "SimulatedSampler", "Snapshot"]
