"""Tickets: an admission held for the length of a ``with`` block."""

from __future__ import annotations

from types import TracebackType

from ._decision import Decision
from ._lease import Lease, check_outcome

# Exact markers only: a bare "out of memory" is also what host allocations,
# shared memory and unrelated libraries say, and those are job errors. The
# CUDA runtime's cudaErrorMemoryAllocation reads "out of memory" (PyTorch:
# "CUDA error: out of memory", CuPy: "cudaErrorMemoryAllocation: out of
# memory"); a math library's ALLOC_FAILED is a cudaMalloc failing inside it;
# RESOURCE_EXHAUSTED is XLA's (JAX) failed device allocation.
_CUDA_OOM_MARKERS = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUSOLVER_STATUS_ALLOC_FAILED",
    "RESOURCE_EXHAUSTED",
)


def is_cuda_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (PyTorch, JAX, CuPy, or by message).

    By type name (``OutOfMemoryError``, ``CUDAOutOfMemoryError``), or by one
    of the exact markers in the message: the CUDA runtime's and driver's
    out-of-memory errors and cuBLAS, cuDNN and cuSOLVER allocation failures.
    """
    name = type(exc).__name__
    if name in ("OutOfMemoryError", "CUDAOutOfMemoryError"):
        return True
    text = str(exc)
    return any(marker in text for marker in _CUDA_OOM_MARKERS)


class Ticket:
    """An admitted job: where to run it, and its lease until release.

    Use as a context manager; leaving the block releases the lease with
    outcome ``ok``, ``error`` (an exception escaped) or ``oom`` (a CUDA
    out-of-memory error escaped). Without a GPU (``cpu`` admission) there is
    no lease and :attr:`env` hides every GPU.
    """

    __slots__ = ("decision", "lease", "outcome")

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.lease: Lease | None = decision.lease
        self.outcome: str | None = None

    def __repr__(self) -> str:
        return f"<Ticket {self.decision.cls} device={self.device_uuid} lease={self.lease}>"

    @property
    def device(self) -> int | None:
        """Host-local index of the device to use (``None`` on CPU)."""
        return self.decision.device

    @property
    def device_uuid(self) -> str | None:
        """The device's id (``None`` on CPU)."""
        return self.decision.device_uuid

    @property
    def env(self) -> dict[str, str]:
        """``CUDA_VISIBLE_DEVICES`` for the job's process."""
        return self.decision.env

    @property
    def lost(self) -> bool:
        """True once the heartbeat found the lease gone while it was held."""
        return self.lease is not None and self.lease.lost

    @property
    def recycle_recommended(self) -> bool:
        """True once this job's allocator alone held more idle memory than the
        pool's strictest ``max_fragmentation`` allows a device: recycle the
        worker's cache (``torch.cuda.empty_cache()``) or the worker."""
        return self.lease is not None and self.lease.recycle_recommended

    @property
    def max_duration_reached(self) -> bool:
        """True once the class's max duration stopped the lease's renewal."""
        return self.lease is not None and self.lease.max_duration_reached

    def report_vram(self, actual: int | str, *, idle: int | str | None = None) -> None:
        """Report the VRAM the job really holds, and how much of it its allocator
        holds unused (sent with the next heartbeat; see :meth:`Lease.report_vram`)."""
        if self.lease is not None:
            self.lease.report_vram(actual, idle=idle)

    def report_torch_memory(self) -> bool:
        """Report what PyTorch's allocator holds on this job's device.

        ``actual`` = bytes reserved by the caching allocator, ``idle`` =
        reserved - allocated. Returns False (reporting nothing) without
        PyTorch, CUDA or a device; call it from the job now and then.
        """
        from ..sampling import torch_memory_stats

        if self.lease is None:
            return False
        stats = torch_memory_stats()
        if stats is None:
            return False
        self.lease.report_vram(stats.reserved, idle=stats.reserved - stats.allocated)
        return True

    def release(self, outcome: str = "ok", *, refund: bool = False) -> None:
        """Give the slot back (idempotent); ``outcome`` and ``refund`` as in
        :meth:`Lease.release`."""
        check_outcome(outcome)
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self.lease is not None:
            self.lease.release(outcome, refund=refund)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.release("ok")
        else:
            self.release("oom" if is_cuda_oom(exc) else "error")

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)
