"""What a worker's PyTorch allocator holds, for the lease heartbeat.

Fragmentation, as gpugate measures it: memory a job's allocator holds but
does not use — PyTorch's ``reserved - allocated`` (its cache, including the
split blocks that are free but too small to serve larger requests). Each job
reports it through its lease (:meth:`gpugate.Ticket.report_torch_memory`);
the gate sums it per device; a class with ``max_fragmentation`` is not placed
on a device whose summed idle bytes exceed that fraction of its memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TorchMemory:
    """One reading of the caching allocator on the current CUDA device (bytes)."""

    reserved: int
    allocated: int
    inactive_split: int
    alloc_retries: int

    @property
    def idle(self) -> int:
        """Held by the allocator, not in use."""
        return max(0, self.reserved - self.allocated)


def torch_memory_stats(device: int | None = None) -> TorchMemory | None:
    """The allocator's figures, or ``None`` without PyTorch or a CUDA device.

    Never imports PyTorch itself: a worker that does not use it pays nothing.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        stats = torch.cuda.memory_stats(device)
    except (RuntimeError, AssertionError):
        return None
    return TorchMemory(
        reserved=int(stats.get("reserved_bytes.all.current", 0)),
        allocated=int(stats.get("allocated_bytes.all.current", 0)),
        inactive_split=int(stats.get("inactive_split_bytes.all.current", 0)),
        alloc_retries=int(stats.get("num_alloc_retries", 0)),
    )
