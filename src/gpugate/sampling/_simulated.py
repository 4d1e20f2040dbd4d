"""Scriptable simulated GPUs, for the simulator, the demo and tests.

A simulated device has a stable id ``SIM-<name>-<index>``: two processes that
build ``SimulatedSampler`` with the same ``name`` describe the same devices,
so they share one ledger in Redis, as containers sharing a real card would.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Sequence

from .._exceptions import ConfigError
from .._units import parse_size
from ._sample import DeviceFault, DeviceSample, GpuProcess, Snapshot, hostname

# NVML's NVML_ERROR_GPU_IS_LOST: what a lost simulated device reports.
_GPU_IS_LOST = 15


class SimulatedSampler:
    """GPUs whose total and used memory a program sets.

    ``totals`` gives one size per device (``"80GiB"`` or bytes). Usage starts
    at 0 and changes with :meth:`set_used`, :meth:`allocate`/:meth:`free`, or a
    timeline given to :meth:`script` (offsets in seconds from the call).
    Compute processes (what NVML lists per device) are set with
    :meth:`set_process`; none by default. Thread-safe.
    """

    backend = "simulated"

    def __init__(self, totals: Sequence[str | int], *, name: str = "sim") -> None:
        if not totals:
            raise ConfigError(
                "a SimulatedSampler needs at least one device", key="totals", value=totals
            )
        self._lock = threading.Lock()
        self._name = name
        self._totals = [parse_size(t, key=f"totals[{i}]") for i, t in enumerate(totals)]
        self._used = [0] * len(self._totals)
        self._procs: list[dict[int, int]] = [{} for _ in self._totals]
        self._lost: set[int] = set()
        self._timeline: list[tuple[float, int, int]] = []
        self._host = hostname()
        # The devices as last sampled, rebuilt only after a change: a decision
        # samples every time, and callers (the gate) may reuse what they
        # derived from the same tuple.
        self._devices: tuple[DeviceSample, ...] | None = None
        self._faults: tuple[DeviceFault, ...] = ()  # rebuilt with _devices

    @property
    def uuids(self) -> list[str]:
        """The device ids, by index."""
        return [self.uuid(i) for i in range(len(self._totals))]

    def uuid(self, index: int) -> str:
        """The stable id of device ``index``."""
        return f"SIM-{self._name}-{index}"

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self._totals):
            raise ConfigError(
                f"no simulated device {index}; there are {len(self._totals)}",
                key="index",
                value=index,
            )

    def set_used(self, index: int, used: str | int) -> None:
        """Set device ``index``'s used memory (as NVML would report it)."""
        self._check(index)
        b = parse_size(used, key="used")
        with self._lock:
            self._used[index] = min(b, self._totals[index])
            self._devices = None

    def set_total(self, index: int, total: str | int) -> None:
        """Change device ``index``'s total memory (e.g. a MIG reconfiguration);
        its use is cut to the new total, as :meth:`set_used` would."""
        self._check(index)
        with self._lock:
            self._totals[index] = parse_size(total, key="total")
            self._used[index] = min(self._used[index], self._totals[index])
            self._devices = None

    def allocate(self, index: int, size: str | int) -> None:
        """Add ``size`` bytes to device ``index``'s use, as a job allocating would."""
        self._check(index)
        b = parse_size(size, key="size")
        with self._lock:
            self._used[index] = min(self._totals[index], self._used[index] + b)
            self._devices = None

    def free(self, index: int, size: str | int) -> None:
        """Take ``size`` bytes off device ``index``'s use."""
        self._check(index)
        b = parse_size(size, key="size")
        with self._lock:
            self._used[index] = max(0, self._used[index] - b)
            self._devices = None

    def set_process(self, index: int, pid: int, used: str | int | None) -> None:
        """List process ``pid`` on device ``index`` using ``used`` bytes, as NVML's
        process list would; ``None`` takes it off the list.

        Only the list changes: the device's ``used`` is what :meth:`set_used`
        and friends made it, so a test says both what the driver counts and
        whose it is.
        """
        self._check(index)
        b = None if used is None else parse_size(used, key="used")
        with self._lock:
            if b is None:
                self._procs[index].pop(pid, None)
            else:
                self._procs[index][pid] = b
            self._devices = None

    def lose(self, index: int) -> None:
        """Lose device ``index`` as NVML reports a lost GPU: it leaves the usable
        devices and shows as a quarantined fault (``GPU_IS_LOST``), so a request
        insisting on it DEFERs ``gpu_lost``."""
        self._check(index)
        with self._lock:
            self._lost.add(index)
            self._devices = None

    def restore(self, index: int) -> None:
        """Bring back a device taken away by :meth:`lose`."""
        self._check(index)
        with self._lock:
            self._lost.discard(index)
            self._devices = None

    def script(self, events: Iterable[tuple[float, int, str | int]]) -> None:
        """Schedule ``(offset_s, index, used)`` changes, applied as time passes."""
        start = time.monotonic()
        with self._lock:
            for offset, index, used in events:
                self._check(index)
                item = (start + float(offset), index, parse_size(used, key="used"))
                bisect.insort(self._timeline, item)

    def sample(self) -> Snapshot:
        """The devices as they are now."""
        now = time.monotonic()
        with self._lock:
            while self._timeline and self._timeline[0][0] <= now:
                _, index, used = self._timeline.pop(0)
                self._used[index] = min(used, self._totals[index])
                self._devices = None
            devices = self._devices
            if devices is None:
                devices = self._devices = tuple(
                    DeviceSample(
                        uuid=self.uuid(i),
                        index=i,
                        total=total,
                        used=self._used[i],
                        name="Simulated GPU",
                        utilization=None,
                        processes=tuple(GpuProcess(pid, b) for pid, b in self._procs[i].items()),
                    )
                    for i, total in enumerate(self._totals)
                    if i not in self._lost
                )
                self._faults = tuple(
                    DeviceFault(
                        self.uuid(i),
                        i,
                        _GPU_IS_LOST,
                        "GPU_IS_LOST",
                        quarantined=True,
                        total=self._totals[i],
                    )
                    for i in sorted(self._lost)
                )
            faults = self._faults
        return Snapshot(
            devices=devices, taken_mono=now, host=self._host, backend=self.backend, faults=faults
        )
