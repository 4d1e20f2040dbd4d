"""Snapshots of GPU state and the protocol every sampler follows."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable


class GpuProcess(NamedTuple):
    """A compute process on a device: its host-namespace ``pid``, the bytes it
    uses (``None`` when the driver cannot tell), and on MIG its GPU and
    compute instance ids (``None`` when the driver does not say; NVML's
    0xFFFFFFFF without MIG)."""

    pid: int
    used: int | None
    gpu_instance: int | None = None
    compute_instance: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One device at one instant.

    ``uuid`` keys the device everywhere (NVML UUID, ``MIG-…`` for MIG
    instances, ``SIM-…`` for simulated devices); ``index`` is the host-local
    index (for a MIG instance, its GPU's index, with ``mig_index`` the
    instance's slot and ``parent_uuid`` the GPU's uuid). Memory is in bytes:
    ``total`` is what processes can use (NVML's total less the memory the
    driver keeps for itself, ``reserved``, which is ``None`` when the driver
    cannot tell it apart and counts it in ``used``), ``used`` what they use.
    ``utilization`` and ``memory_utilization`` are fractions in [0, 1] or
    ``None`` when the driver cannot tell (never 0 for "unknown").
    ``processes`` lists the compute processes (``None`` when not known).
    ``taken_mono`` is when this device was read, when that differs from the
    snapshot's time (``None``: the snapshot's).
    """

    uuid: str
    index: int
    total: int
    used: int
    name: str = ""
    utilization: float | None = None
    memory_utilization: float | None = None
    reserved: int | None = None
    processes: tuple[GpuProcess, ...] | None = None
    parent_uuid: str = ""
    mig_index: int | None = None
    taken_mono: float | None = None

    @property
    def free(self) -> int:
        """Bytes not in use, as the device reports them."""
        return max(0, self.total - self.used)


@dataclass(frozen=True, slots=True)
class DeviceFault:
    """A device seen but not usable in this snapshot, and why.

    ``code`` is the driver's error code (NVML's ``nvmlReturn_t``) and
    ``error`` its name. A ``quarantined`` device (lost, or waiting for a
    reset) admits nothing until it has answered normally for the sampler's
    quarantine time; any other fault is transient. A device that could not
    even say who it is and was never seen before has, when lost, the
    stand-in id :func:`lost_device_id` gives (``LOST-gpu<index>@<host>``),
    else an empty ``uuid``. ``total``
    is its memory when it last answered (``None``: never seen), so that a
    request only it could hold waits for it instead of being refused.
    """

    uuid: str
    index: int
    code: int
    error: str
    quarantined: bool = False
    mig_index: int | None = None
    total: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every device a sampler sees, taken at one instant.

    ``taken_mono`` is :func:`time.monotonic` at sampling time (the oldest
    device reading when they differ); ages are computed from it so that
    hosts with skewed wall clocks still agree. ``devices`` are the usable
    devices; ``faults`` the devices seen but not usable now.
    """

    devices: tuple[DeviceSample, ...]
    taken_mono: float
    host: str = ""
    backend: str = ""
    faults: tuple[DeviceFault, ...] = ()

    def age_s(self, now_mono: float | None = None) -> float:
        """Seconds since the snapshot was taken."""
        return max(0.0, (time.monotonic() if now_mono is None else now_mono) - self.taken_mono)

    def device_age_s(self, device: DeviceSample, now_mono: float | None = None) -> float:
        """Seconds since ``device`` was read (its own time, else the snapshot's)."""
        taken = self.taken_mono if device.taken_mono is None else device.taken_mono
        return max(0.0, (time.monotonic() if now_mono is None else now_mono) - taken)

    def device_ages_ms(self, now_mono: float) -> list[int]:
        """Every device's :meth:`device_age_s`, in whole milliseconds, in order."""
        taken = self.taken_mono
        return [
            int(max(0.0, now_mono - (taken if d.taken_mono is None else d.taken_mono)) * 1000)
            for d in self.devices
        ]

    @property
    def quarantined(self) -> frozenset[str]:
        """The uuids of the quarantined devices: nothing is admitted there."""
        return frozenset(f.uuid for f in self.faults if f.quarantined and f.uuid)

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


LOST_PREFIX = "LOST-"


def lost_device_id(host: str, index: int, mig_index: int | None = None) -> str:
    """The id of a lost device whose uuid could not be read, from where it is.

    ``LOST-gpu<index>@<host>`` (``LOST-gpu<index>-mig<slot>@<host>`` for a
    MIG instance): stable while the device stays lost, unique in a pool of
    hosts with distinct names, and never a real uuid (those start ``GPU-``,
    ``MIG-`` or ``SIM-``), so it can be quarantined, published and exported
    like any lost device; nothing is ever admitted there.
    """
    mig = "" if mig_index is None else f"-mig{mig_index}"
    return f"{LOST_PREFIX}gpu{index}{mig}@{host}"


def hostname() -> str:
    """This host's name, as samplers report it."""
    return socket.gethostname()
