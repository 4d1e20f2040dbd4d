"""Keeping a gate's leases: the heartbeat's beat, releases, and what a holder is told.

Every lease a gate holds is renewed by its heartbeat (one ``renew_leases``
call every TTL/3, which also carries the worker's registry record) until it
is released; a release that fails is sent again by the next beat; a lease
Redis has not confirmed for a whole TTL is reported lost (``unrenewed``), one
found gone is reported lost (``expired``), and a lease of this gate that it
does not know of (its decision's reply was lost) is given back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from .. import _process
from .._exceptions import BackendError, GpugateError, UsageError
from ..sampling import Snapshot
from ..state._inspect import read_pool
from ._core import refusal
from ._heartbeat import Heartbeat
from ._lease import Lease, Unsent
from ._workers import WorkerRecord

log = structlog.get_logger(__name__)


class LeaseKeeping(WorkerRecord):
    """Renewal and release of a gate's leases (see ``Gate``)."""

    def _hold(self, lease: Lease) -> None:
        """Renew ``lease`` from now on; raises :class:`UsageError` when the gate
        closed meanwhile (the lease is given back: nothing would renew it)."""
        self._leases.add(lease)
        if self._closed:
            # Admitted while close() ran. close() sets _closed before it goes
            # through the leases, so one of the two releases it (both may: the
            # second finds it gone). The caller hears that the gate is closed,
            # as a decision that started a moment later would, not of a lease
            # it cannot use.
            if not lease.released:
                lease.released = True
                self._leases.discard(lease)
                self._late(lambda: self._release_lease(lease, "dropped"))
            raise UsageError("this Gate is closed")
        self._ensure_heartbeat()

    def _kick_heartbeat(self) -> None:
        """Beat now (started if need be)."""
        self._ensure_heartbeat()
        heartbeat = self._heartbeat
        if heartbeat is not None:
            heartbeat.kick()

    def _ensure_heartbeat(self) -> None:
        # Without the lock once started or closed: no lock per admission, and
        # none on close()'s path (a failed release comes here), which may run
        # in a signal handler that interrupted this thread holding _lock.
        if self._heartbeat is not None or self._closed:
            return
        with self._lock:
            # A gate closing now may have stopped its heartbeat already.
            if self._heartbeat is None and not self._closed:
                self._heartbeat = Heartbeat(self)
                self._heartbeat.start()

    def _release_lease(self, lease: Lease, outcome: str, refund: bool = False) -> bool:
        self._leases.discard(lease)
        self.metrics.job_outcomes.labels(lease.cls, outcome).inc()
        if outcome == "oom":
            log.warning(
                "job_oom",
                cls=lease.cls,
                device=lease.device_uuid,
                lease_id=lease.id,
                vram_bytes=lease.vram,
                fix="raise the class's VRAM estimate or the pool's safety_margin",
            )
        if _process.pid != self._pid:
            return False  # the parent's lease; the parent releases it
        try:
            return self._release(lease.device_uuid, lease.id, outcome, refund=refund)
        except BackendError as exc:
            # Sent again by the heartbeat once Redis answers (with its outcome;
            # the refund of an unused admission is not), so the slot is not
            # held for a TTL after an outage and the outcome is not "expired".
            self._leases.send_later(Unsent(lease.device_uuid, lease.id, lease.cls, outcome, True))
            self._ensure_heartbeat()
            log.warning(
                "lease_release_failed",
                lease_id=lease.id,
                error=str(exc),
                note="the heartbeat sends it again when Redis answers; else it expires "
                "within one TTL",
            )
            return False
        except BaseException:
            # Interrupted mid-call (Ctrl-C, sys.exit from a signal handler):
            # Redis may not have had it, and the lease is no longer renewed. A
            # release is idempotent: it is sent again by the next beat or by
            # close(), or now if close() ran meanwhile (a signal handler's).
            self._leases.send_later(Unsent(lease.device_uuid, lease.id, lease.cls, outcome, True))
            if self._closed:
                with contextlib.suppress(BackendError):
                    self._late(self._send_releases)
            raise

    def _release(self, dev_uuid: str, lease_id: str, outcome: str, *, refund: bool = False) -> bool:
        """Run release_lease.lua for one lease; True if it was still live."""
        done = self._call(
            self._scripts.release_lease,
            keys=[self._keys.state, self._keys.exp, self._keys.buckets],
            args=[self._keys.prefix, self._now_arg(), dev_uuid, lease_id, outcome, int(refund)],
        )
        return bool(done)

    def leases_held(self) -> list[Lease]:
        """The leases this gate holds now."""
        self._check_usable()
        return self._leases.live()

    def _beat(self) -> None:
        """One heartbeat: release dropped leases, renew the rest.

        Beats (the heartbeat thread's, :meth:`beat_now`) go one at a time, so
        that a beat computed earlier never lands after a later one and
        overwrites its figures (idle memory, reported actuals). Decisions do
        not wait for this lock. What the beat has to tell holders (their
        ``on_lost``, ``on_max_duration``, ``on_recycle_recommended``
        callbacks) runs after the lock is released: a callback may call back
        into the gate (``beat_now`` included).
        """
        told: list[Callable[[], None]] = []
        try:
            with self._beat_lock:
                try:
                    self._beat_once()
                finally:
                    told, self._told = self._told, []
        finally:
            for tell in told:
                tell()

    def _send_releases(self) -> None:
        """Send the queued releases (dropped leases, releases that failed); on a
        failure the rest stay queued and the error is raised."""
        unsent = self._leases.take_unsent()
        for i, item in enumerate(unsent):
            try:
                self._release(item.device_uuid, item.lease_id, item.outcome)
            except BackendError:
                self._leases.send_later(*unsent[i:])
                raise
            if not item.counted:
                self.metrics.job_outcomes.labels(item.cls, item.outcome).inc()

    def _beat_once(self) -> None:
        if self._closed:
            return  # close() released what it held; a late one goes through _late
        # Past a TTL since Redis last confirmed them, whatever the calls below
        # find: the pool may have given their room away already. And again
        # when they fail: each may have waited a socket timeout.
        self._give_up_unrenewed(self._leases.live())
        try:
            self._send_releases()
            self._renew()
        except BackendError:
            self._give_up_unrenewed(self._leases.live())
            raise

    def _renew(self) -> None:
        """Renew every held lease (and the worker's registration) in one call."""
        # Leases past their max duration go too: the script no longer renews them
        # (status 2) and says when they are gone (0), so their holder is told.
        leases = self._leases.live()
        if not leases and not self._register:
            return
        try:
            snap: Snapshot | None = self.sampler.sample()
        except GpugateError as exc:  # the sampler's own errors are logged by it
            log.debug("heartbeat_without_snapshot", error=str(exc))
            snap = None
        except Exception as exc:
            # A sampler of the caller's own that fails: renewing needs no
            # snapshot, and leases left unrenewed would be given away.
            log.warning("heartbeat_without_snapshot", error=repr(exc))
            snap = None
        excess = self._idle_excess(snap)
        args: list[Any] = [
            self._keys.prefix,
            self._now_arg(),
            self.owner if self._register else "",
            self._worker_info(len(leases)) if self._register else "",
            *self._gpus_record(snap),
            "-" if excess is None else " ".join(f"{u} {b}" for u, b in sorted(excess.items())),
            len(leases),
        ]
        reports = []
        now = beat_started = time.monotonic()
        for lease in leases:
            report = lease._take_report()
            reports.append(report)
            if report is None:
                args += [lease.device_uuid, lease.id, -1, 0, -1]
            else:
                actual, idle, measured = report
                args += [lease.device_uuid, lease.id, actual, int((now - measured) * 1000), idle]
            g = lease._granted
            if g is None:  # not from a decision of this gate (tests): never put back
                args += [b"", lease.cls, 0, 0, 0, "-", ""]
            else:
                args += [g.epoch, lease.cls, lease.vram, g.start_ms, g.deadline_ms, g.tenant or "-"]
                args.append(self.owner)
        keys = [
            self._keys.state,
            self._keys.exp,
            self._keys.waiters,
            self._keys.workers,
            self._keys.workerinfo,
            self._keys.idle_memory,
            self._keys.idle_seen,
            self._keys.samples,
        ]
        try:
            try:
                reply = self._call(self._scripts.renew_leases, keys=keys, args=args)
            except BackendError as exc:
                if not refusal(exc).startswith("nopolicy"):
                    raise
                # The pool lost its policy (flushed, or new): publish this gate's
                # (or the default) as a decision would, and beat again.
                self.sync_policy()
                reply = self._call(self._scripts.renew_leases, keys=keys, args=args)
            self._note_redis_clock(reply[0], time.monotonic())
        except BackendError:
            for lease, report in zip(leases, reports, strict=True):
                if report is not None:  # send it again next time
                    with lease._lock:
                        lease._actual = lease._actual or report
            raise
        if snap is not None:
            self._check_fragmentation(leases, reports, snap)
            if excess is not None:
                self._idle_sent = excess
                self._check_idle_recycle(excess, snap)
        if reply[1] and reply[1] != self._pool_version_b:
            self._follow_pool_policy(reply[1])
        if self._maybe_orphans:
            self._give_back_orphans()
        redis_now = int(reply[0])
        epoch = reply[2 + 2 * len(leases)]
        for i, lease in enumerate(leases):
            status, expires = int(reply[2 + 2 * i]), int(reply[3 + 2 * i])
            if status == 3:
                # Redis had lost it with its state and put it back (renew_leases.lua).
                log.warning("lease_restored", lease_id=lease.id, cls=lease.cls, pool=self.pool)
                status = 1
            if status == 1:
                lease.expires_ms = expires
                lease._renewed_mono = beat_started
                lease._ttl_s = (expires - redis_now) / 1000
                if lease._granted is not None and lease._granted.epoch != epoch:
                    lease._granted = lease._granted._replace(epoch=epoch)
            elif status == 2:
                lease.expires_ms = expires
                lease._renewed_mono = beat_started
                if lease._mark_max_duration(later=self._told):
                    self.metrics.leases_max_duration.labels(lease.cls).inc()
            else:
                self._leases.discard(lease)
                # The background heartbeat and beat_now() may both see it gone.
                # One whose renewal max_duration stopped ended as the pool counts
                # it (outcome max_duration), not as one its holder let expire.
                reason = "max_duration" if lease.max_duration_reached else "expired"
                if lease._mark_lost(reason, later=self._told):
                    self.stats["leases_lost"] += 1
                    self.metrics.leases_lost.labels(lease.cls).inc()

    def _give_back_orphans(self, settle_ms: int | None = None) -> None:
        """Release (as ``dropped``) the leases Redis holds for this gate that it
        does not know of: admitted by a decision whose reply was lost (a
        timeout mid-call, an interrupt). Only leases older than ``settle_ms``
        (default: a socket timeout and a second): a decision still in flight
        may not have brought its own home yet (none is, once the gate closes)."""
        self._maybe_orphans = False
        held = self._leases.known()
        if settle_ms is None:
            settle_ms = int(self._socket_timeout_s * 1000) + 1000
        try:
            view = read_pool(self._client, self.pool, redis_url=self.redis_url)
        except BackendError:
            self._maybe_orphans = True  # the next beat looks again
            return
        for lease in view.leases:
            if lease.owner != self.owner or (lease.device, lease.id) in held:
                continue
            if lease.released_ms != 0 or lease.expires_ms == 0:
                continue  # a ghost, or gone from the expiry set
            if view.now_ms - lease.start_ms < settle_ms:
                self._maybe_orphans = True  # too young to tell: the next beat looks again
                continue
            log.warning(
                "lease_orphan_released", lease_id=lease.id, cls=lease.cls, device=lease.device
            )
            self._leases.send_later(Unsent(lease.device, lease.id, lease.cls, "dropped", False))
        with contextlib.suppress(BackendError):
            self._send_releases()

    def _unconfirmed_for_s(self) -> float:
        """Seconds until the first held lease reaches a TTL since Redis last
        confirmed it (infinity with none)."""
        leases = self._leases.live()
        if not leases:
            return float("inf")
        ttl = self.effective_policy.pool.lease_ttl_s
        first = min(lease._renewed_mono + _granted_s(lease, ttl) for lease in leases)
        return first - time.monotonic()

    def _give_up_unrenewed(self, leases: list[Lease]) -> None:
        """Tell the holders of leases Redis has not confirmed for a whole TTL
        that they may be gone (``unrenewed``): from then on the pool may reap
        them and give their room to other jobs. They are released (as
        ``dropped``) once Redis answers, in case nobody reaped them."""
        ttl = self.effective_policy.pool.lease_ttl_s
        now = time.monotonic()
        for lease in leases:
            if now - lease._renewed_mono > _granted_s(lease, ttl) and lease._mark_lost(
                "unrenewed", later=self._told
            ):
                self._leases.discard(lease)
                self._leases.send_later(
                    Unsent(lease.device_uuid, lease.id, lease.cls, "dropped", False)
                )
                self.stats["leases_lost"] += 1
                self.metrics.leases_lost.labels(lease.cls).inc()

    def beat_now(self) -> None:
        """Renew every held lease now, in this thread (tests, shutdown paths)."""
        self._check_usable()
        self._beat()


def _granted_s(lease: Lease, pool_ttl_s: float) -> float:
    """How long Redis confirmed ``lease`` for at its last confirmation: what it
    granted then, not the pool's TTL now (a policy may have lowered it since)."""
    return pool_ttl_s if lease._ttl_s is None else lease._ttl_s
