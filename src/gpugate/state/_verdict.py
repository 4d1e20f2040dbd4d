"""The pool's health in one line: what ``gpugate status`` prints first and
``gpugate_pool_health`` exports (:func:`assess` of a :class:`~._inspect.PoolView`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .._units import format_duration, format_size
from ..sampling._sample import LOST_PREFIX
from ._inspect import DECISION_MINUTES, PoolView

__all__ = ["Verdict", "assess"]

# Verdict thresholds: the highest class is interactive work, so a short wait
# already hurts; lower classes are meant to wait, until they wait for long.
TOP_CLASS_WAIT_S = 30.0
OTHER_CLASS_WAIT_S = 600.0
MEMORY_HIGH_RATIO = 0.95
# A class deferred with no admission for this long (by the per-minute counts)
# while requests of it wait is DEGRADED even when no single request waited
# long (requests that give up and come back start a new wait). Lower classes
# get their longer wait limit.
STALL_S = 300.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The pool's health in one line.

    ``level`` is ``OK``, ``DEGRADED``, ``CRITICAL`` or ``UNKNOWN`` (no policy:
    nothing has used the pool). ``reasons`` set the level; ``notes`` are worth
    knowing but do not (a cap in force, leases waiting to be reaped).
    """

    level: Literal["OK", "DEGRADED", "CRITICAL", "UNKNOWN"]
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def line(self) -> str:
        """``OK`` or ``LEVEL: reason; reason``."""
        return self.level if not self.reasons else f"{self.level}: {'; '.join(self.reasons)}"

    @property
    def severity(self) -> int:
        """0 OK, 1 DEGRADED, 2 CRITICAL, -1 UNKNOWN (the metric's value)."""
        return {"OK": 0, "DEGRADED": 1, "CRITICAL": 2, "UNKNOWN": -1}[self.level]


