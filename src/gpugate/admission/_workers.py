"""A gate as a worker of its pool: its registry record and its process's idle memory.

A registered gate tells the pool, with each heartbeat, what its process is
(host, pid, version, leases held) and what this host's GPUs look like, and
measures its process's idle memory: what NVML shows for its pid above a warm
baseline while no gate of the process holds a lease. See ``docs/sampling.md``,
"Fragmentation".
"""

from __future__ import annotations

import functools
import json
import threading
import time
import weakref

import structlog

from .. import _speedups
from .._version import __version__
from ..sampling import Snapshot
from ..state._keys import owner_parts
from ._core import GateCore, RecycleCallback
from ._lease import Lease

log = structlog.get_logger(__name__)

# Every gate of this process, for the idle-memory check (one measuring gate
# per pid and pool; none while any of them holds a lease).
_live_gates: weakref.WeakSet[WorkerRecord] = weakref.WeakSet()
_live_gates_lock = threading.Lock()
# How many gates were ever added to _live_gates: a gate's cached list of the
# process's gates is rebuilt when it changes (closed and collected gates are
# skipped when the list is read).
_live_gates_added = 0


def add_live_gate(gate: WorkerRecord) -> None:
    """Count ``gate`` among this process's gates."""
    global _live_gates_added
    with _live_gates_lock:
        _live_gates.add(gate)
        _live_gates_added += 1


def live_gates() -> list[WorkerRecord]:
    """This process's gates not yet collected (closed ones included)."""
    with _live_gates_lock:
        return list(_live_gates)


def _call_recycle(cb: RecycleCallback, uuid: str, idle: int) -> None:
    try:
        cb(uuid, idle)
    except Exception:  # a user callback must not kill the heartbeat
        log.exception("recycle_callback_failed", device=uuid)


