"""A read-only view of one pool's state in Redis, for status and metrics.

:func:`read_pool` reads every key of a pool in two pipelined round trips and
returns a :class:`PoolView`; nothing is written, so ``gpugate status`` and the
metrics collector can run as often as they like beside the workers. On a
plain Redis the first round trip is a ``MULTI``/``EXEC``, so the state hash,
the leases' expiries, the waiters, samples and buckets are of one instant;
the device hashes and the per-minute decision counts follow in a second round
trip (a lease that ended between the two shows as a ghost). On Redis Cluster
both are plain pipelines to the pool's one slot.

The record formats are those of ``lua/_prelude.lua``. Time is the scripts'
time: ``max(Redis TIME, the pool's clock)``, unless ``now_ms`` is given (tests
driving the scripts' injectable clock).

Recent decisions: the admission script counts each of its answers in
``P dec:<minute>`` (minute = script time in ms // 60000; field
``"<class> <outcome> <reason>"``; kept 16 minutes). The second round trip
reads the current minute's hash and the 15 before it, by the time the first
round trip gave, into :class:`RecentDecisions` per class. Windows are whole
minutes: "the last N minutes" is the current minute so far plus the N whole
minutes before it, so it spans N to N + 1 minutes (``span_s``) and never
misses an answer given within the last N minutes. DEFERs a worker answered
by its local pre-check never reach Redis and are not counted.

``state/_verdict.py`` turns a view into the one-line verdict of ``gpugate
status`` (``OK``, ``DEGRADED: …``, ``CRITICAL: …``), also exported as a metric.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from .._exceptions import BackendError, ConfigError
from .._units import to_ms
from ..policy import Policy
from ._connect import REDIS_DOWN, Client, down_reason, mask_url, refuses_writes
from ._keys import PoolKeys, owner_parts, waiter_owner

__all__ = [
    "ClassView",
    "DecisionCounts",
    "DeviceView",
    "LeaseView",
    "OverrideView",
    "PoolView",
    "RecentDecisions",
    "WaiterView",
    "WorkerView",
    "read_pool",
]


# The decision hashes read: the current minute and the 15 before it (the
# admission script keeps each for 16 minutes). Windows of status and metrics.
DECISION_MINUTES = 16
# A device reports to its pool through the decisions made with its samples and
# through its host's heartbeat (every lease TTL/3, even while idle). One
# silent for this long, or for a lease TTL when that is longer, counts as gone
# (its host down, or no worker running there): with none left the verdict is
# CRITICAL and gpugate_gpus reads 0; its memory figures are no longer exported
# nor judged by the verdict. The heartbeats (renew_leases.lua) remove its
# sample 10 lease TTLs on, never within this window.
REPORT_WINDOW_S = 120.0
RECENT_WINDOWS = (1, 5, 15)
OUTCOMES = ("admit", "defer", "reject")


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


@dataclass(frozen=True, slots=True)
class LeaseView:
    """One lease record on a device (live, overdue, or a ghost).

    Sizes in bytes, times in ms of the scripts' clock. ``expires_ms`` is 0 for
    a lease no longer in the expiry set (a ghost: released or reaped, whose
    memory counts until a later sample). ``max_deadline_ms`` 0 = no bound.
    """

    id: str
    device: str
    cls: str
    estimate: int
    actual: int
    actual_at_ms: int
    released_ms: int
    start_ms: int
    max_deadline_ms: int
    owner: str
    tenant: str | None
    expires_ms: int
    idle: int = 0

    @property
    def held(self) -> int:
        """Bytes the gate counts for it: ``max(estimate, actual)``."""
        return max(self.estimate, self.actual)

    def live(self, now_ms: int) -> bool:
        """Not released and not past its expiry."""
        return self.released_ms == 0 and self.expires_ms > now_ms

    @property
    def ends_at_max_duration(self) -> bool:
        """Its expiry lies past its max deadline: renewal stops at that deadline,
        so it ends by its class's ``max_duration`` (the scripts count it as
        released with outcome ``max_duration``, not as expired)."""
        return 0 < self.max_deadline_ms < self.expires_ms

    def overdue(self, now_ms: int) -> bool:
        """Past its expiry but not reaped yet, and not ended by its max duration:
        its holder stopped renewing it."""
        return (
            self.released_ms == 0
            and 0 < self.expires_ms <= now_ms
            and not self.ends_at_max_duration
        )


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device as the pool knows it: its freshest sample and the leases on it.

    ``used`` is what the device reported (NVML); ``reserved`` what the gate
    holds for leases (``Σ max(estimate, actual)``, ghosts included until a
    later sample); ``leases`` the live leases on it. A lease past its expiry
    but not reaped (overdue) is in neither, as in :class:`ClassView`.
    ``unmanaged`` is what the device uses beyond the leases' measured actuals
    (notebooks, contexts, foreign processes).
    ``fragmentation`` is the share of its memory held but unused: what its
    jobs' allocators report holding unused, plus ``idle_workers``, the bytes
    idle registered workers hold there above their warm baseline (NVML's
    per-process figures); ``None`` when neither was reported.
    Utilisation, quarantine, host and name come from the snapshots the gates
    that see it publish with every heartbeat, merged (``None`` when none has).
    """

    uuid: str
    total: int
    used: int
    sample_ms: int
    reserved: int
    unmanaged: int
    leases: int
    ghosts: int
    utilization: float | None = None
    fragmentation: float | None = None
    quarantined: bool | None = None
    host: str | None = None
    name: str = ""
    idle_workers: int = 0

    @property
    def free(self) -> int:
        """Bytes the device reports free: ``total - used``."""
        return max(0, self.total - self.used)

    @property
    def committed(self) -> int:
        """Bytes taken in the gate's view: ``max(used, unmanaged + reserved)``."""
        return max(self.used, self.unmanaged + self.reserved)

    @property
    def available(self) -> int:
        """Bytes a new job could get, before the safety margin and class reserves."""
        return max(0, self.total - self.committed)

    def sample_age_s(self, now_ms: int) -> float:
        """Seconds since the device's freshest sample was taken."""
        return max(0.0, (now_ms - self.sample_ms) / 1000)


