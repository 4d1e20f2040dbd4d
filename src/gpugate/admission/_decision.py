"""What a gate answers: the outcome of one request and why."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._lease import Lease


class Outcome(enum.Enum):
    """Admit now, come back later, or never (as asked)."""

    ADMIT = "admit"
    DEFER = "defer"
    REJECT = "reject"


class Reason:
    """The machine-readable reasons a decision carries (plain strings)."""

    OK = "ok"
    CPU = "cpu"
    PAUSED = "paused"
    NO_GPU = "no_gpu"
    STALE_SAMPLE = "stale_sample"
    GPU_LOST = "gpu_lost"
    TOO_LARGE = "too_large"
    CAP = "cap"
    PRIORITY = "priority"
    VRAM = "vram"
    RATE = "rate"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_OPEN = "backend_open"


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer of the gate.

    ``retry_after`` is in seconds (0 for ADMIT and REJECT): exact for
    ``rate`` and ``paused``, an estimate with jitter otherwise. ``device`` is
    the host-local index of the device to use and ``device_uuid`` its id;
    both are ``None`` without a device (a ``cpu`` admission, any DEFER).
    ``lease`` is the lease held after an ADMIT on a GPU, else ``None``.
    ``detail`` is a human sentence about the reason. ``available`` is the
    VRAM (bytes) free for this request on the chosen device, or on the one
    closest to fitting when it deferred for memory; ``None`` when the decision
    stopped before memory was looked at (and for the local pre-check).
    ``local`` is True when the local pre-check answered without Redis.
    """

    outcome: Outcome
    reason: str
    retry_after: float = 0.0
    device: int | None = None
    device_uuid: str | None = None
    lease: Lease | None = field(default=None, compare=False)
    detail: str = ""
    cls: str = ""
    vram: int = 0
    available: int | None = None
    local: bool = False

    @property
    def admitted(self) -> bool:
        """True for ADMIT."""
        return self.outcome is Outcome.ADMIT

    @property
    def env(self) -> dict[str, str]:
        """Environment for the job: ``CUDA_VISIBLE_DEVICES`` set to the device.

        Without a device (``cpu`` admission) it hides every GPU.
        """
        return {"CUDA_VISIBLE_DEVICES": self.device_uuid or ""} if self.admitted else {}