def assess(view: PoolView, *, extra: Iterable[str] = ()) -> Verdict:
    """The pool's health: what ``gpugate status`` prints first.

    CRITICAL when no GPU is visible to the pool while it has a policy (no
    device has ever sent a sample, none has reported for
    :data:`REPORT_WINDOW_S` or a lease TTL, or requests wait for ``no_gpu``). DEGRADED
    when the highest class waits 30 s or more, another class 10 min or more,
    a class with requests waiting has been deferred without a single
    admission for 5 min or more (the highest class) or 10 min or more (the
    others) by the per-minute decision counts, a device is quarantined (lost)
    or its memory is 95 % used (while it reports: not by the last sample of a
    device that stopped reporting), a class is paused, or requests wait for a
    fresh sample. UNKNOWN for
    a pool without a policy (nothing used it yet).

    ``extra``: more DEGRADED reasons, read from elsewhere than the pool's
    state; those of its Asynq queues
    (:attr:`gpugate.state._queues.QueuesView.concerns`). Status and the
    metrics collector pass the same, so that the printed verdict and
    ``gpugate_pool_health`` agree.
    """
    now = view.now_ms
    if view.policy is None:
        why = view.policy_error or (
            f"pool {view.pool!r} has no policy: nothing has used it yet "
            "(wrong --pool? `gpugate policy apply FILE` sets one)"
        )
        return Verdict("UNKNOWN", (why,))
    critical: list[str] = []
    degraded: list[str] = []
    notes: list[str] = []
    no_gpu = [w for w in view.waiters if w.reason == "no_gpu"]
    # A device known without a sample (lost before it sent one, or its sample
    # removed by the heartbeats) has no age.
    ages = [d.sample_age_s(now) for d in view.devices if d.sample_ms]
    if not view.devices:
        critical.append("no GPU visible (no device has sent a sample to this pool)")
    elif not view.reporting_devices():
        since = f"for {format_duration(round(min(ages)))}" if ages else "lately"
        critical.append(
            f"no GPU has reported {since} "
            "(no decision's sample, no host heartbeat: are the GPU hosts' workers running?)"
        )
    elif no_gpu:
        critical.append(f"no GPU visible to {len(no_gpu)} waiting request(s)")
    if view.recovering_until_ms > view.now_ms:
        recovery_left = format_duration(
            max(1, round((view.recovering_until_ms - view.now_ms) / 1000))
        )
        degraded.append(
            f"recovering: Redis lost its state; nothing is admitted for {recovery_left} while the "
            "holders' heartbeats put their leases back"
        )
    stale = [w for w in view.waiters if w.reason == "stale_sample"]
    if stale:
        newest = min(ages, default=0.0)
        degraded.append(f"no fresh GPU sample (newest is {format_duration(round(newest))} old)")
    top = view.policy.highest_classes
    for name, c in view.classes.items():
        limit = TOP_CLASS_WAIT_S if name in top else OTHER_CLASS_WAIT_S
        if c.waiters and c.oldest_wait_s >= limit:
            why = max(c.waiting_by_reason, key=lambda r: c.waiting_by_reason[r])
            degraded.append(f"{name} waits {_short(c.oldest_wait_s)} ({why})")
        elif c.waiters and c.pause is None:
            # Requests that give up and come back each start a new wait: the
            # per-minute counts still show the class deferred without admission.
            stalled = c.recent.unadmitted_s()
            if stalled >= max(STALL_S, limit):
                window = c.recent.window(min(DECISION_MINUTES - 1, int(stalled // 60)))
                why = window.reasons_text("defer")
                degraded.append(
                    f"{name} admitted none in {window.minutes}m ({window.deferred} deferred: {why})"
                )
    # Memory figures count only while their device reports: the last sample of
    # a host that died is not its memory now.
    reporting = {d.uuid for d in view.reporting_devices()}
    for d in view.devices:
        if d.quarantined:
            degraded.append(
                f"GPU {_short_uuid(d.uuid)} lost (quarantined): nothing is admitted there"
            )
        elif d.uuid in reporting and d.total and d.used / d.total >= MEMORY_HIGH_RATIO:
            degraded.append(f"GPU {_short_uuid(d.uuid)} memory {d.used * 100 // d.total}% used")
        if d.total and d.reserved > d.total:
            # More committed than the device holds: leases put back after Redis
            # lost its state on top of what was admitted meanwhile (or gates of
            # an earlier release, which do not wait out the recovery window).
            degraded.append(
                f"GPU {_short_uuid(d.uuid)} has {format_size(d.reserved)} committed "
                f"on {format_size(d.total)}"
            )
    bounds = {
        name: c.max_fragmentation
        for name, c in view.policy.classes.items()
        if c.max_fragmentation is not None
    }
    if bounds:
        strictest = min(bounds.values())
        for d in view.devices:
            if d.uuid not in reporting:
                continue
            if d.fragmentation is not None and d.fragmentation > strictest:
                kept_off = ", ".join(sorted(n for n, b in bounds.items() if d.fragmentation > b))
                idle = ""
                if d.idle_workers and d.total:
                    holders = sorted(
                        (w for w in view.workers if w.idle_memory.get(d.uuid)),
                        key=lambda w: -w.idle_memory[d.uuid],
                    )
                    named = ", ".join(f"{w.host}:{w.pid}" for w in holders[:3])
                    more = f" and {len(holders) - 3} more" if len(holders) > 3 else ""
                    idle = (
                        f" ({d.idle_workers / d.total:.0%} held by idle workers above their "
                        f"warm baseline: {named}{more})"
                    )
                notes.append(
                    f"GPU {_short_uuid(d.uuid)} is {d.fragmentation:.0%} fragmented{idle}, above "
                    f"the max_fragmentation of {kept_off}: recycle its workers' allocator caches "
                    "(torch.cuda.empty_cache() or a staggered restart)"
                )
    for o in view.overrides:
        left = o.remaining_s(now)
        if left is None:
            when = "until `gpugate resume`" if o.kind == "pause" else "until `gpugate uncap`"
        else:
            when = f"reverts in {_short(left)}"
        if o.kind == "pause":
            degraded.append(f"{o.cls} paused by {o.who or 'unknown'} ({when})")
        else:
            notes.append(f"{o.cls} capped at {o.n} by {o.who or 'unknown'} ({when})")
    degraded.extend(extra)
    overdue = [lease for lease in view.leases if lease.overdue(now)]
    if overdue:
        notes.append(
            f"{len(overdue)} lease(s) past expiry: their holders stopped renewing; "
            "the next decision frees them"
        )
    if critical:
        return Verdict("CRITICAL", (*critical, *degraded), tuple(notes))
    if degraded:
        return Verdict("DEGRADED", tuple(degraded), tuple(notes))
    return Verdict("OK", (), tuple(notes))


def _short(seconds: float) -> str:
    """A duration to the second (or ms below one second), for verdicts."""
    return format_duration(round(seconds) if seconds >= 1 else round(seconds, 3))


def _short_uuid(uuid: str) -> str:
    # A lost device's stand-in id (LOST-gpu<index>@<host>) is whole or useless.
    if len(uuid) <= 20 or uuid.startswith(LOST_PREFIX):
        return uuid
    return uuid[:20] + "…"