@dataclass(frozen=True, slots=True)
class WaiterView:
    """A deferred request still counting as waiting (waiter record of the prelude)."""

    id: str
    owner: str
    cls: str
    priority: int
    since_ms: int
    vram: int
    wants: str
    expires_ms: int
    device: str | None
    reason: str

    def waited_s(self, now_ms: int) -> float:
        """Seconds since its first DEFER."""
        return max(0.0, (now_ms - self.since_ms) / 1000)


@dataclass(frozen=True, slots=True)
class OverrideView:
    """A runtime pause or cap still in force, with who set it, why and when.

    ``until_ms`` 0 = until cleared; ``at_ms`` when it was last set (0 if
    unknown); ``since_ms`` when it came into force: setting it again while in
    force (extending a pause, changing a cap) keeps it, one set after it was
    lifted or expired starts afresh (0 if unknown); ``n`` the cap (``None``
    for a pause).
    """

    kind: Literal["pause", "cap"]
    cls: str
    until_ms: int
    who: str
    why: str
    at_ms: int
    n: int | None = None
    since_ms: int = 0

    def remaining_s(self, now_ms: int) -> float | None:
        """Seconds until it reverts by itself; ``None`` when it has no expiry."""
        return None if self.until_ms == 0 else max(0.0, (self.until_ms - now_ms) / 1000)


