"""Leases: what an admitted job holds until it releases or its holder dies."""

from __future__ import annotations

import functools
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from .. import _process
from .._exceptions import ConfigError, UsageError
from .._units import format_size, parse_size
from ..metrics._instruments import JOB_OUTCOMES

if TYPE_CHECKING:
    from ._gate import Gate

log = structlog.get_logger(__name__)

LeaseCallback = Callable[["Lease"], None]


class Granted(NamedTuple):
    """What a lease's admission wrote that its holder sends with each renewal,
    so that Redis can put back a lease it lost (see renew_leases.lua)."""

    epoch: bytes  # the pool's epoch when admitted (b"" before epochs)
    start_ms: int  # the script clock at admission
    deadline_ms: int  # its class's max_duration deadline (0: none)
    tenant: str | None


class Lease:
    """A slot on one device, held while the gate's heartbeat renews it.

    The lease id is a fencing token: once the lease is gone (released,
    expired, reaped) renewing it never brings it back. Only a lease Redis
    itself lost (it restarted empty, or from an older snapshot) comes back
    with its holder's next renewal. ``lost`` turns true
    when the heartbeat finds it gone while still held, ``lost_reason`` saying
    why: ``"expired"`` (its TTL ran out, or an operator ended it),
    ``"unrenewed"`` (Redis has not confirmed it for a whole TTL) or
    ``"max_duration"``. ``max_duration_reached`` turns true when its class's
    max duration stopped its renewal; it then ends within one TTL, and the
    heartbeat that finds it gone marks it lost with ``"max_duration"`` (the
    ``on_lost`` callbacks run then too). Callbacks given as ``on_lost`` /
    ``on_max_duration`` run on the heartbeat thread and must not block.

    Dropping the last reference to an unreleased lease releases it (outcome
    ``dropped``).
    """

    __slots__ = (
        "__weakref__",
        "_actual",
        "_gate",
        "_granted",
        "_local_done",
        "_lock",
        "_on_lost",
        "_on_max",
        "_renewed_mono",
        "_ttl_s",
        "cls",
        "device",
        "device_uuid",
        "expires_ms",
        "id",
        "lost",
        "lost_reason",
        "max_duration_reached",
        "recycle_recommended",
        "released",
        "vram",
    )

    def __init__(
        self,
        gate: Gate,
        *,
        id: str,
        cls: str,
        vram: int,
        device: int | None,
        device_uuid: str,
        expires_ms: int,
        local: bool = False,
        ttl_s: float | None = None,
        sent_mono: float | None = None,
        granted: Granted | None = None,
    ) -> None:
        self._gate = gate
        self.id = id
        self.cls = cls
        self.vram = vram
        self.device = device
        self.device_uuid = device_uuid
        self.expires_ms = expires_ms
        self.released = False
        self.lost = False
        self.lost_reason: str | None = None
        self.max_duration_reached = False
        self.recycle_recommended = False
        self._lock = threading.Lock()
        self._actual: tuple[int, int, float] | None = None
        self._on_lost: list[LeaseCallback] = []
        self._on_max: list[LeaseCallback] = []
        # When Redis last confirmed it (monotonic): admitted, or renewed; and
        # for how long it did (None: the pool's lease TTL as the gate knows it).
        # A policy that lowers the TTL leaves what Redis granted as it was.
        # Counted from when the admission was sent (``sent_mono``): its TTL
        # runs from when the script ran, which a slow reply hides.
        self._renewed_mono = time.monotonic() if sent_mono is None else sent_mono
        # What its admission wrote, sent with each renewal: Redis puts a lease
        # it lost back from this (renew_leases.lua).
        self._granted = granted
        self._ttl_s = ttl_s
        # A local lease (Redis unreachable, on_backend_error "open") holds a
        # slot of this process's own cap; releasing or dropping it frees that.
        self._local_done: Any = weakref.finalize(self, gate._local_done, id) if local else None

    @property
    def local(self) -> bool:
        """True for an admission made by this process alone while Redis was unreachable."""
        return self._local_done is not None

    def __repr__(self) -> str:
        state = "released" if self.released else "lost" if self.lost else "held"
        return f"<Lease {self.id} {self.cls} on {self.device_uuid} {state}>"

    def on_lost(self, callback: LeaseCallback) -> None:
        """Call ``callback(lease)`` if the lease is found gone while held."""
        self._on_lost.append(callback)

    def on_max_duration(self, callback: LeaseCallback) -> None:
        """Call ``callback(lease)`` when the class's max duration stops renewal."""
        self._on_max.append(callback)

    def report_vram(self, actual: int | str, *, idle: int | str | None = None) -> None:
        """Report the VRAM the job really holds now (bytes or "4GiB").

        ``idle``: the part of it (at most ``actual``) the job's allocator
        holds but does not use (PyTorch: reserved - allocated), the job's
        fragmentation; ``None``
        keeps the last one reported. Sent with the next heartbeat. The gate
        then counts ``max(estimate, actual)`` for this lease, and the idle
        bytes towards its device's fragmentation (``max_fragmentation``).
        """
        self._check_holder("report")
        b = parse_size(actual, key="actual")
        i = -1 if idle is None else parse_size(idle, key="idle")
        if i > b:
            raise ConfigError(
                f"{format_size(i)} is more than the actual {format_size(b)} it is a part of; "
                "idle is what the job's allocator holds of it but does not use",
                key="idle",
                value=idle,
            )
        with self._lock:
            self._actual = (b, i, time.monotonic())

    def _take_report(self) -> tuple[int, int, float] | None:
        with self._lock:
            report, self._actual = self._actual, None
        return report

    def release(self, outcome: str = "ok", *, refund: bool = False) -> bool:
        """Give the slot back; ``outcome`` is "ok", "error", "oom" or "dropped"
        (unused; anything else is a :class:`~gpugate.UsageError`).

        ``refund``: the admission went unused (the job never started, e.g.
        another worker took the task first): the class's rate token is given
        back too. Returns True if the lease was still live in Redis. Idempotent.
        In a child forked from the holder it raises :class:`~gpugate.UsageError`:
        the parent holds the lease and releases it.
        """
        check_outcome(outcome)
        self._check_holder("release it")
        if self.released:
            return False
        self.released = True
        if self._local_done is not None:
            self._local_done()
            return True
        return self._gate._release_lease(self, outcome, refund)

    def _check_holder(self, what: str) -> None:
        """A lease is the process's whose gate took it: a forked child may not use it."""
        if _process.pid != self._gate._pid:
            raise UsageError(f"this lease is held by the parent process's gate; {what} there")

    def _mark_lost(self, reason: str, *, later: list[Callable[[], None]] | None = None) -> bool:
        """Tell the holder, once; True for the call that did (two heartbeats may race).
        ``later``: its callbacks are appended there instead of run now."""
        with self._lock:
            if self.lost or self.released:
                return False
            self.lost = True
            self.lost_reason = reason
        log.warning(
            "lease_lost", lease_id=self.id, cls=self.cls, device=self.device_uuid, reason=reason
        )
        _call_back(self._on_lost, self, later)
        return True

    def _recommend_recycle(self, idle: int, total: int, bound: float) -> None:
        if self.recycle_recommended:
            return
        self.recycle_recommended = True
        log.warning(
            "worker_recycle_recommended",
            lease_id=self.id,
            cls=self.cls,
            device=self.device_uuid,
            idle_bytes=idle,
            idle_ratio=round(idle / total, 3),
            bound=bound,
            fix="torch.cuda.empty_cache() between jobs, or restart this worker when idle",
        )

    def _mark_max_duration(self, *, later: list[Callable[[], None]] | None = None) -> bool:
        """Tell the holder, once; True for the call that did (``later`` as in
        :meth:`_mark_lost`)."""
        with self._lock:
            if self.max_duration_reached:
                return False
            self.max_duration_reached = True
        log.warning(
            "lease_max_duration_reached", lease_id=self.id, cls=self.cls, device=self.device_uuid
        )
        _call_back(self._on_max, self, later)
        return True


