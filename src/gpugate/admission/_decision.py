"""What a gate answers: the outcome of one request and why."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._lease import Lease


class Outcome(enum.Enum):
    """Admit now, come back later, or never (as asked)."""

    ADMIT = "admit"
    DEFER = "defer"
    REJECT = "reject"

    # Members are singletons: hash by identity, in C (Enum's own hash is a
    # Python call, and every decision keys its metrics and log throttle on it).
    __hash__ = object.__hash__


class Reason:
    """The machine-readable reasons a decision carries (plain strings)."""

    OK = "ok"
    CPU = "cpu"
    PAUSED = "paused"
    RECOVERING = "recovering"
    NO_GPU = "no_gpu"
    STALE_SAMPLE = "stale_sample"
    GPU_LOST = "gpu_lost"
    TOO_LARGE = "too_large"
    CAP = "cap"
    PRIORITY = "priority"
    VRAM = "vram"
    FRAGMENTED = "fragmented"
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

    def __bool__(self) -> bool:
        """``if gate.try_admit(...):`` runs the job only when admitted (as
        :attr:`admitted`); a DEFER or a REJECT is false."""
        return self.outcome is Outcome.ADMIT

    @property
    def env(self) -> dict[str, str]:
        """Environment for the job: ``CUDA_VISIBLE_DEVICES`` set to the device.

        Without a device (``cpu`` admission) it hides every GPU.
        """
        return {"CUDA_VISIBLE_DEVICES": self.device_uuid or ""} if self.admitted else {}


# The decision path builds a Decision on every call: through the slots'
# descriptors it skips the frozen dataclass's per-field checks (1 against
# 2.3 µs). The same object as Decision(...) gives, every field set.
_new = object.__new__
_FIELDS = (
    "outcome", "reason", "retry_after", "device", "device_uuid", "lease",
    "detail", "cls", "vram", "available", "local",
)  # fmt: skip
if tuple(f.name for f in fields(Decision)) != _FIELDS:  # pragma: no cover - caught at import
    raise AssertionError("make_decision must set every field of Decision, in order")
_SETTERS = tuple(getattr(Decision, name).__set__ for name in _FIELDS)


def make_decision(
    outcome: Outcome,
    reason: str,
    retry_after: float,
    device: int | None,
    device_uuid: str | None,
    lease: Lease | None,
    detail: str,
    cls: str,
    vram: int,
    available: int | None,
    local: bool,
) -> Decision:
    """``Decision(...)`` with every field given in order, for the decision path."""
    (
        s_out, s_reason, s_retry, s_dev, s_uuid, s_lease,
        s_detail, s_cls, s_vram, s_avail, s_local,
    ) = _SETTERS  # fmt: skip
    d = _new(Decision)
    s_out(d, outcome)
    s_reason(d, reason)
    s_retry(d, retry_after)
    s_dev(d, device)
    s_uuid(d, device_uuid)
    s_lease(d, lease)
    s_detail(d, detail)
    s_cls(d, cls)
    s_vram(d, vram)
    s_avail(d, available)
    s_local(d, local)
    return d
