"""Idle memory: what a worker process holds on each device while it runs no job.

NVML reports each compute process's memory per device. A worker process that
holds no lease is idle; what it holds then is its CUDA context and the
weights it keeps on purpose (its *warm baseline*), plus whatever a finished
job left cached (its *idle excess*, fragmentation that only a cache flush or
a restart gives back).

The baseline of a device is the least memory NVML has shown for the pid
there in readings taken while the process was idle, counted from its first
admission: the reading that admission was decided on shows the worker warm,
before its first job, so a worker still loading its model is not counted as
fragmented. It only goes down. Readings taken before the process's last
lease ended are not idle readings and are ignored, whatever the snapshot's
age. A device whose process list is unknown is not measured.
"""

from __future__ import annotations

import threading
import time

from ..sampling import Snapshot


class IdleMemory:
    """The warm baseline of one process (by the pid NVML knows it by) on each device.

    Thread-safe: the heartbeat thread and admitting threads both feed it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._lock = threading.Lock()
        self._baseline: dict[str, int] = {}
        self._armed = False
        # When a lease of this process was last taken, released or dropped
        # (time.monotonic()); written without a lock, from garbage collection too.
        self.changed_mono = 0.0

    def touch(self) -> None:
        """A lease of this process was taken, released or dropped just now."""
        self.changed_mono = time.monotonic()

    def _usage(self, snap: Snapshot) -> dict[str, int]:
        """The pid's bytes per device, from the readings taken after its last lease ended."""
        since_mono = self.changed_mono
        out = {}
        for d in snap.devices:
            taken = snap.taken_mono if d.taken_mono is None else d.taken_mono
            if d.processes is None or taken <= since_mono:
                continue
            used = 0
            for p in d.processes:
                if p.pid == self.pid:
                    if p.used is None:
                        break
                    used += p.used
            else:
                out[d.uuid] = used
        return out

    def _observe(self, usage: dict[str, int]) -> None:
        for uuid, used in usage.items():
            low = self._baseline.get(uuid)
            if low is None or used < low:
                self._baseline[uuid] = used

    def admitted(self, snap: Snapshot) -> None:
        """The process, holding no lease, was admitted on ``snap``: it is warm,
        and ``snap``'s readings since its last lease ended are idle ones."""
        usage = self._usage(snap)
        with self._lock:
            self._armed = True
            self._observe(usage)

    def excess(self, snap: Snapshot) -> dict[str, int] | None:
        """Bytes above the baseline per device (only those above it), from the
        readings of ``snap`` taken since the process's last lease ended (call
        it only while the process holds none). ``None`` when no reading
        qualifies (nothing known); ``{}`` before the first admission."""
        usage = self._usage(snap)
        with self._lock:
            if not self._armed:
                return {}
            if not usage:
                return None
            self._observe(usage)
            return {
                uuid: used - self._baseline[uuid]
                for uuid, used in usage.items()
                if used > self._baseline[uuid]
            }


_by_pid: dict[int, IdleMemory] = {}
_by_pid_lock = threading.Lock()


def idle_memory(pid: int) -> IdleMemory:
    """The one :class:`IdleMemory` of ``pid`` in this process (shared by its gates)."""
    with _by_pid_lock:
        found = _by_pid.get(pid)
        if found is None:
            found = _by_pid[pid] = IdleMemory(pid)
        return found