class WorkerRecord(GateCore):
    """The registry record and idle memory of a gate's process (see ``Gate``)."""

    _peers: tuple[weakref.ref[WorkerRecord], ...]
    _peers_seen: int

    def _worker_info(self, leases: int) -> str:
        """What the registry says about this process (JSON)."""
        host, pid = owner_parts(self.owner)
        return json.dumps(
            {
                "host": host,
                "pid": pid,
                "version": __version__,
                "fastpath": _speedups.IMPLEMENTATION,
                "sampler": getattr(self.sampler, "backend", "unknown"),
                "policy_version": self.policy.version if self.policy is not None else None,
                "started_ms": self._started_ms,
                "leases": leases,
            },
            separators=(",", ":"),
        )

    def _check_fragmentation(
        self, leases: list[Lease], reports: list[tuple[int, int, float] | None], snap: Snapshot
    ) -> None:
        """Flag a job whose allocator alone holds more idle memory than the pool's
        strictest ``max_fragmentation`` allows a whole device: its worker should
        recycle its cache."""
        bound = self.effective_policy.strictest_max_fragmentation()
        if bound is None or not any(r is not None and r[1] > 0 for r in reports):
            return
        for lease, report in zip(leases, reports, strict=True):
            if report is None or report[1] <= 0:
                continue
            device = snap.by_uuid(lease.device_uuid)
            if device is not None and device.total and report[1] > bound * device.total:
                lease._recommend_recycle(report[1], device.total, bound)

    @property
    def idle_memory(self) -> dict[str, int]:
        """This process's idle excess per device uuid, as last sent to the pool (bytes).

        What NVML showed for this process's pid above its warm baseline while
        it held no lease; devices at or below their baseline are left out.
        Empty while it holds a lease (the job's allocator reports its own
        idle bytes then), before its first admission, and for a gate that
        does not register. See ``docs/sampling.md``, "Fragmentation".
        """
        return dict(self._idle_sent)

    @property
    def recycle_recommended(self) -> bool:
        """True while this idle process alone holds more memory above its warm
        baseline on some device than the pool's strictest ``max_fragmentation``
        allows that device: empty its allocator's cache
        (``torch.cuda.empty_cache()``) or restart it, staggered."""
        return bool(self._recycle)

    def on_recycle_recommended(self, callback: RecycleCallback) -> None:
        """Call ``callback(device_uuid, idle_bytes)`` each time :attr:`recycle_recommended`
        turns true for a device (once, until the excess drops below the bound).

        It runs on the heartbeat thread and must not block: set a flag that the
        worker's loop acts on between jobs.
        """
        self._on_recycle.append(callback)

    def _process_gates(self) -> list[WorkerRecord]:
        """The open gates of this process that measure the same pid (this one included)."""
        if self._peers_seen != _live_gates_added:
            with _live_gates_lock:
                self._peers_seen = _live_gates_added
                gates = list(_live_gates)
            self._peers = tuple(
                weakref.ref(g) for g in gates if g._pid == self._pid and g._gpu_pid == self._gpu_pid
            )
        peers = []
        for ref in self._peers:
            g = ref()
            if g is not None and not g._closed:
                peers.append(g)
        return peers

    def _process_idle(self) -> bool:
        """No gate of this process holds a lease: whatever its pid holds is idle memory."""
        return not any(len(g._leases) for g in self._process_gates())

    def _idle_excess(self, snap: Snapshot | None) -> dict[str, int] | None:
        """What this beat tells the pool of the process's idle excess (``None``: unchanged).

        One registered gate per pool of a process measures it (the oldest);
        the others, and every gate while any gate of the process holds a
        lease, send none, so that a process's memory is never counted twice,
        nor a running job's memory as idle.
        """
        if not self._register or snap is None:
            return None
        gates = self._process_gates()
        if any(len(g._leases) for g in gates):
            return {}
        for g in gates:
            if (
                g._register
                and g._seq < self._seq
                and g._keys.prefix == self._keys.prefix
                and g.redis_url == self.redis_url
            ):
                return {}
        return self._idle.excess(snap)

    def _check_idle_recycle(self, excess: dict[str, int], snap: Snapshot) -> None:
        """Recommend a recycle, once per device until it drops, when this idle
        process alone is above the pool's strictest ``max_fragmentation``."""
        bound = self.effective_policy.strictest_max_fragmentation()
        over: dict[str, tuple[int, int]] = {}
        if bound is not None:
            for uuid, idle in excess.items():
                device = snap.by_uuid(uuid)
                if device is not None and device.total and idle > bound * device.total:
                    over[uuid] = (idle, device.total)
        self._recycle &= set(over)
        for uuid, (idle, total) in over.items():
            if uuid in self._recycle:
                continue
            self._recycle.add(uuid)
            log.warning(
                "worker_recycle_recommended",
                owner=self.owner,
                device=uuid,
                idle_bytes=idle,
                idle_ratio=round(idle / total, 3),
                bound=bound,
                fix="torch.cuda.empty_cache() while idle, or restart this worker, staggered",
            )
            for cb in self._on_recycle:
                # Called once the beat is over (see _beat).
                self._told.append(functools.partial(_call_recycle, cb, uuid, idle))

    def _gpus_record(self, snap: Snapshot | None) -> tuple[str, str]:
        """(host, JSON of this gate's snapshot of its host's GPUs) for the pool;
        ("", "") without one.

        The pool keeps it under the gate's worker id, so the JSON names the
        host: another gate of the same host name may see other devices.
        """
        if not self._register or snap is None:
            return "", ""
        host = snap.host or owner_parts(self.owner)[0]
        now = time.monotonic()
        devices = [
            {
                "uuid": d.uuid,
                "index": d.index,
                "name": d.name,
                "total": d.total,
                "used": d.used,
                "utilization": d.utilization,
                "age_ms": int(snap.device_age_s(d, now) * 1000),
            }
            for d in snap.devices
        ]
        faults = [
            {"uuid": f.uuid, "index": f.index, "error": f.error, "quarantined": f.quarantined}
            for f in snap.faults
        ]
        doc = {"host": host, "backend": snap.backend, "devices": devices, "faults": faults}
        return host, json.dumps(doc, separators=(",", ":"))
