"""Snapshots of GPU state and the protocol every sampler follows."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One device at one instant.

    ``uuid`` keys the device everywhere (NVML UUID, ``MIG-…`` for MIG
    instances, ``SIM-…`` for simulated devices); ``index`` is the host-local
    index. Memory is in bytes; ``utilization`` is a fraction in [0, 1] or
    ``None`` when the driver cannot tell (never 0 for "unknown").
    """

    uuid: str
    index: int
    total: int
    used: int
    name: str = ""
    utilization: float | None = None

    @property
    def free(self) -> int:
        """Bytes not in use, as the device reports them."""
        return max(0, self.total - self.used)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every device a sampler sees, taken at one instant.

    ``taken_mono`` is :func:`time.monotonic` at sampling time; ages are
    computed from it so that hosts with skewed wall clocks still agree.
    """

    devices: tuple[DeviceSample, ...]
    taken_mono: float
    host: str = ""
    backend: str = ""

    def age_s(self, now_mono: float | None = None) -> float:
        """Seconds since the snapshot was taken."""
        return max(0.0, (time.monotonic() if now_mono is None else now_mono) - self.taken_mono)

    def by_uuid(self, uuid: str) -> DeviceSample | None:
        """The device with this uuid, or ``None``."""
        for d in self.devices:
            if d.uuid == uuid:
                return d
        return None


@runtime_checkable
class Sampler(Protocol):
    """Anything that can say what the GPUs of this host look like now."""

    backend: str

    def sample(self) -> Snapshot:
        """A fresh snapshot of every device."""
        ...


def hostname() -> str:
    """This host's name, as samplers report it."""
    return socket.gethostname()