@dataclass(frozen=True, slots=True)
class DecisionCounts:
    """A class's answers from the admission script over one window of whole minutes.

    ``minutes`` is the window's nominal length: the current minute so far plus
    the ``minutes`` whole minutes before it, which is ``span_s`` seconds (from
    60 * ``minutes`` to 60 * (``minutes`` + 1)). ``reasons`` maps each outcome
    (``admit``, ``defer``, ``reject``) to its counts by reason, largest first.
    """

    minutes: int
    span_s: float
    admitted: int
    deferred: int
    rejected: int
    reasons: Mapping[str, Mapping[str, int]]

    @property
    def total(self) -> int:
        """Every answer in the window."""
        return self.admitted + self.deferred + self.rejected

    def top(self, outcome: str, n: int = 3) -> list[tuple[str, int]]:
        """The ``n`` most frequent reasons of ``outcome`` with their counts."""
        return list(self.reasons.get(outcome, {}).items())[:n]

    def reasons_text(self, outcome: str, n: int = 3) -> str:
        """``vram 300, rate 40`` (the top ``n``, then ``other N``); a lone reason bare.

        For ``admit`` only reasons other than ``ok`` (``cpu``) are named.
        """
        per = {r: k for r, k in self.reasons.get(outcome, {}).items() if k}
        total = sum(per.values())
        if outcome == "admit":
            per.pop("ok", None)
        if not per:
            return ""
        if len(per) == 1 and sum(per.values()) == total:
            return next(iter(per))
        items = list(per.items())
        text = ", ".join(f"{r} {k}" for r, k in items[:n])
        rest = sum(k for _, k in items[n:])
        return text + (f", other {rest}" if rest else "")

    def describe(self) -> str:
        """``120 admitted, 340 deferred (vram 300, rate 40), 2 rejected (too_large)``.

        Admitted always, deferred and rejected when any; ``no decisions`` for none.
        """
        if not self.total:
            return "no decisions"
        parts = []
        for outcome, n, word in (
            ("admit", self.admitted, "admitted"),
            ("defer", self.deferred, "deferred"),
            ("reject", self.rejected, "rejected"),
        ):
            if n or outcome == "admit":
                why = self.reasons_text(outcome)
                parts.append(f"{n} {word}" + (f" ({why})" if why else ""))
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class RecentDecisions:
    """A class's answers from the admission script, by minute, over the last 15 minutes.

    ``by_minute`` maps a minute (script time in ms // 60000) to counts by
    ``(outcome, reason)``; only minutes with answers appear. ``now_ms`` is the
    time the view was read at. DEFERs answered by a worker's local pre-check
    are not in Redis, so not here (each worker's ``gpugate_decisions_total``
    has them).
    """

    now_ms: int = 0
    by_minute: Mapping[int, Mapping[tuple[str, str], int]] = field(default_factory=dict)

    def window(self, minutes: int) -> DecisionCounts:
        """The answers of the current minute so far and the ``minutes`` whole ones before it."""
        if not 0 <= minutes < DECISION_MINUTES:
            raise ValueError(f"a decision window is 0 to {DECISION_MINUTES - 1} minutes")
        current = self.now_ms // 60_000
        counts: dict[str, dict[str, int]] = {o: {} for o in OUTCOMES}
        for minute, by_key in self.by_minute.items():
            if current - minutes <= minute <= current:
                for (outcome, reason), n in by_key.items():
                    per = counts.setdefault(outcome, {})
                    per[reason] = per.get(reason, 0) + n
        reasons = {
            o: dict(sorted(per.items(), key=lambda kv: (-kv[1], kv[0])))
            for o, per in counts.items()
        }
        return DecisionCounts(
            minutes=minutes,
            span_s=minutes * 60 + (self.now_ms % 60_000) / 1000,
            admitted=sum(reasons["admit"].values()),
            deferred=sum(reasons["defer"].values()),
            rejected=sum(reasons["reject"].values()),
            reasons=reasons,
        )

    @property
    def last_1m(self) -> DecisionCounts:
        """The current minute so far and the whole one before it."""
        return self.window(1)

    @property
    def last_5m(self) -> DecisionCounts:
        """The current minute so far and the 5 whole ones before it."""
        return self.window(5)

    @property
    def last_15m(self) -> DecisionCounts:
        """The current minute so far and the 15 whole ones before it (all that is kept)."""
        return self.window(15)

    def unadmitted_s(self) -> float:
        """At least how long the class has been deferred without being admitted.

        Counted from the first minute with a DEFER (pauses aside: a paused
        class is reported as paused) after the last minute with an admission;
        0 when no DEFER followed the last admission. A lower bound, capped by
        the 16 minutes kept: the first such DEFER may have come up to a minute
        earlier.
        """
        admitted = [m for m, by_key in self.by_minute.items() if _has(by_key, "admit")]
        last_admit = max(admitted, default=None)
        deferred = [
            m
            for m, by_key in self.by_minute.items()
            if (last_admit is None or m > last_admit) and _has(by_key, "defer", but="paused")
        ]
        if not deferred:
            return 0.0
        return max(0.0, (self.now_ms - (min(deferred) + 1) * 60_000) / 1000)


def _has(by_key: Mapping[tuple[str, str], int], outcome: str, *, but: str = "") -> bool:
    return any(n > 0 and o == outcome and r != but for (o, r), n in by_key.items())


