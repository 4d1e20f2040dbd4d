"""The gate: every admission decision of this process goes through here.

``try_admit`` is one round trip to Redis (the ``admit_job`` script), unless the
local pre-check already knows that no device can fit, in which case it answers
DEFER without Redis. ``admit`` blocks, registered as a waiter, until it is
admitted, rejected or out of time.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import json
import os
import random
import threading
import time
import uuid as _uuid
import weakref
from collections.abc import Callable, Generator, Sequence
from typing import Any

import redis
import structlog

from .. import _process, _speedups
from .._exceptions import (
    AdmissionRejected,
    AdmissionTimeout,
    BackendError,
    ConfigError,
    GpugateError,
    UsageError,
)
from .._logging import Throttle
from .._units import format_size, lifetime_ms, parse_duration, parse_size, quote
from .._version import __version__
from ..metrics import Metrics, default_metrics
from ..policy import Policy
from ..sampling import Sampler, Snapshot, default_sampler
from ..state._connect import REDIS_DOWN, connect, mask_url, refuses_writes, resolve_redis_url
from ..state._inspect import read_pool
from ..state._keys import PoolKeys
from ..state._scripts import Scripts
from ..state._wire import publish_args
from ._decision import Decision, Outcome, Reason, make_decision
from ._heartbeat import Heartbeat
from ._idle import idle_memory
from ._lease import Lease, LeaseRegistry, Unsent
from ._ticket import Ticket
from ._wake import WakeListener

log = structlog.get_logger(__name__)

# admit_job.lua's ARGV: 9 fixed arguments, then (uuid, total, used, age_ms)
# per device; the first device's age is argument 12 (0-based).
_SAMPLE_AGE_ARG = 12

# Reasons whose retry_after is an estimate: they get jitter so that waiters
# polling the same pool do not come back in lockstep.
_ESTIMATED = frozenset({"cap", "priority", "vram", "fragmented", "no_gpu", "stale_sample"})

# A release frees its memory for the decisions that use a sample taken after
# it (until then it counts as a ghost): a waiter woken by a release that
# defers for one of these decides again once its sampler has read the devices
# at least _SAMPLE_AFTER_WAKE_S after the wake-up (the script's clock is in
# ms), polling the (local) sampler every _SAMPLE_POLL_S meanwhile.
_FREED_AT_A_LATER_SAMPLE = frozenset({"vram", "fragmented"})
_SAMPLE_AFTER_WAKE_S = 0.002
_SAMPLE_POLL_S = 0.005


def _follow_up_by(d: Decision, woke_at: float | None, pause: float) -> float | None:
    """When a blocking admission woken at ``woke_at`` (monotonic; ``None``: not
    woken) should decide again after deferring with ``d``: as soon as its sampler
    has read the devices after the wake-up, waiting no longer than ``pause``
    (the monotonic deadline). ``None``: it waits as usual."""
    if woke_at is None or d.reason not in _FREED_AT_A_LATER_SAMPLE:
        return None
    return time.monotonic() + pause


# What "Redis is unreachable" looks like, on a single server and on a cluster
# (CLUSTERDOWN, no node reachable, a slot not covered).
_live_gates: weakref.WeakSet[Gate] = weakref.WeakSet()
_live_gates_lock = threading.Lock()
# How many gates were ever added to _live_gates: a gate's cached list of the
# process's gates is rebuilt when it changes (closed and collected gates are
# skipped when the list is read).
_live_gates_added = 0
_gate_seq = itertools.count()

RecycleCallback = Callable[[str, int], None]


@functools.cache
def _default_policy() -> Policy:
    # Frozen, so one parse serves every gate of the process.
    return Policy.default()


def _b2s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


_OUTCOMES = {o.value.encode(): o for o in Outcome} | {o.value: o for o in Outcome}
_WORDS: dict[bytes, str] = {}


def _word(v: Any) -> str:
    """Decode a reason or detail; the scripts use a small fixed set of them."""
    word = _WORDS.get(v)
    if word is None:
        word = _b2s(v)
        if len(_WORDS) < 256:
            _WORDS[v] = word
    return word


class Gate:
    """Admission to the GPUs of one pool.

    ``redis_url``: where the pool's state lives; by default
    ``$GPUGATE_REDIS_URL``, then ``$REDIS_URL``, then an embedded Redis shared
    by the processes of this host. ``pool``: the pool's name (default
    ``$GPUGATE_POOL`` or ``"default"``). ``policy``: this gate's policy; it is
    published to the pool when the pool has none, and the pool's policy is the
    one enforced (a differing one is logged and shown in ``policy_mismatch``).
    ``sampler``: what the GPUs look like (default:
    :func:`gpugate.sampling.default_sampler`, NVML when present, else no GPU).
    ``socket_timeout_s`` bounds every Redis call.
    ``metrics``: the Prometheus instruments to update (default: those on
    prometheus_client's default registry). ``register``: list this process in
    the pool's worker registry (heartbeat every TTL/3 even without leases);
    one-shot tools pass False.

    A registered gate also measures its process's idle memory: what NVML
    shows for this pid on each device above its warm baseline while the
    process holds no lease (:attr:`idle_memory`). It counts towards the
    devices' fragmentation, and :attr:`recycle_recommended` says when it alone
    is above what the pool's strictest ``max_fragmentation`` allows.

    A gate belongs to the process that made it; a forked child must make its
    own (using a parent's gate there raises :class:`UsageError`).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        pool: str | None = None,
        policy: Policy | None = None,
        sampler: Sampler | None = None,
        socket_timeout_s: float = 2.0,
        metrics: Metrics | None = None,
        register: bool = True,
        _clock_ms: Callable[[], int] | None = None,
        _gpu_pid: int | None = None,
    ) -> None:
        self.pool = pool or os.environ.get("GPUGATE_POOL") or "default"
        self._keys = PoolKeys(self.pool)
        url, self.embedded = resolve_redis_url(redis_url)
        self.redis_url = mask_url(url)
        self._client = connect(url, socket_timeout_s=socket_timeout_s)
        self._socket_timeout_s = socket_timeout_s
        self._scripts = Scripts(self._client)
        k = self._keys
        self._admit_keys = (k.state, k.exp, k.waiters, k.samples, k.buckets)
        self.policy = policy
        self.pool_policy: Policy | None = None
        self.pool_policy_version: str | None = None
        self._pool_version_b = b""  # the same, as the scripts' replies carry it
        self.policy_mismatch = False
        self.sampler: Sampler = sampler if sampler is not None else default_sampler()
        self._clock_ms = _clock_ms
        self.metrics = metrics if metrics is not None else default_metrics()
        self._pid = _process.pid
        # The pid NVML lists this process under (tests and simulation give others).
        self._gpu_pid = _gpu_pid if _gpu_pid is not None else self._pid
        self._idle = idle_memory(self._gpu_pid)
        self._idle_sent: dict[str, int] = {}
        self._recycle: set[str] = set()
        self._on_recycle: list[RecycleCallback] = []
        self._seq = next(_gate_seq)
        self.owner = f"{self.sampler.sample().host or 'host'}:{self._pid}:{_uuid.uuid4().hex[:8]}"
        self._leases = LeaseRegistry(self._idle.touch)
        self._heartbeat: Heartbeat | None = None
        self._wake: WakeListener | None = None
        self._lock = threading.Lock()
        self._beat_lock = threading.Lock()
        # Held by close() throughout; what an operation in flight at close
        # still has to tell Redis waits for it (see _late).
        self._close_lock = threading.RLock()
        self._recent_defer: dict[tuple[str, int, str], float] = {}
        # The sample arguments last packed, and the devices tuple they describe.
        self._packed: tuple[object, list[Any], list[int]] = ((), [], [])
        self._local_open: dict[str, int] = {}
        self._local_seq = 0
        self._log_throttle = Throttle(10.0)
        self._closed = False
        # A decision timed out mid-call: Redis may have admitted it, a lease
        # nobody holds (see _give_back_orphans).
        self._maybe_orphans = False
        self._waiting: set[str] = set()  # waiter ids of blocking admissions in progress
        self._register = register
        self._started_ms = int(time.time() * 1000)
        self.stats = {"decisions": 0, "round_trips": 0, "local_defers": 0, "leases_lost": 0}
        self._peers: tuple[weakref.ref[Gate], ...] = ()
        self._peers_seen = -1
        global _live_gates_added
        with _live_gates_lock:
            _live_gates.add(self)
            _live_gates_added += 1
        if self.embedded:
            log.info(
                "embedded_redis",
                url=self.redis_url,
                note="single host only: set GPUGATE_REDIS_URL to share a pool between hosts",
            )
        try:
            # With a policy of its own the gate publishes it to an empty pool;
            # so does a worker without one (the default: its heartbeat needs a
            # policy in the pool). An unregistered gate without one (the CLI's)
            # only reads the pool's (its first decision would publish).
            if policy is not None or register:
                self.sync_policy()
            else:
                self.read_pool_policy()
        except BackendError as exc:
            log.warning("policy_sync_deferred", error=str(exc))
        if register:
            # Registered at once, then every TTL/3, with or without leases.
            self._kick_heartbeat()

    @property
    def client(self) -> redis.Redis | redis.RedisCluster:
        """The Redis client this gate talks through (for metrics exporters, inspection)."""
        return self._client

    # -- policy -----------------------------------------------------------------

    @property
    def effective_policy(self) -> Policy:
        """The pool's policy when known, else this gate's own, else the default."""
        return self.pool_policy or self.policy or _default_policy()

    @property
    def lease_ttl_s(self) -> float:
        """The pool's lease TTL."""
        return self.effective_policy.pool.lease_ttl_s

    def sync_policy(self, *, force: bool = False) -> str:
        """Publish this gate's policy if the pool has none (or ``force``); read the pool's.

        Returns the pool's policy version. Without a policy of its own the gate
        publishes to an empty pool the pool's policy it last knew (Redis lost
        its state: the operator's policy is restored, with a warning), else
        :meth:`Policy.default`.
        """
        self._check_usable()
        restoring = self.policy is None and self.pool_policy is not None
        mine = self.policy or self.pool_policy or Policy.default()
        if self.policy is None and not force:
            current, stored = self._call(self._client.hmget, self._keys.state, "pdoc", "pversion")
            if current is not None:
                self._adopt(_b2s(current), _b2s(stored) if stored is not None else None)
                return self.pool_policy_version or ""
        published, version = self._call(
            self._scripts.publish_policy,
            keys=[self._keys.state],
            args=publish_args(mine, force=force),
        )
        version = _b2s(version)
        if published and restoring and not force:
            log.warning(
                "pool_policy_restored",
                pool=self.pool,
                version=version,
                note="the pool had lost its policy (Redis lost its state): "
                "this gate published the one it last knew",
            )
        if published:
            log.info("policy_published", pool=self.pool, version=version)
            self.pool_policy = mine
            self._adopt(None, version)
        else:
            doc = self._call(self._client.hget, self._keys.state, "pdoc")
            self._adopt(_b2s(doc) if doc is not None else None, version)
        self._check_mismatch()
        return self.pool_policy_version or ""

    def _check_mismatch(self) -> None:
        self.policy_mismatch = (
            self.policy is not None and self.pool_policy_version != self.policy.version
        )
        if self.policy_mismatch:
            log.warning(
                "policy_mismatch",
                pool=self.pool,
                pool_version=self.pool_policy_version,
                local_version=self.policy.version if self.policy else None,
                fix="the pool's policy is enforced; run `gpugate policy apply FILE` to change it",
            )

    def _follow_pool_policy(self, version: bytes) -> None:
        """The pool's policy changed while this gate runs (`gpugate policy apply`):
        read it again, and beat at once so that renewals follow a new lease TTL."""
        was = self.pool_policy_version
        try:
            doc = self._call(self._client.hget, self._keys.state, "pdoc")
        except BackendError:
            return  # the next decision or beat tries again
        self._adopt(_b2s(doc) if doc is not None else None, _b2s(version))
        log.info("pool_policy_changed", pool=self.pool, was=was, now=self.pool_policy_version)
        self._check_mismatch()
        if self._heartbeat is not None:
            self._heartbeat.kick()

    def read_pool_policy(self) -> Policy | None:
        """The policy stored in the pool (``None`` if it has none); publishes nothing."""
        self._check_usable()
        doc, stored = self._call(self._client.hmget, self._keys.state, "pdoc", "pversion")
        if doc is None:
            return None
        self._adopt(_b2s(doc), _b2s(stored) if stored is not None else None)
        return self.pool_policy

    def _adopt(self, doc: str | None, version: str | None = None) -> None:
        if doc is not None:
            try:
                self.pool_policy = Policy.from_dict(json.loads(doc), source=f"pool {self.pool}")
            except (ConfigError, ValueError) as exc:
                log.warning("pool_policy_unreadable", error=str(exc))
        self.pool_policy_version = version or (
            self.pool_policy.version if self.pool_policy else None
        )
        # As the scripts' replies carry it: a decision compares it in one step.
        self._pool_version_b = (self.pool_policy_version or "").encode()

    # -- decisions --------------------------------------------------------------

    def try_admit(
        self,
        cls: str,
        vram: int | str = 0,
        *,
        device: str | None = None,
        tenant: str | None = None,
    ) -> Decision:
        """Decide now, without blocking: one round trip at most.

        ``cls``: the class; ``vram``: the estimated peak VRAM of the job
        (bytes or a size string); ``device``: a device uuid to insist on.
        A DEFER registers this request as a waiter (keyed by this gate, class,
        size and device) for the pool's waiter TTL, so polling counts for
        priority. An ADMIT's lease is renewed by this gate's heartbeat until
        released or dropped.
        """
        _check_request(cls, tenant)
        vram_b = parse_size(vram, key="vram")
        if device is not None:
            self._check_device(device)
        waiter = f"{self.owner}|{cls}|{vram_b}|{device or ''}"
        return self._decide(cls, vram_b, waiter, device, tenant, precheck=True)

    def admit(
        self,
        cls: str,
        vram: int | str = 0,
        *,
        timeout: float | str | None = None,
        device: str | None = None,
        tenant: str | None = None,
    ) -> Ticket:
        """Block until admitted; return the :class:`Ticket` (a context manager).

        Waits as a registered waiter, woken by releases and override changes
        (and by a timer as a fallback). Raises :class:`AdmissionTimeout` after
        ``timeout`` seconds (``None`` waits forever; a decision in flight then
        ends first, within one socket timeout when Redis hangs) and
        :class:`AdmissionRejected` when the request can never be admitted;
        both carry the last decision.
        """
        request = _Request(self, cls, vram, timeout, tenant)
        if device is not None:
            self._check_device(device)
        wake = self._wake_listener()
        woke_at = None
        with self._waiting_as(request.waiter):
            while True:
                generation = wake.generation
                d = self._decide(cls, request.vram, request.waiter, device, tenant, precheck=False)
                if d.outcome is Outcome.ADMIT:
                    return Ticket(d)
                pause = request.pause_after(d)
                give_up = _follow_up_by(d, woke_at, pause)
                if woke_at is not None and give_up is not None:
                    while not self._sampled_after(woke_at) and time.monotonic() < give_up:
                        time.sleep(_SAMPLE_POLL_S)
                    woke_at = None
                    continue
                woke_at = time.monotonic() if wake.wait(generation, pause) else None

    def admit_async(
        self,
        cls: str,
        vram: int | str = 0,
        *,
        timeout: float | str | None = None,
        device: str | None = None,
        tenant: str | None = None,
    ) -> _AsyncAdmission:
        """The asyncio form of :meth:`admit`: ``async with gate.admit_async(...) as ticket``.

        Also awaitable: ``ticket = await gate.admit_async(...)``. Redis calls
        run in a worker thread; waiting does not hold a thread.
        """
        return _AsyncAdmission(self, cls, vram, timeout, device, tenant)

    async def _admit_async(
        self,
        cls: str,
        vram: int | str,
        timeout: float | str | None,
        device: str | None,
        tenant: str | None,
    ) -> Ticket:
        request = _Request(self, cls, vram, timeout, tenant)
        if device is not None:
            await asyncio.to_thread(self._check_device, device)
        wake = self._wake_listener()
        woke_at = None
        # The waiter entry goes on any exit (forgetting it is one quick HDEL).
        with self._waiting_as(request.waiter):
            while True:
                generation = wake.generation
                deciding = asyncio.ensure_future(
                    asyncio.to_thread(
                        self._decide, cls, request.vram, request.waiter, device, tenant, False
                    )
                )
                try:
                    d = await asyncio.shield(deciding)
                except asyncio.CancelledError:
                    # The decision runs on in its thread: what it admits goes back unused.
                    deciding.add_done_callback(_give_back_unused)
                    raise
                if d.outcome is Outcome.ADMIT:
                    return Ticket(d)
                pause = request.pause_after(d)
                give_up = _follow_up_by(d, woke_at, pause)
                if woke_at is not None and give_up is not None:
                    while time.monotonic() < give_up and not await asyncio.to_thread(
                        self._sampled_after, woke_at
                    ):
                        await asyncio.sleep(_SAMPLE_POLL_S)
                    woke_at = None
                    continue
                woke = await wake.wait_async(generation, pause)
                woke_at = time.monotonic() if woke else None

    def _decide(
        self,
        cls: str,
        vram: int,
        waiter: str,
        device: str | None,
        tenant: str | None,
        precheck: bool,
    ) -> Decision:
        started = time.perf_counter()
        d = self._decide_once(cls, vram, waiter, device, tenant, precheck)
        elapsed = time.perf_counter() - started
        self.metrics.decisions.record(cls, d.outcome, d.reason, elapsed)
        if d.outcome is not Outcome.ADMIT or d.reason != Reason.OK:
            dropped = self._log_throttle.allow((cls, d.outcome, d.reason))
            if dropped is not None:
                log.info(
                    "admission_" + d.outcome.value,
                    cls=cls,
                    reason=d.reason,
                    vram_bytes=vram,
                    retry_after_s=round(d.retry_after, 3),
                    detail=d.detail,
                    similar_events_suppressed=dropped,
                )
        return d

    def _decide_once(
        self,
        cls: str,
        vram: int,
        waiter: str,
        device: str | None,
        tenant: str | None,
        precheck: bool,
    ) -> Decision:
        self._check_usable()
        snap = self.sampler.sample()
        self.stats["decisions"] += 1
        if device is not None and device in snap.quarantined:
            return Decision(
                Outcome.DEFER,
                Reason.GPU_LOST,
                retry_after=self._jitter(self.effective_policy.pool.retry_max_s),
                detail=f"device {device} is quarantined: its driver reports it lost",
                cls=cls,
                vram=vram,
                local=True,
            )
        if snap.faults and self._waits_for_a_lost_gpu(cls, vram, snap):
            return Decision(
                Outcome.DEFER,
                Reason.GPU_LOST,
                retry_after=self._jitter(self.effective_policy.pool.retry_max_s),
                detail="only a quarantined device (its driver reports it lost) could hold it",
                cls=cls,
                vram=vram,
                local=True,
            )
        devices = snap.devices
        packed_for, packed, frees = self._packed
        if packed_for is not devices:
            # A sampler hands out the same devices tuple until they change.
            packed = _speedups.pack_samples(
                [d.uuid for d in devices],
                [d.total for d in devices],
                [d.used for d in devices],
                [0] * len(devices),
            )
            frees = [d.free for d in devices]
            self._packed = (devices, packed, frees)
        if precheck and devices and self._local_defer_ok(cls, vram, device, snap, frees):
            self.stats["local_defers"] += 1
            return Decision(
                Outcome.DEFER,
                Reason.VRAM,
                retry_after=self._jitter(self._estimate_s()),
                detail="local pre-check: no device of this host has room",
                cls=cls,
                vram=vram,
                local=True,
            )
        args = [
            self._keys.prefix,
            self._clock_ms() if self._clock_ms is not None else 0,
            cls,
            vram,
            waiter,
            self.owner,
            device or "",
            tenant or "",
            len(devices),
            *packed,
        ]
        # Each device's own age: a reading standing in for a failing device is older.
        args[_SAMPLE_AGE_ARG::4] = snap.device_ages_ms(time.monotonic())
        try:
            reply = self._run_admit(self._admit_keys, args)
        except BackendError as exc:
            if isinstance(exc.__cause__, redis.TimeoutError):
                self._maybe_orphans = True
            return self._backend_down(cls, vram, snap, exc)
        outcome, reason_b, retry_ms, dev_uuid, lease_id, expires_ms, detail_b, available, v = reply
        if v != self._pool_version_b:
            self._follow_pool_policy(v)
        d_uuid = _b2s(dev_uuid) or None
        reason = _word(reason_b)
        out = _OUTCOMES[outcome]
        retry = int(retry_ms) / 1000.0
        if reason in _ESTIMATED:
            retry = self._jitter(retry)
        index = None
        lease = None
        if d_uuid is not None:
            found = snap.by_uuid(d_uuid)
            index = found.index if found is not None else None
        if out is Outcome.ADMIT and d_uuid is not None:
            if self._register and self._process_idle():
                # The reading this admission was decided on shows the process warm.
                self._idle.admitted(snap)
            lease = Lease(
                self,
                id=_b2s(lease_id),
                cls=cls,
                vram=vram,
                device=index,
                device_uuid=d_uuid,
                expires_ms=int(expires_ms),
            )
            self._hold(lease)
        elif out is Outcome.DEFER and precheck and reason == Reason.VRAM:
            # Only a memory DEFER: the local free memory stands in for its cause.
            self._recent_defer[(cls, vram, device or "")] = time.monotonic()
        admitted = out is Outcome.ADMIT
        return make_decision(
            out,
            reason,
            retry if out is Outcome.DEFER else 0.0,
            index if admitted else None,
            d_uuid if admitted else None,
            lease,
            _word(detail_b),
            cls,
            vram,
            None if available == -1 else available,
            False,
        )

    def _run_admit(self, keys: Sequence[str], args: list[Any]) -> list[Any]:
        script = self._scripts.admit_job
        for attempt in (0, 1):
            self.stats["round_trips"] += 1
            try:
                return script(keys=keys, args=args)  # type: ignore[no-any-return]
            except REDIS_DOWN as exc:
                raise self._unreachable(exc) from exc
            except redis.ResponseError as exc:
                msg = str(exc)
                if refuses_writes(exc):
                    raise self._unreachable(exc) from exc
                if "nopolicy" in msg and attempt == 0:
                    self.sync_policy()
                    continue
                if "unknown_class" in msg:
                    raise self._unknown_class(args[2]) from None
                raise BackendError(
                    f"the admission script failed on {self.redis_url}: {msg}"
                ) from exc
        raise BackendError(f"pool {self.pool!r} has no policy and publishing one failed")

    def _local_defer_ok(
        self, cls: str, vram: int, device: str | None, snap: Snapshot, frees: list[int]
    ) -> bool:
        """The fast path may answer DEFER itself: nothing fits locally and the
        waiter entry in Redis is fresh enough that priority still sees it.
        ``frees``: each device's free bytes, in the snapshot's order."""
        last = self._recent_defer.get((cls, vram, device or ""))
        if last is None:
            return False
        pool = self.effective_policy.pool
        if time.monotonic() - last > pool.waiter_ttl_s / 3:
            return False
        if device is not None:
            frees = [d.free for d in snap.devices if d.uuid == device]
        return not _speedups.precheck_fits(frees, vram, pool.safety_margin)

    def _waits_for_a_lost_gpu(self, cls: str, vram: int, snap: Snapshot) -> bool:
        """Whether no usable device of this host could ever hold the request but
        a quarantined one could (or might: its size unknown).

        The scripts see only usable devices: they would REJECT it
        ``too_large``, or with none usable answer the class's ``no_gpu``,
        though quarantine is temporary. Such a request waits (``gpu_lost``).
        """
        policy = self.effective_policy
        if cls not in policy.classes:
            return False  # the script names the unknown class
        room = policy.pool.safety_margin + policy.reserve_above(cls)
        if any(d.total - room >= vram for d in snap.devices):
            return False
        return any(f.total is None or f.total - room >= vram for f in snap.faults if f.quarantined)

    def _check_device(self, device: object) -> None:
        """A request may insist on a GPU of this host, named by its uuid.

        Raises :class:`UsageError` for anything else while this host sees
        GPUs (with none visible, the class's ``no_gpu`` answers).
        """
        if not isinstance(device, str):
            raise UsageError(f"device= takes a GPU uuid (a Decision's device_uuid), not {device!r}")
        snap = self.sampler.sample()
        if snap.devices and snap.by_uuid(device) is None and device not in snap.quarantined:
            known = ", ".join(d.uuid for d in snap.devices)
            raise UsageError(f"device {device!r} is not a GPU of this host; its GPUs: {known}")

    def _sampled_after(self, woke_at: float) -> bool:
        """Whether the sampler has read the devices since a wake-up at ``woke_at``
        (monotonic), by enough that the script's millisecond clock sees it."""
        return self.sampler.sample().taken_mono >= woke_at + _SAMPLE_AFTER_WAKE_S

    def _estimate_s(self) -> float:
        """The scripts' estimated retry (admit_job.lua): a third of a lease TTL
        or half the waiter TTL, at least 100 ms, capped."""
        pool = self.effective_policy.pool
        return min(pool.retry_max_s, max(0.1, min(pool.lease_ttl_s / 3, pool.waiter_ttl_s / 2)))

    def _jitter(self, seconds: float) -> float:
        """``seconds`` ±50 %, uniform, within ``retry_max`` (spread below the
        cap rather than piled on it)."""
        low = 0.5 * seconds
        high = min(1.5 * seconds, max(low, self.effective_policy.pool.retry_max_s))
        return low + (high - low) * random.random()

    def _backend_down(self, cls: str, vram: int, snap: Snapshot, exc: BackendError) -> Decision:
        try:
            cp = self.effective_policy.class_policy(cls)
        except UsageError:
            raise exc from None
        dropped = self._log_throttle.allow(("backend_unavailable", cls))
        if dropped is not None:
            log.warning(
                "backend_unavailable",
                cls=cls,
                error=str(exc),
                mode=cp.on_backend_error,
                similar_events_suppressed=dropped,
            )
        if cp.on_backend_error == "open":
            with self._lock:
                running = self._local_open.get(cls, 0)
                if cp.max_concurrent is None or running < cp.max_concurrent:
                    fits = [d for d in snap.devices if d.free >= vram]
                    best = max(fits, key=lambda d: d.free, default=None)
                    if best is not None or not snap.devices:
                        self._local_open[cls] = running + 1
                        self._local_seq += 1
                        lease = Lease(
                            self,
                            id=f"local-{self._local_seq}",
                            cls=cls,
                            vram=vram,
                            device=best.index if best else None,
                            device_uuid=best.uuid if best else "",
                            expires_ms=0,
                            local=True,
                        )
                        return Decision(
                            Outcome.ADMIT,
                            Reason.BACKEND_OPEN,
                            device=best.index if best else None,
                            device_uuid=best.uuid if best else None,
                            lease=lease,
                            detail="Redis unreachable; admitted within this process's caps",
                            cls=cls,
                            vram=vram,
                        )
        return Decision(
            Outcome.DEFER,
            Reason.BACKEND_UNAVAILABLE,
            retry_after=self._jitter(min(1.0, self._estimate_s())),
            detail=str(exc),
            cls=cls,
            vram=vram,
        )

    def _local_done(self, cls: str) -> None:
        with self._lock:
            self._local_open[cls] = max(0, self._local_open.get(cls, 0) - 1)

    # -- leases -----------------------------------------------------------------

    def _hold(self, lease: Lease) -> None:
        self._leases.add(lease)
        if self._closed:
            # Admitted while close() ran: nothing would renew it. close() sets
            # _closed before it goes through the leases, so one of the two
            # releases it (both may: the second finds it gone).
            if not lease.released:
                lease._mark_lost("gate_closed")  # before: a released lease is not lost
                lease.released = True
                self._late(lambda: self._release_lease(lease, "dropped"))
            return
        self._ensure_heartbeat()

    def _kick_heartbeat(self) -> None:
        """Beat now (started if need be)."""
        self._ensure_heartbeat()
        heartbeat = self._heartbeat
        if heartbeat is not None:
            heartbeat.kick()

    def _ensure_heartbeat(self) -> None:
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

    def _release(self, dev_uuid: str, lease_id: str, outcome: str, *, refund: bool = False) -> bool:
        """Run release_lease.lua for one lease; True if it was still live."""
        try:
            done = self._call(
                self._scripts.release_lease,
                keys=[self._keys.state, self._keys.exp, self._keys.buckets],
                args=[self._keys.prefix, self._now_arg(), dev_uuid, lease_id, outcome, int(refund)],
            )
        except redis.ResponseError as exc:
            raise BackendError(f"the release script failed on {self.redis_url}: {exc}") from exc
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
        not wait for this lock.
        """
        with self._beat_lock:
            self._beat_once()

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
        keys = [
            self._keys.state,
            self._keys.exp,
            self._keys.waiters,
            self._keys.workers,
            self._keys.workerinfo,
            self._keys.idle_memory,
            self._keys.idle_seen,
        ]
        try:
            try:
                reply = self._call(self._scripts.renew_leases, keys=keys, args=args)
            except redis.ResponseError as exc:
                if "nopolicy" not in str(exc):
                    raise
                # The pool lost its policy (flushed, or new): publish this gate's
                # (or the default) as a decision would, and beat again.
                self.sync_policy()
                reply = self._call(self._scripts.renew_leases, keys=keys, args=args)
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
        for i, lease in enumerate(leases):
            status, expires = int(reply[2 + 2 * i]), int(reply[3 + 2 * i])
            if status == 1:
                lease.expires_ms = expires
                lease._renewed_mono = beat_started
            elif status == 2:
                lease.expires_ms = expires
                lease._renewed_mono = beat_started
                if lease._mark_max_duration():
                    self.metrics.leases_max_duration.labels(lease.cls).inc()
            else:
                self._leases.discard(lease)
                # The background heartbeat and beat_now() may both see it gone.
                if lease._mark_lost("expired"):
                    self.stats["leases_lost"] += 1
                    self.metrics.leases_lost.labels(lease.cls).inc()

    def _give_back_orphans(self) -> None:
        """Release (as ``dropped``) the leases Redis holds for this gate that it
        does not know of: admitted by a decision whose reply was lost (a
        timeout mid-call). Only leases older than a socket timeout: a decision
        still in flight may not have brought its own home yet."""
        self._maybe_orphans = False
        held = self._leases.known()
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
        oldest = min(lease._renewed_mono for lease in leases)
        return oldest + self.effective_policy.pool.lease_ttl_s - time.monotonic()

    def _give_up_unrenewed(self, leases: list[Lease]) -> None:
        """Tell the holders of leases Redis has not confirmed for a whole TTL
        that they may be gone (``unrenewed``): from then on the pool may reap
        them and give their room to other jobs. They are released (as
        ``dropped``) once Redis answers, in case nobody reaped them."""
        ttl = self.effective_policy.pool.lease_ttl_s
        now = time.monotonic()
        for lease in leases:
            if now - lease._renewed_mono > ttl and lease._mark_lost("unrenewed"):
                self._leases.discard(lease)
                self._leases.send_later(
                    Unsent(lease.device_uuid, lease.id, lease.cls, "dropped", False)
                )
                self.stats["leases_lost"] += 1
                self.metrics.leases_lost.labels(lease.cls).inc()

    def _worker_info(self, leases: int) -> str:
        """What the registry says about this process (JSON)."""
        host, pid, _ = self.owner.rsplit(":", 2)
        return json.dumps(
            {
                "host": host,
                "pid": int(pid),
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

    # -- idle memory ------------------------------------------------------------

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

    def _process_gates(self) -> list[Gate]:
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
                try:
                    cb(uuid, idle)
                except Exception:  # a user callback must not kill the heartbeat
                    log.exception("recycle_callback_failed", device=uuid)

    def _gpus_record(self, snap: Snapshot | None) -> tuple[str, str]:
        """(host, JSON of this host's snapshot) for the pool; ("", "") without one."""
        if not self._register or snap is None:
            return "", ""
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
        doc = {"backend": snap.backend, "devices": devices, "faults": faults}
        return snap.host or self.owner.rsplit(":", 2)[0], json.dumps(doc, separators=(",", ":"))

    def beat_now(self) -> None:
        """Renew every held lease now, in this thread (tests, shutdown paths)."""
        self._check_usable()
        self._beat()

    # -- overrides --------------------------------------------------------------

    def pause(
        self,
        cls: str,
        *,
        duration: float | str | None = None,
        reason: str = "",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Pause ``cls``: its requests DEFER (reason ``paused``).

        The pause lasts until :meth:`resume`, or until ``duration`` passes when one is given.
        """
        return self._override("pause", cls, 0, duration, reason, who)

    def resume(self, cls: str, *, who: str | None = None) -> dict[str, Any]:
        """Lift a pause of ``cls``."""
        return self._override("resume", cls, 0, None, "", who)

    def cap(
        self,
        cls: str,
        n: int,
        *,
        duration: float | str | None = None,
        reason: str = "",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Lower ``cls``'s pool-wide cap to ``n`` until ``duration`` passes.

        A runtime cap never raises the policy's: one at or above it changes
        nothing, and the gate logs a warning (``cap_changes_nothing``).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError("a cap is a whole number >= 0", key="n", value=n)
        reply = self._override("cap", cls, n, duration, reason, who)
        cp = self.effective_policy.classes.get(cls)
        if cp is not None and not cp.lowered_by(n):
            log.warning(
                "cap_changes_nothing",
                cls=cls,
                n=n,
                policy_cap=cp.max_concurrent,
                fix="a runtime cap only lowers the policy's; apply a new policy to raise it",
            )
        return reply

    def uncap(self, cls: str, *, who: str | None = None) -> dict[str, Any]:
        """Remove a runtime cap of ``cls``."""
        return self._override("uncap", cls, 0, None, "", who)

    def drain(
        self,
        cls: str | None = None,
        *,
        duration: float | str | None = None,
        reason: str = "",
        who: str | None = None,
    ) -> dict[str, Any]:
        """Pause ``cls``, or with no class every class but the highest (all the
        classes that share the highest priority keep running)."""
        if cls is not None:
            return self.pause(cls, duration=duration, reason=reason or "drain", who=who)
        policy = self.effective_policy
        result: dict[str, Any] = {}
        for name in policy.classes:
            if name not in policy.highest_classes:
                result = self.pause(name, duration=duration, reason=reason or "drain", who=who)
        return result

    def overrides(self) -> dict[str, Any]:
        """The pool's overrides as stored (expired entries may still show until the next change)."""
        self._check_usable()
        raw = self._call(self._client.hget, self._keys.state, "ovr")
        return json.loads(raw) if raw else {"pause": {}, "cap": {}}

    def _override(
        self,
        kind: str,
        cls: str,
        n: int,
        duration: float | str | None,
        reason: str,
        who: str | None,
    ) -> dict[str, Any]:
        self._check_usable()
        for_ms = lifetime_ms(duration)
        who = who or _process.operator_name()
        try:
            raw = self._call(
                self._scripts.set_override,
                keys=[self._keys.state],
                args=[self._keys.prefix, self._now_arg(), kind, cls, n, for_ms, who, reason],
            )
        except redis.ResponseError as exc:
            if "unknown_class" in str(exc):
                raise self._unknown_class(cls) from None
            raise BackendError(str(exc)) from exc
        log.info(
            "override_set",
            kind=kind,
            cls=cls,
            n=n,
            duration_s=for_ms / 1000 if for_ms else None,  # None: until lifted
            who=who,
            reason=reason,
        )
        return json.loads(raw)  # type: ignore[no-any-return]

    # -- plumbing ---------------------------------------------------------------

    def _unknown_class(self, cls: str) -> UsageError:
        """The error for a class the pool's policy does not define ("did you mean" included)."""
        try:
            self.effective_policy.class_policy(cls)
        except UsageError as exc:
            return UsageError(f"pool {quote(self.pool)}: {exc}")
        return UsageError(f"pool {quote(self.pool)}: its policy has no class {quote(cls)}")

    def _now_arg(self) -> int:
        return self._clock_ms() if self._clock_ms is not None else 0

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except REDIS_DOWN as exc:
            raise self._unreachable(exc) from exc
        except redis.ResponseError as exc:
            if refuses_writes(exc):
                raise self._unreachable(exc) from exc
            raise

    def _unreachable(self, exc: BaseException) -> BackendError:
        return BackendError(f"Redis at {self.redis_url} is unreachable: {exc}")

    def _wake_listener(self) -> WakeListener:
        with self._lock:
            if self._wake is None:
                self._wake = WakeListener(self._client, self._keys.wake)
        self._wake.ensure_started()
        return self._wake

    @contextlib.contextmanager
    def _waiting_as(self, waiter: str) -> Generator[None, None, None]:
        """A blocking admission's waiter entry: gone when the admission ends
        without a lease, however it ends (timed out, rejected, interrupted,
        cancelled, the gate closed), not one waiter TTL later."""
        with self._lock:
            self._waiting.add(waiter)
        try:
            yield
        except BaseException as exc:
            # Not when Redis did not answer the last decision: it did not write
            # the entry, an earlier one expires by itself, and the caller's
            # timeout is not held up by one more socket timeout.
            last = getattr(exc, "decision", None)
            if last is None or last.reason != Reason.BACKEND_UNAVAILABLE:
                self._forget_waiter(waiter)
            raise
        finally:
            with self._lock:
                self._waiting.discard(waiter)

    def _forget_waiter(self, *waiters: str) -> None:
        """Delete waiter entries; on failure they expire by themselves within
        the waiter TTL. One written by a decision in flight when the gate
        closed goes once close() is done."""
        if _process.pid != self._pid:
            return
        if self._closed:
            self._late(lambda: self._hdel_waiters(waiters))
        else:
            self._hdel_waiters(waiters)

    def _hdel_waiters(self, waiters: Sequence[str]) -> None:
        with contextlib.suppress(BackendError, redis.RedisError):
            self._call(self._client.hdel, self._keys.waiters, *waiters)

    def _late(self, tell: Callable[[], object]) -> None:
        """What an operation in flight when the gate closed still has to tell
        Redis (a release, a waiter's end): done once close() is done, on a
        connection closed again after, so that close() never has its client
        closed under it."""
        with self._close_lock:
            try:
                tell()
            finally:
                self._scripts.close()
                self._client.close()

    def _check_usable(self) -> None:
        if _process.pid != self._pid:
            raise UsageError(
                "this Gate was made in a parent process; make a new Gate in the child after fork"
            )
        if self._closed:
            raise UsageError("this Gate is closed")

    def close(self) -> None:
        """Release every lease this gate holds, leave the worker registry (its
        idle memory stops counting towards fragmentation) and stop its threads."""
        if _process.pid != self._pid:
            return
        with self._close_lock:
            if self._closed:
                return
            # From here on, decisions refuse to start; one in flight finishes
            # and tells Redis what it must through _late, after this.
            self._closed = True
            reachable = False
            try:
                reachable = self._close_releases()
            finally:
                if self._heartbeat is not None:
                    self._heartbeat.stop()
                if self._register and reachable:
                    # Its idle excess leaves the devices' fragmentation in the same step.
                    k = self._keys
                    with contextlib.suppress(BackendError, redis.RedisError):
                        self._call(
                            self._scripts.remove_worker,
                            keys=[k.state, k.workers, k.workerinfo, k.idle_memory, k.idle_seen],
                            args=[self.owner],
                        )
                if self._wake is not None:
                    self._wake.stop()
                self._scripts.close()
                self._client.close()

    def _close_releases(self) -> bool:
        """close()'s part: blocked admissions' waiter entries, queued releases
        and held leases go. Returns whether Redis answered throughout: once it
        fails, the rest is not tried (each try would wait a socket timeout):
        those leases expire within one TTL, the entries within the waiter TTL,
        and the worker's registry entry goes with its heartbeat's silence."""
        with self._lock:
            waiting = list(self._waiting)
        if waiting:  # blocked admissions end with a UsageError: their entries go now
            self._hdel_waiters(waiting)
        try:
            self._send_releases()
            reachable = True
        except BackendError:
            reachable = False
        for lease in self._leases.live():
            lease.released = True
            if reachable:
                self._release_lease(lease, "dropped")
                reachable = not self._leases.has_unsent()
            else:
                self._leases.discard(lease)
                self.metrics.job_outcomes.labels(lease.cls, "dropped").inc()
        return reachable

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Gate pool={self.pool!r} redis={self.redis_url} leases={len(self._leases)}>"


def _give_back_unused(deciding: asyncio.Future[Decision]) -> None:
    """A decision whose awaiting task was cancelled: release what it admitted,
    unused (rate token refunded), counted as ``dropped``."""
    if deciding.cancelled() or deciding.exception() is not None:
        return
    lease = deciding.result().lease
    if lease is not None:
        lease.release("dropped", refund=True)


def _check_request(cls: object, tenant: object) -> None:
    """A request's class is a name and its tenant, if any, a string."""
    if type(cls) is not str:
        raise UsageError(f'a class is named by a string, like "batch", not {cls!r}')
    if tenant is not None and type(tenant) is not str:
        raise UsageError(f'a tenant is a string, like "team-a", not {tenant!r}')


class _Request:
    """One blocking admission: its waiter id, its deadline, and how long to sleep."""

    __slots__ = ("cls", "deadline", "gate", "timeout", "vram", "waiter")

    def __init__(
        self,
        gate: Gate,
        cls: str,
        vram: int | str,
        timeout: float | str | None,
        tenant: str | None,
    ) -> None:
        gate._check_usable()
        _check_request(cls, tenant)
        self.gate = gate
        self.cls = cls
        self.vram = parse_size(vram, key="vram")
        self.timeout = None if timeout is None else parse_duration(timeout, key="timeout")
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.waiter = f"{gate.owner}|{_uuid.uuid4().hex}"

    def pause_after(self, d: Decision) -> float:
        """Seconds to wait after a DEFER; raises when rejected or out of time."""
        what = f"{self.cls} request for {format_size(self.vram)}"
        if d.outcome is Outcome.REJECT:
            raise AdmissionRejected(f"{what} rejected: {d.reason} ({d.detail})", d)
        # Come back before the waiter entry lapses, so the request keeps counting.
        pause = min(d.retry_after, self.gate.effective_policy.pool.waiter_ttl_s / 2)
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise AdmissionTimeout(
                    f"{what} not admitted within {self.timeout:g}s; last reason: {d.reason}", d
                )
            pause = min(pause, left)
        return max(pause, 0.001)


class _AsyncAdmission:
    """What :meth:`Gate.admit_async` returns: awaitable and an async context manager."""

    def __init__(
        self,
        gate: Gate,
        cls: str,
        vram: int | str,
        timeout: float | str | None,
        device: str | None,
        tenant: str | None,
    ) -> None:
        self._args = (cls, vram, timeout, device, tenant)
        self._gate = gate
        self._ticket: Ticket | None = None

    def __await__(self) -> Generator[Any, None, Ticket]:
        return self._gate._admit_async(*self._args).__await__()

    async def __aenter__(self) -> Ticket:
        self._ticket = await self._gate._admit_async(*self._args)
        return self._ticket

    async def __aexit__(self, *exc: Any) -> None:
        if self._ticket is not None:
            await self._ticket.__aexit__(*exc)


def _close_all_at_exit() -> None:
    for gate in list(_live_gates):
        # Exiting anyway; the leases expire within one TTL.
        with contextlib.suppress(Exception):
            gate.close()


atexit.register(_close_all_at_exit)