def _call_back(
    callbacks: list[LeaseCallback], lease: Lease, later: list[Callable[[], None]] | None
) -> None:
    for cb in callbacks:
        if later is None:
            _run_callback(cb, lease)
        else:
            later.append(functools.partial(_run_callback, cb, lease))


def _run_callback(cb: LeaseCallback, lease: Lease) -> None:
    try:
        cb(lease)
    except Exception:  # a user callback must not kill the heartbeat
        log.exception("lease_callback_failed", lease_id=lease.id)


class Unsent(NamedTuple):
    """A release still to be sent to Redis by the heartbeat: of a lease dropped
    unreleased (``counted`` False: its outcome is counted when sent), or one
    whose release failed while Redis was unreachable (counted already)."""

    device_uuid: str
    lease_id: str
    cls: str
    outcome: str
    counted: bool


def check_outcome(outcome: object) -> None:
    """Raise :class:`~gpugate.UsageError` unless ``outcome`` is one of :data:`JOB_OUTCOMES`."""
    if outcome not in JOB_OUTCOMES:
        raise UsageError(
            f"a release's outcome is one of {', '.join(map(repr, JOB_OUTCOMES))}, not {outcome!r}"
        )


class LeaseRegistry:
    """The leases one gate holds, by weak reference, and the releases to send.

    A lease dropped without release is queued and released by the heartbeat
    (never from inside garbage collection), as is a release that failed
    while Redis was unreachable. ``touch`` is called whenever the set of held
    leases changes (also from garbage collection: it must not lock).

    A dropped lease's weak-reference callback takes no lock: garbage
    collection may run it in a thread that holds the registry's lock (a lease
    in a reference cycle, collected at any allocation). It only queues the
    lease's key; every method moves queued keys to the releases to send.
    """

    def __init__(self, touch: Callable[[], None] | None = None) -> None:
        # Re-entrant: the gate's close() may run in a signal handler that
        # interrupted its thread in here. Every step leaves the registry
        # usable; the handler may only miss the one lease being added or
        # moved to the releases right then.
        self._lock = threading.RLock()
        self._held: dict[tuple[str, str], weakref.ReferenceType[Lease]] = {}
        self._unsent: list[Unsent] = []
        self._dropped: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()
        self._touch = touch

    def add(self, lease: Lease) -> None:
        """Hold ``lease`` until it is released or dropped."""
        key = (lease.device_uuid, lease.id)
        cls = lease.cls
        dropped_queue = self._dropped
        touch = self._touch

        def dropped(_: object, key: tuple[str, str] = key) -> None:
            dropped_queue.put((*key, cls))  # SimpleQueue.put: safe from garbage collection
            if touch is not None:
                touch()

        with self._lock:
            self._settle_dropped()
            self._held[key] = weakref.ref(lease, dropped)
        if self._touch is not None:
            self._touch()

    def _settle_dropped(self) -> None:
        """Move the leases dropped since (queued by their callbacks) to the
        releases to send. The caller holds the lock."""
        while not self._dropped.empty():
            uuid, lease_id, cls = self._dropped.get_nowait()
            ref = self._held.get((uuid, lease_id))
            if ref is not None and ref() is None:
                del self._held[(uuid, lease_id)]
                self._unsent.append(Unsent(uuid, lease_id, cls, "dropped", False))

    def discard(self, lease: Lease) -> None:
        """Stop renewing ``lease``."""
        with self._lock:
            self._settle_dropped()
            found = self._held.pop((lease.device_uuid, lease.id), None)
        if found is not None and self._touch is not None:
            self._touch()

    def live(self) -> list[Lease]:
        """The leases still held and worth renewing."""
        with self._lock:
            self._settle_dropped()
            refs = list(self._held.values())
        out = []
        for ref in refs:
            lease = ref()
            if lease is not None and not lease.released:
                out.append(lease)
        return out

    def send_later(self, *releases: Unsent) -> None:
        """Queue releases for the heartbeat to send (again)."""
        with self._lock:
            self._settle_dropped()
            self._unsent.extend(releases)

    def take_unsent(self) -> list[Unsent]:
        """The releases queued since the last call, oldest first."""
        with self._lock:
            self._settle_dropped()
            unsent, self._unsent = self._unsent, []
        return unsent

    def known(self) -> set[tuple[str, str]]:
        """(device uuid, lease id) of every lease held or with a release queued."""
        with self._lock:
            self._settle_dropped()
            pairs = set(self._held)
            pairs.update((u.device_uuid, u.lease_id) for u in self._unsent)
        return pairs

    def has_unsent(self) -> bool:
        """Whether a release waits to be sent."""
        return bool(self._unsent) or not self._dropped.empty()

    def __len__(self) -> int:
        with self._lock:
            self._settle_dropped()
            return len(self._held)