@dataclass(frozen=True, slots=True)
class ClassView:
    """One class: its policy figures, overrides, live leases, waiters and counters.

    ``cap`` is the effective pool-wide cap (policy lowered by a runtime cap;
    ``None`` for none). ``tokens`` is the bucket's level now (``None`` without
    a rate). ``released`` counts ended leases by outcome (``ok``, ``error``,
    ``oom``, ``dropped``, ``expired_by_operator``, and ``max_duration`` for
    those the class's max duration ended); ``expired`` those whose holder
    stopped renewing them. ``overdue`` counts leases past their expiry whose
    holder stopped renewing them, not yet reaped. ``admitted`` is every GPU lease ever
    granted: live + released + expired. ``recent`` counts the admission
    script's answers of the last minutes (admissions on the CPU included).
    """

    name: str
    priority: int
    cap_policy: int | None
    cap: int | None
    rate: float | None
    burst: int | None
    tokens: float | None
    leases: int
    overdue: int
    reserved: int
    waiters: int
    waiting_by_reason: Mapping[str, int]
    oldest_wait_s: float
    released: Mapping[str, int]
    expired: int
    live_counter: int
    pause: OverrideView | None
    cap_override: OverrideView | None
    recent: RecentDecisions = field(default_factory=RecentDecisions)

    @property
    def admitted(self) -> int:
        """GPU leases granted to this class so far (the pool's counters)."""
        return self.live_counter + sum(self.released.values()) + self.expired


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker process: from the pool's registry, or seen through its leases and waiters.

    ``owner`` is ``host:pid:hex``. ``last_seen_ms`` is its last heartbeat in
    the registry, or for a gate that does not register, its last lease renewal
    (a lease's expiry minus the TTL) or its last DEFER (a waiter's expiry minus
    the waiter TTL), whichever is later. ``info`` is what a registered worker
    says of itself: version, fast path, sampler, policy version, leases.
    ``idle_memory`` is its idle excess per device uuid (bytes above its warm
    baseline while it holds no lease), as the pool counts it.
    """

    owner: str
    host: str
    pid: int | None
    leases: int
    overdue: int
    waiting: int
    last_seen_ms: int
    registered: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)
    idle_memory: Mapping[str, int] = field(default_factory=dict)

    def alive(self, now_ms: int, ttl_ms: int) -> bool:
        """Seen within one lease TTL."""
        return now_ms - self.last_seen_ms <= ttl_ms


@dataclass(frozen=True)
class PoolView:
    """Everything ``gpugate status`` shows about one pool, read at ``now_ms``."""

    pool: str
    redis_url: str
    now_ms: int
    policy: Policy | None
    policy_version: str | None
    policy_error: str | None
    devices: list[DeviceView]
    classes: dict[str, ClassView]
    leases: list[LeaseView]
    waiters: list[WaiterView]
    overrides: list[OverrideView]
    workers: list[WorkerView]
    lease_seq: int
    counters: dict[str, int] = field(default_factory=dict)
    # Until when decisions DEFER `recovering` (script clock, ms; 0: never):
    # Redis lost its state and the holders put their leases back.
    recovering_until_ms: int = 0

    @property
    def ttl_ms(self) -> int:
        """The pool's lease TTL in ms (the default policy's without a policy)."""
        return to_ms((self.policy or Policy.default()).pool.lease_ttl_s)

    def reporting_devices(self) -> list[DeviceView]:
        """The devices heard from lately: a sample (a decision's, or its host's
        heartbeat) within :data:`REPORT_WINDOW_S`, or a lease TTL if longer."""
        window_ms = max(REPORT_WINDOW_S * 1000, self.ttl_ms)
        return [d for d in self.devices if d.sample_ms and self.now_ms - d.sample_ms <= window_ms]

    def live_leases(self) -> list[LeaseView]:
        """Leases neither released nor past their expiry."""
        return [lease for lease in self.leases if lease.live(self.now_ms)]

    def lease(self, lease_id: str) -> LeaseView | None:
        """The live or overdue lease with this id, or ``None``."""
        for lease in self.leases:
            if lease.id == lease_id and lease.released_ms == 0 and lease.expires_ms > 0:
                return lease
        return None


def _read_state(client: Client, keys: PoolKeys, *, transaction: bool) -> list[Any]:
    """A pool's state hashes and sets, and the server's time, in one round trip
    (two on a cluster)."""
    pipe = client.pipeline(transaction=transaction)
    pipe.hgetall(keys.state)
    pipe.zrange(keys.exp, 0, -1, withscores=True)
    pipe.hgetall(keys.waiters)
    pipe.hgetall(keys.samples)
    pipe.hgetall(keys.buckets)
    pipe.hgetall(keys.gpus)
    plain = isinstance(client, redis.Redis)
    if plain:
        pipe.time()
    replies: list[Any] = pipe.execute()
    if not plain:
        replies.append(client.time())
    return replies


def read_pool(
    client: Client,
    pool: str,
    *,
    redis_url: str = "",
    now_ms: int | None = None,
) -> PoolView:
    """Read pool ``pool``'s state and recent decision counts, writing nothing. Two round trips.

    Raises :class:`~gpugate.BackendError` (URL masked) when Redis cannot be
    reached or answers an error.
    """
    keys = PoolKeys(pool)
    url = mask_url(redis_url) if redis_url else ""
    plain = isinstance(client, redis.Redis)
    try:
        try:
            replies = _read_state(client, keys, transaction=plain)
        except redis.ResponseError as exc:
            if not (plain and refuses_writes(exc)):
                raise
            # Past maxmemory (or on a replica) Redis refuses the transaction
            # though not the reads: the same reads, not in one snapshot.
            replies = _read_state(client, keys, transaction=False)
        state_raw, exp_raw, waiters_raw, samples_raw, buckets_raw, gpus_raw, server_time = replies
        state = {_s(k): _s(v) for k, v in state_raw.items()}
        exp = {_s(m): int(score) for m, score in exp_raw}
        samples = {_s(k): _s(v) for k, v in samples_raw.items()}
        hosts = _host_gpus(gpus_raw)
        for uuid, seen in hosts.items():
            # The freshest of the decisions' sample and the host's heartbeat.
            stored = samples.get(uuid, "").split()
            stored_ms = int(stored[2]) if len(stored) >= 3 and stored[2].isdigit() else -1
            if "total" in seen and seen["taken_ms"] > stored_ms:
                samples[uuid] = f"{seen['total']} {seen['used']} {seen['taken_ms']}"
        # A device's live-lease count (d::<uuid>) stays in the state at 0 once
        # its last lease ends: it names a device only above 0, or one whose
        # sample and snapshots are gone (renew_leases.lua) would stay listed.
        uuids = sorted(
            set(samples)
            | set(hosts)
            | {m.split("\t", 1)[0] for m in exp}
            | {f[3:] for f, v in state.items() if f.startswith("d::") and _int(v) > 0}
        )
        clock = _int(state.get("clock"))
        if now_ms is None:
            secs, micros = server_time
            now_ms = max(int(secs) * 1000 + int(micros) // 1000, clock)
        minutes = range(now_ms // 60_000 - DECISION_MINUTES + 1, now_ms // 60_000 + 1)
        second = client.pipeline(transaction=False)
        for uuid in uuids:
            second.hgetall(keys.device(uuid))
        for minute in minutes:
            second.hgetall(keys.decisions(minute))
        second.zrange(keys.workers, 0, -1, withscores=True)
        second.hgetall(keys.workerinfo)
        second.hgetall(keys.idle_memory)
        replies = second.execute()
        dev_hashes, dec_hashes = replies[: len(uuids)], replies[len(uuids) : -3]
        registry = {_s(m): int(score) for m, score in replies[-3]}
        registry_info = {_s(k): _s(v) for k, v in replies[-2].items()}
        idle = _idle_memory(replies[-1])
    except REDIS_DOWN as exc:
        raise BackendError(f"Redis at {url or 'the given client'} {down_reason(exc)}") from exc
    except redis.RedisError as exc:
        raise BackendError(f"reading pool {pool!r} from {url or 'Redis'} failed: {exc}") from exc

    policy, policy_error = _policy(state.get("pdoc"), pool)
    settings = (policy or Policy.default()).pool
    ttl_ms = to_ms(settings.lease_ttl_s)
    waiter_ttl_ms = to_ms(settings.waiter_ttl_s)

    leases: list[LeaseView] = []
    for uuid, raw in zip(uuids, dev_hashes, strict=True):
        for lid, rec in raw.items():
            lease = _lease(uuid, _s(lid), _s(rec), exp)
            if lease is not None:
                leases.append(lease)
    leases.sort(key=lambda lease: int(lease.id) if lease.id.isdigit() else 0)
    idle_by_device: dict[str, int] = {}
    for per_device in idle.values():
        for uuid, b in per_device.items():
            idle_by_device[uuid] = idle_by_device.get(uuid, 0) + b
    devices = [
        _device(
            uuid, samples.get(uuid), leases, now_ms, hosts.get(uuid), idle_by_device.get(uuid, 0)
        )
        for uuid in uuids
    ]
    waiters = [
        w
        for w in (_waiter(_s(k), _s(v)) for k, v in waiters_raw.items())
        if w is not None and w.expires_ms > now_ms
    ]
    waiters.sort(key=lambda w: (w.since_ms, w.id))
    overrides = _overrides(state, now_ms)
    buckets = {_s(k): _s(v) for k, v in buckets_raw.items()}
    recent = _decisions(zip(minutes, dec_hashes, strict=True), now_ms)
    classes = _classes(policy, state, leases, waiters, overrides, buckets, recent, now_ms)
    counters = {
        k: _int(v) for k, v in state.items() if k.startswith(("out:", "expired:", "n:", "seq"))
    }
    return PoolView(
        pool=pool,
        redis_url=url,
        now_ms=now_ms,
        policy=policy,
        policy_version=state.get("pversion"),
        policy_error=policy_error,
        devices=devices,
        classes=classes,
        leases=leases,
        waiters=waiters,
        overrides=overrides,
        workers=_workers(
            leases, waiters, now_ms, ttl_ms, waiter_ttl_ms, registry, registry_info, idle
        ),
        lease_seq=_int(state.get("seq")),
        counters=counters,
        recovering_until_ms=_int(state.get("recover")),
    )


# -- parsing ------------------------------------------------------------------


def _int(v: str | None) -> int:
    if v is None:
        return 0
    try:
        return int(float(v))
    except ValueError:
        return 0


def _policy(doc: str | None, pool: str) -> tuple[Policy | None, str | None]:
    if doc is None:
        return None, None
    try:
        return Policy.from_dict(json.loads(doc), source=f"pool {pool}"), None
    except (ConfigError, ValueError) as exc:
        return None, f"the pool's stored policy cannot be read: {exc}"


def _lease(uuid: str, lid: str, raw: str, exp: Mapping[str, int]) -> LeaseView | None:
    parts = raw.split(" ", 9)
    if len(parts) != 10:
        return None
    try:
        e, a, at, r = (int(p) for p in parts[:4])
        s, m, idle = int(parts[5]), int(parts[6]), int(parts[8])
    except ValueError:
        return None
    tenant = parts[9]
    return LeaseView(
        id=lid,
        device=uuid,
        cls=parts[4],
        estimate=e,
        actual=a,
        actual_at_ms=at,
        released_ms=r,
        start_ms=s,
        max_deadline_ms=m,
        owner=parts[7],
        idle=idle,
        tenant=None if tenant == "-" else tenant,
        expires_ms=exp.get(f"{uuid}\t{lid}", 0),
    )


def _host_gpus(raw: Mapping[Any, Any]) -> dict[str, dict[str, Any]]:
    """Per device uuid, what the gates' snapshots (``P gpus``) say of it.

    Each registered gate keeps its own entry, and gates of one host may see
    the same devices or different ones, so the entries are merged per device:
    its freshest sample (memory, utilisation, name), and whether the freshest
    report of it, sample or fault, has it quarantined (a fault wins a tie).
    Entries of the previous version were keyed by host and do not name it.
    An entry that cannot be read is skipped.
    """
    out: dict[str, dict[str, Any]] = {}
    for field_b, value_b in raw.items():
        field, value = _s(field_b), _s(value_b)
        stamp, _, doc = value.partition(" ")
        try:
            at = int(stamp)
            snap = json.loads(doc)
            host = str(snap.get("host") or field)
            devices = [d for d in snap.get("devices") or [] if d.get("uuid")]
            faults = [f for f in snap.get("faults") or [] if f.get("uuid")]
            samples = [
                (d, int(d.get("total", 0)), int(d.get("used", 0)), at - int(d.get("age_ms", 0)))
                for d in devices
            ]
        except (AttributeError, TypeError, ValueError):
            continue
        for d, total, used, taken_ms in samples:
            seen = out.setdefault(d["uuid"], {"at": -1})
            if taken_ms > seen.get("taken_ms", -1):
                seen.update(
                    name=d.get("name") or "",
                    utilization=d.get("utilization"),
                    total=total,
                    used=used,
                    taken_ms=taken_ms,
                )
            if at > seen["at"]:
                seen.update(at=at, host=host, quarantined=False, fault=None)
        for f in faults:
            seen = out.setdefault(f["uuid"], {"at": -1})
            if at >= seen["at"]:
                seen.update(
                    at=at, host=host, quarantined=bool(f.get("quarantined")), fault=f.get("error")
                )
    return out


def _idle_memory(raw: Mapping[Any, Any]) -> dict[str, dict[str, int]]:
    """``P idlemem``: worker -> ``<uuid> <bytes> ...``, parsed."""
    out: dict[str, dict[str, int]] = {}
    for owner, value in raw.items():
        parts = _s(value).split()
        out[_s(owner)] = {
            uuid: int(b) for uuid, b in zip(parts[::2], parts[1::2], strict=False) if b.isdigit()
        }
    return out


def _device(
    uuid: str,
    sample: str | None,
    leases: list[LeaseView],
    now_ms: int,
    seen: Mapping[str, Any] | None = None,
    idle_workers: int = 0,
) -> DeviceView:
    total = used = taken = 0
    if sample:
        parts = sample.split()
        total, used, taken = (_int(p) for p in ([*parts, "0", "0", "0"])[:3])
    mine = [lease for lease in leases if lease.device == uuid]
    # The admission script's arithmetic: ghosts released before the sample are
    # gone; actuals count as measured only if measured by the sample's time.
    # An overdue lease (its holder stopped renewing it) is left out, as the
    # classes leave it out: on an idle pool no decision comes to reap it, and
    # the per-device and per-class figures must agree meanwhile.
    counted = [
        lease
        for lease in mine
        if lease.live(now_ms) or (lease.released_ms and lease.released_ms >= taken)
    ]
    reserved = sum(lease.held for lease in counted)
    measured = sum(
        lease.actual for lease in counted if lease.actual and lease.actual_at_ms <= taken
    )
    return DeviceView(
        uuid=uuid,
        total=total,
        used=used,
        sample_ms=taken,
        reserved=reserved,
        unmanaged=max(0, used - measured),
        leases=sum(1 for lease in mine if lease.live(now_ms)),
        ghosts=sum(1 for lease in counted if lease.released_ms > 0),
        fragmentation=(
            (sum(lease.idle for lease in counted) + idle_workers) / total
            if total and (idle_workers or any(lease.actual_at_ms for lease in counted))
            else None
        ),
        idle_workers=idle_workers,
        utilization=None if seen is None else seen.get("utilization"),
        quarantined=None if seen is None else seen.get("quarantined"),
        host=None if seen is None else seen.get("host"),
        name="" if seen is None else seen.get("name", ""),
    )


def _waiter(wid: str, raw: str) -> WaiterView | None:
    parts = raw.split(" ")
    if len(parts) < 8:
        return None
    try:
        p, s, v, x = int(parts[0]), int(parts[1]), int(parts[2]), int(parts[4])
    except ValueError:
        return None
    return WaiterView(
        id=wid,
        owner=waiter_owner(wid),
        cls=parts[6],
        priority=p,
        since_ms=s,
        vram=v,
        wants=parts[3],
        expires_ms=x,
        device=None if parts[5] == "-" else parts[5],
        reason=parts[7],
    )


def _overrides(state: Mapping[str, str], now_ms: int) -> list[OverrideView]:
    """Overrides in force: the raw fields the script obeys, described by ``ovr``."""
    try:
        ovr = json.loads(state.get("ovr") or "{}")
    except ValueError:
        ovr = {}
    described: dict[tuple[str, str], Mapping[str, Any]] = {}
    for kind in ("pause", "cap"):
        section = ovr.get(kind) if isinstance(ovr, dict) else None
        if isinstance(section, dict):
            for cls, o in section.items():
                if isinstance(o, dict):
                    described[(kind, cls)] = o
    out: list[OverrideView] = []
    for f, v in state.items():
        kind, _, cls = f.partition(":")
        if kind not in ("pause", "cap") or not cls:
            continue
        fields = v.split()
        until = _int(fields[-1]) if fields else 0
        if until != 0 and until <= now_ms:
            continue
        o = described.get((kind, cls), {})
        out.append(
            OverrideView(
                kind="pause" if kind == "pause" else "cap",
                cls=cls,
                until_ms=until,
                who=str(o.get("who", "")),
                why=str(o.get("why", "")),
                at_ms=_int(str(o.get("at", 0))),
                n=_int(fields[0]) if kind == "cap" and fields else None,
                since_ms=_int(str(o.get("since", o.get("at", 0)))),
            )
        )
    out.sort(key=lambda o: (o.cls, o.kind))
    return out


def _tokens(raw: str | None, rate_per_s: float, burst: int, now_ms: int) -> float:
    if raw is None:
        return float(burst)
    try:
        tokens_s, updated_s = raw.split()
        tokens, updated = float(tokens_s), int(float(updated_s))
    except ValueError:
        return float(burst)
    if now_ms > updated:
        tokens = min(float(burst), tokens + (now_ms - updated) * rate_per_s / 1000)
    return tokens


def _classes(
    policy: Policy | None,
    state: Mapping[str, str],
    leases: list[LeaseView],
    waiters: list[WaiterView],
    overrides: list[OverrideView],
    buckets: Mapping[str, str],
    recent: Mapping[str, RecentDecisions],
    now_ms: int,
) -> dict[str, ClassView]:
    names: list[str] = list(policy.classes) if policy else []
    seen = {lease.cls for lease in leases} | {w.cls for w in waiters} | set(recent)
    names += sorted(seen - set(names))
    released: dict[str, dict[str, int]] = {}
    for f, v in state.items():
        if f.startswith("out:"):
            cls, _, outcome = f[4:].rpartition(":")
            released.setdefault(cls, {})[outcome] = _int(v)
    out: dict[str, ClassView] = {}
    for name in names:
        cp = policy.classes.get(name) if policy else None
        pause = next((o for o in overrides if o.kind == "pause" and o.cls == name), None)
        cap_o = next((o for o in overrides if o.kind == "cap" and o.cls == name), None)
        cap_policy = cp.max_concurrent if cp else None
        cap = cap_policy
        if cap_o is not None and cap_o.n is not None and (cap is None or cap_o.n < cap):
            cap = cap_o.n
        mine = [lease for lease in leases if lease.cls == name]
        live = [lease for lease in mine if lease.live(now_ms)]
        waiting = [w for w in waiters if w.cls == name]
        by_reason: dict[str, int] = {}
        for w in waiting:
            by_reason[w.reason] = by_reason.get(w.reason, 0) + 1
        tokens = None
        if cp is not None and cp.rate and cp.burst:
            tokens = _tokens(buckets.get(name), cp.rate, cp.burst, now_ms)
        out[name] = ClassView(
            name=name,
            priority=cp.priority if cp else 0,
            cap_policy=cap_policy,
            cap=cap,
            rate=cp.rate if cp else None,
            burst=cp.burst if cp else None,
            tokens=tokens,
            leases=len(live),
            overdue=sum(1 for lease in mine if lease.overdue(now_ms)),
            reserved=sum(lease.held for lease in live),
            waiters=len(waiting),
            waiting_by_reason=dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
            oldest_wait_s=max((w.waited_s(now_ms) for w in waiting), default=0.0),
            released=released.get(name, {}),
            expired=_int(state.get(f"expired:{name}")),
            live_counter=_int(state.get(f"n:{name}")),
            pause=pause,
            cap_override=cap_o,
            recent=recent.get(name) or RecentDecisions(now_ms),
        )
    return out


def _decisions(
    hashes: Iterable[tuple[int, Mapping[bytes | str, bytes | str]]], now_ms: int
) -> dict[str, RecentDecisions]:
    """``P dec:<minute>`` hashes (``"<class> <outcome> <reason>"`` -> count) by class."""
    by_class: dict[str, dict[int, dict[tuple[str, str], int]]] = {}
    for minute, raw in hashes:
        for f, v in raw.items():
            parts = _s(f).rsplit(" ", 2)
            n = _int(_s(v))
            if len(parts) != 3 or parts[1] not in OUTCOMES or n <= 0:
                continue
            cls, outcome, reason = parts
            per = by_class.setdefault(cls, {}).setdefault(minute, {})
            per[(outcome, reason)] = per.get((outcome, reason), 0) + n
    return {cls: RecentDecisions(now_ms, by_minute) for cls, by_minute in by_class.items()}


def _workers(
    leases: list[LeaseView],
    waiters: list[WaiterView],
    now_ms: int,
    ttl_ms: int,
    waiter_ttl_ms: int,
    registry: Mapping[str, int],
    registry_info: Mapping[str, str],
    idle: Mapping[str, Mapping[str, int]],
) -> list[WorkerView]:
    seen: dict[str, dict[str, int]] = {}

    def entry(owner: str) -> dict[str, int]:
        return seen.setdefault(owner, {"leases": 0, "overdue": 0, "waiting": 0, "last": 0})

    for owner, beat_ms in registry.items():
        entry(owner)["last"] = beat_ms

    for lease in leases:
        if lease.released_ms or not lease.expires_ms:
            continue
        e = entry(lease.owner)
        if lease.overdue(now_ms):
            e["overdue"] += 1
        elif lease.live(now_ms):
            e["leases"] += 1
        renewed = max(lease.start_ms, lease.expires_ms - ttl_ms)
        e["last"] = max(e["last"], renewed)
    for w in waiters:
        e = entry(w.owner)
        e["waiting"] += 1
        # A waiter entry lives waiter_ttl past the DEFER that last wrote it.
        e["last"] = max(e["last"], w.since_ms, w.expires_ms - waiter_ttl_ms)
    out = []
    for owner, e in seen.items():
        host, pid = owner_parts(owner)
        info: dict[str, Any] = {}
        if owner in registry_info:
            try:
                info = dict(json.loads(registry_info[owner]))
            except (ValueError, TypeError):
                info = {}
        out.append(
            WorkerView(
                owner=owner,
                host=host,
                pid=pid,
                leases=e["leases"],
                overdue=e["overdue"],
                waiting=e["waiting"],
                last_seen_ms=e["last"],
                registered=owner in registry,
                info=info,
                idle_memory=dict(idle.get(owner, {})),
            )
        )
    out.sort(key=lambda w: (w.host, w.pid or 0, w.owner))
    return out
