"""The gate: every admission decision of this process goes through here.

``try_admit`` is one round trip to Redis (the ``admit_job`` script), unless the
local pre-check already knows that no device can fit, in which case it answers
DEFER without Redis. ``admit`` blocks, registered as a waiter, until it is
admitted, rejected or out of time.

The gate's other parts live beside it, each a base class of :class:`Gate`:
``_core`` (connection, the pool's policy, error conversion), ``_workers``
(the worker registry record, idle memory), ``_keeping`` (heartbeat beats,
renewals, releases) and ``_overrides`` (pause, cap, drain).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import math
import os
import queue
import random
import threading
import time
import uuid as _uuid
from collections.abc import Callable, Generator, Sequence
from typing import Any

import redis
import structlog

from .. import _process, _speedups
from .._exceptions import (
    AdmissionRejected,
    AdmissionTimeout,
    BackendError,
    UsageError,
)
from .._logging import Throttle
from .._units import format_size, parse_duration, parse_size
from ..metrics import Metrics, default_metrics
from ..policy import Policy
from ..sampling import Sampler, Snapshot, default_sampler
from ..state._connect import REDIS_DOWN, connect, mask_url, refuses_writes, resolve_redis_url
from ..state._keys import PoolKeys, owner_id, poller_waiter_id, waiter_id
from ..state._scripts import Scripts
from ._core import _b2s
from ._decision import Decision, Outcome, Reason, make_decision
from ._heartbeat import Heartbeat
from ._herd import Herd
from ._idle import idle_memory
from ._keeping import LeaseKeeping
from ._lease import Granted, Lease, LeaseRegistry
from ._overrides import Overrides
from ._ticket import Ticket
from ._wake import WakeListener
from ._workers import add_live_gate, live_gates

log = structlog.get_logger(__name__)

# admit_job.lua's ARGV: 10 fixed arguments, then (uuid, total, used, age_ms)
# per device; the first device's age is argument 13 (0-based).
_SAMPLE_AGE_ARG = 13

# Reasons whose retry_after is an estimate: they get jitter so that waiters
# polling the same pool do not come back in lockstep.
_ESTIMATED = frozenset({"cap", "priority", "vram", "fragmented", "no_gpu", "stale_sample"})

# A release frees its memory for the decisions that use a sample taken after
# it (until then it counts as a ghost): a waiter woken by a release that
# defers for one of these decides again once its sampler has read the devices
# at least _SAMPLE_AFTER_WAKE_S after the wake-up (the script's clock is in
# ms), polling the (local) sampler every _SAMPLE_POLL_S meanwhile. A
# "priority" DEFER too: the freed room may be on the device it was kept off
# the others for, still a ghost in the first decision.
_FREED_AT_A_LATER_SAMPLE = frozenset({"vram", "fragmented", "priority"})
# try_admit waiter ids a gate remembers, for close() and for the pre-check
# (one per request shape and poller); past this many it forgets them: their
# entries expire in Redis by themselves, and their next poll asks Redis.
_POLLING_KEPT = 1024
_SAMPLE_AFTER_WAKE_S = 0.002
_SAMPLE_POLL_S = 0.005


_running_loop = asyncio._get_running_loop
_current_task = asyncio.current_task
_thread_seq = itertools.count()


class _ThisThread(threading.local):
    """The calling thread's name as a ``try_admit`` poller: a number never
    given to another thread of this process, so a new thread does not take
    over the waiter entries of one that ended."""

    def __init__(self) -> None:
        self.poller = f"{next(_thread_seq):x}"


_this_thread = _ThisThread()


def _poller() -> str:
    """Who is polling: the calling thread, and the asyncio task running in it.

    Two job slots of one worker asking for the same thing are two pollers with
    a waiter entry each, so admitting one leaves the other counting. A task is
    told apart by its id, unique among live objects: a task that ended may
    lend it to a new one, which then takes over its entry (gone within the
    waiter TTL otherwise)."""
    thread = _this_thread.poller
    if _running_loop() is None:
        return thread
    task = _current_task()
    return thread if task is None else f"{thread}.{id(task):x}"


def _follow_up_by(d: Decision, woke_at: float | None, pause: float) -> float | None:
    """When a blocking admission woken at ``woke_at`` (monotonic; ``None``: not
    woken) should decide again after deferring with ``d``: as soon as its sampler
    has read the devices after the wake-up, waiting no longer than ``pause``
    (the monotonic deadline). ``None``: it waits as usual."""
    if woke_at is None or d.reason not in _FREED_AT_A_LATER_SAMPLE:
        return None
    return time.monotonic() + pause


_gate_seq = itertools.count()

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


class Gate(LeaseKeeping, Overrides):
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
        self._pool_policy_auto = False  # the pool's is a worker's automatic default
        self._pool_version_b = b""  # the same, as the scripts' replies carry it
        self.policy_mismatch = False
        self.sampler: Sampler = sampler if sampler is not None else default_sampler()
        self._clock_ms = _clock_ms
        self.metrics = (metrics if metrics is not None else default_metrics()).for_pool(self.pool)
        self._pid = _process.pid
        # The pid NVML lists this process under (tests and simulation give others).
        self._gpu_pid = _gpu_pid if _gpu_pid is not None else self._pid
        self._idle = idle_memory(self._gpu_pid)
        self._idle_sent = {}
        self._recycle = set()
        self._on_recycle = []
        self._told = []
        self._redis_clock = None
        self._seq = next(_gate_seq)
        host = self.sampler.sample().host or "host"
        self.owner = owner_id(host, self._pid, _uuid.uuid4().hex[:8])
        self._leases = LeaseRegistry(self._idle.touch)
        self._heartbeat: Heartbeat | None = None
        self._wake: WakeListener | None = None
        # Its blocked admissions, which wake-ups go to; a lease end concerns
        # those deferred for memory only when on a device of this gate's.
        self._herd = Herd(lambda: self._packed[3])
        self._lock = threading.Lock()
        self._beat_lock = threading.Lock()
        # Held by close() throughout; what an operation in flight at close
        # still has to tell Redis waits for it (see _late).
        self._close_lock = threading.RLock()
        # try_admit's last DEFER vram from Redis per waiter id (monotonic): the
        # pre-check trusts it while that poller's entry is fresh.
        self._recent_defer: dict[str, float] = {}
        # try_admit's waiter entries Redis holds (id -> when, monotonic): close()
        # deletes them, as a closed gate polls no more.
        self._polling: dict[str, float] = {}
        # The sample arguments last packed, the devices tuple they describe,
        # and those devices' uuids.
        self._packed: tuple[object, list[Any], list[int], frozenset[str]] = (
            (),
            [],
            [],
            frozenset(),
        )
        # Local leases held (Redis unreachable, on_backend_error "open"), by
        # id: (class, device uuid, estimate in bytes).
        self._local_held: dict[str, tuple[str, str, int]] = {}
        # Local leases ended (released, or dropped: their finalizer may run in
        # garbage collection, in a thread holding _lock): their ids, counted
        # off under _lock by the next local admission.
        self._local_ended: queue.SimpleQueue[str] = queue.SimpleQueue()
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
        self._peers = ()
        self._peers_seen = -1
        add_live_gate(self)
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
        size, device and poller: the calling thread, and the asyncio task
        running in it) for the pool's waiter TTL (or until this gate closes
        or the poller is admitted), so polling counts for priority. Threads
        or tasks polling the same request are waiters each. An ADMIT's lease
        is renewed by this gate's heartbeat until released or dropped.
        """
        _check_request(cls, tenant)
        vram_b = parse_size(vram, key="vram")
        if device is not None:
            self._check_device(device)
        waiter = poller_waiter_id(self.owner, cls, vram_b, device or "", _poller())
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
        self._wake_listener()
        herd = self._herd
        woke_at = None
        with (
            self._waiting_as(request.waiter),
            herd.joined((cls, device), request.vram) as member,
        ):
            while True:
                generation = herd.generation
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
                herd.settle(member, generation, d.reason)
                woke_at = time.monotonic() if herd.wait(member, pause) else None

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
        self._wake_listener()
        herd = self._herd
        woke_at = None
        loop = asyncio.get_running_loop()
        waiter = request.waiter

        def forget() -> None:
            # Off the loop: with Redis hung the HDEL waits a socket timeout.
            _off_loop(loop, self._forget_waiter, waiter)

        # The waiter entry goes on any exit.
        with (
            self._waiting_as(waiter, forget),
            herd.joined((cls, device), request.vram, loop) as member,
        ):
            while True:
                generation = herd.generation
                handoff = _Handoff(self, waiter, loop)
                deciding = asyncio.ensure_future(
                    asyncio.to_thread(handoff.decide, cls, request.vram, device, tenant)
                )
                try:
                    d = await asyncio.shield(deciding)
                except asyncio.CancelledError:
                    # The decision runs on in its thread: what it admits goes
                    # back unused, and the waiter entry it writes goes too,
                    # once it is done, without the loop (asyncio.run() may
                    # have closed it by then).
                    handoff.abandon()
                    deciding.add_done_callback(_retrieved)
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
                herd.settle(member, generation, d.reason)
                woke = await herd.wait_async(member, pause)
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
        packed_for, packed, frees, _ = self._packed
        if packed_for is not devices:
            # A sampler hands out the same devices tuple until they change.
            packed = _speedups.pack_samples(
                [d.uuid for d in devices],
                [d.total for d in devices],
                [d.used for d in devices],
                [0] * len(devices),
            )
            frees = [d.free for d in devices]
            self._packed = (devices, packed, frees, frozenset(d.uuid for d in devices))
        last = self._recent_defer.get(waiter) if precheck else None
        local_retry = (
            self._local_defer_retry(last, vram, device, snap, frees)
            if last is not None and devices
            else None
        )
        if local_retry is not None:
            self.stats["local_defers"] += 1
            return Decision(
                Outcome.DEFER,
                Reason.VRAM,
                retry_after=local_retry,
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
            0,
            *packed,
        ]
        try:
            # Each device's own age (a reading standing in for a failing
            # device is older), and the script clock then: the samples' times.
            taken = time.monotonic()
            args[_SAMPLE_AGE_ARG::4] = snap.device_ages_ms(taken)
            args[9] = self._redis_ms_at(taken)
            reply = self._run_admit(self._admit_keys, args)
        except BackendError as exc:
            # Redis may have admitted it all the same: a reply lost to a
            # timeout, or a script that failed after its lease was written (a
            # Redis Cluster slot migrating). Not when it was never reached.
            if not isinstance(exc.__cause__, redis.ConnectionError):
                self._maybe_orphans = True
            return self._backend_down(cls, vram, snap, exc, device)
        except BaseException:
            # Interrupted mid-call (Ctrl-C, sys.exit from a signal handler):
            # Redis may have admitted it, and nobody holds that lease.
            self._maybe_orphans = True
            if self._closed:
                # The handler closed the gate before this call could end, so
                # close() looked for such leases too early: look again now.
                self._late(functools.partial(self._give_back_orphans, settle_ms=0))
            raise
        self._note_redis_clock(reply[9], time.monotonic())
        (
            outcome,
            reason_b,
            retry_ms,
            dev_uuid,
            lease_id,
            expires_ms,
            detail_b,
            available,
            v,
        ) = reply[:9]
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
        if out is Outcome.ADMIT:
            if d_uuid is not None:
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
                    ttl_s=(int(expires_ms) - int(reply[9])) / 1000,
                    sent_mono=taken,
                    granted=Granted(reply[10], int(reply[9]), int(reply[11]), tenant),
                )
                self._hold(lease)
            if precheck:
                # The script deleted this poller's entry: nothing for close() to
                # delete, and no entry the pre-check could count on.
                self._polling.pop(waiter, None)
                self._recent_defer.pop(waiter, None)
        elif out is Outcome.DEFER and precheck:
            now = time.monotonic()
            if reason == Reason.VRAM:
                # Only a memory DEFER: the local free memory stands in for its cause.
                if len(self._recent_defer) > _POLLING_KEPT:
                    self._recent_defer.clear()  # those pollers ask Redis once more
                self._recent_defer[waiter] = now
            if len(self._polling) > _POLLING_KEPT:
                self._polling.clear()  # the oldest expire in Redis by themselves
            self._polling[waiter] = now
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

    def _local_defer_retry(
        self, last: float, vram: int, device: str | None, snap: Snapshot, frees: list[int]
    ) -> float | None:
        """The ``retry_after`` of a DEFER the fast path may answer itself, or
        ``None`` when Redis must decide. It may when nothing fits locally and
        this poller's waiter entry, refreshed by its DEFER ``vram`` from Redis
        at ``last`` (monotonic), is fresh enough (a third of ``waiter_ttl``)
        that priority still sees it. That entry is not refreshed now, so the
        poller is told to come back within ¾ of ``waiter_ttl`` of that answer,
        as after one from Redis. ``frees``: each device's free bytes, in the
        snapshot's order."""
        pool = self.effective_policy.pool
        since_s = time.monotonic() - last
        if since_s > pool.waiter_ttl_s / 3:
            return None
        if device is not None:
            frees = [d.free for d in snap.devices if d.uuid == device]
        if _speedups.precheck_fits(frees, vram, pool.safety_margin):
            return None
        # The limit is at least 5/12 of waiter_ttl (since_s is at most a third),
        # above the jitter's lowest (half the estimate, which is at most half of
        # waiter_ttl): the retries stay spread, never piled on the limit.
        return self._jitter(self._estimate_s(), limit_s=0.75 * pool.waiter_ttl_s - since_s)

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

    def _jitter(self, seconds: float, limit_s: float = math.inf) -> float:
        """``seconds`` ±50 %, uniform, within ``retry_max`` (spread below the
        cap rather than piled on it) and at most ``limit_s``."""
        low = 0.5 * seconds
        high = min(1.5 * seconds, max(low, self.effective_policy.pool.retry_max_s), limit_s)
        low = min(low, high)
        return low + (high - low) * random.random()

    def _backend_down(
        self, cls: str, vram: int, snap: Snapshot, exc: BackendError, device: str | None = None
    ) -> Decision:
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
        detail = str(exc)
        if cp.on_backend_error == "open":
            admitted = self._admit_open(cls, vram, snap, device)
            if isinstance(admitted, Decision):
                return admitted
            detail = f"{detail}; open mode: {admitted}"
        return Decision(
            Outcome.DEFER,
            Reason.BACKEND_UNAVAILABLE,
            retry_after=self._jitter(min(1.0, self._estimate_s())),
            detail=detail,
            cls=cls,
            vram=vram,
        )

    def _admit_open(
        self, cls: str, vram: int, snap: Snapshot, device: str | None
    ) -> Decision | str:
        """An ADMIT by this process alone (Redis unreachable, ``on_backend_error
        = "open"``), or why not when its own caps or room say no.

        What admit_job.lua checks, as far as this process can know it: the
        class's ``max_concurrent`` and ``max_per_device`` and the pool's
        ``max_per_device`` over its own local leases; on each device, the
        sampler's free memory less the estimates of its local leases there
        (counted again once their jobs allocate: it errs towards deferring),
        the pool's safety margin and the reserves of the classes above
        (:meth:`Policy.reserve_above`); the pool's placement. This process's
        leases from Redis still held count as its local ones do (their jobs
        run on); other processes' leases are unknown here.
        """
        policy = self.effective_policy
        pool, cp = policy.pool, policy.class_policy(cls)
        kept_off = pool.safety_margin + policy.reserve_above(cls)
        from_redis = [(lease.cls, lease.device_uuid, lease.vram) for lease in self._leases.live()]
        with self._lock:
            while not self._local_ended.empty():
                self._local_held.pop(self._local_ended.get_nowait(), None)
            held = list(self._local_held.values()) + from_redis
            mine = sum(1 for c, _, _ in held if c == cls)
            if cp.max_concurrent is not None and mine >= cp.max_concurrent:
                return f"this process holds max_concurrent = {cp.max_concurrent} leases"
            best, best_avail = None, 0
            for d in snap.devices:
                if device is not None and d.uuid != device:
                    continue
                here = [(c, v) for c, uuid, v in held if uuid == d.uuid]
                if pool.max_per_device is not None and len(here) >= pool.max_per_device:
                    continue
                mine_here = sum(1 for c, _ in here if c == cls)
                if cp.max_per_device is not None and mine_here >= cp.max_per_device:
                    continue
                avail = d.free - sum(v for _, v in here) - kept_off
                if avail < vram:
                    continue
                if (
                    best is None
                    or (pool.placement == "spread" and avail > best_avail)
                    or (pool.placement != "spread" and avail < best_avail)
                ):
                    best, best_avail = d, avail
            if best is None and snap.devices:
                return (
                    "no device has room in this process's own count (its leases, "
                    f"safety margin {format_size(pool.safety_margin)}, reserves above "
                    f"{format_size(kept_off - pool.safety_margin)}) or a per-device slot left"
                )
            self._local_seq += 1
            lease_id = f"local-{self._local_seq}"
            uuid = best.uuid if best else ""
            self._local_held[lease_id] = (cls, uuid, vram)
            lease = Lease(
                self,
                id=lease_id,
                cls=cls,
                vram=vram,
                device=best.index if best else None,
                device_uuid=uuid,
                expires_ms=0,
                local=True,
            )
        return Decision(
            Outcome.ADMIT,
            Reason.BACKEND_OPEN,
            device=best.index if best else None,
            device_uuid=best.uuid if best else None,
            lease=lease,
            detail="Redis unreachable; admitted within this process's own caps and room",
            cls=cls,
            vram=vram,
            available=best_avail if best else None,
        )

    def _local_done(self, lease_id: str) -> None:
        self._local_ended.put(lease_id)  # no lock: see _local_ended

    # -- waiters and closing ----------------------------------------------------

    def _wake_listener(self) -> WakeListener:
        with self._lock:
            if self._wake is None:
                self._wake = WakeListener(self._client, self._keys.wake, self._herd.wake)
        self._wake.ensure_started()
        return self._wake

    @contextlib.contextmanager
    def _waiting_as(
        self, waiter: str, forget: Callable[[], object] | None = None
    ) -> Generator[None, None, None]:
        """A blocking admission's waiter entry: gone when the admission ends
        without a lease, however it ends (timed out, rejected, interrupted,
        cancelled, the gate closed), not one waiter TTL later. ``forget``
        deletes it (default: :meth:`_forget_waiter`, in this thread)."""
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
                if forget is not None:
                    forget()
                else:
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
        with contextlib.suppress(BackendError):
            self._call(self._client.hdel, self._keys.waiters, *waiters)

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
                    # Its idle excess leaves the devices' fragmentation, and its
                    # GPU snapshot the pool, in the same step.
                    k = self._keys
                    with contextlib.suppress(BackendError):
                        self._call(
                            self._scripts.remove_worker,
                            keys=[
                                k.state,
                                k.workers,
                                k.workerinfo,
                                k.idle_memory,
                                k.idle_seen,
                                k.gpus,
                            ],
                            args=[self.owner],
                        )
                if self._wake is not None:
                    self._wake.stop()
                self._herd.send_everyone()
                self._scripts.close()
                self._client.close()

    def _close_releases(self) -> bool:
        """close()'s part: waiter entries (blocked admissions', and try_admit's
        not expired yet), queued releases and held leases go. Returns whether
        Redis answered throughout: once it fails, the rest is not tried (each
        try would wait a socket timeout): those leases expire within one TTL,
        the entries within the waiter TTL, and the worker's registry entry goes
        with its heartbeat's silence."""
        # No lock: list() copies the set in one step, and close() may run in a
        # signal handler that interrupted this thread while it held _lock.
        waiting = list(self._waiting)
        # try_admit's pollers too, those whose entries have not expired yet.
        fresh = time.monotonic() - self.effective_policy.pool.waiter_ttl_s
        waiting += [w for w, at in list(self._polling.items()) if at > fresh]
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
        if reachable and self._maybe_orphans:
            # What a decision cut short may have left in Redis goes now, not
            # a TTL later (the gate beats no more).
            self._give_back_orphans(settle_ms=0)
            reachable = not self._leases.has_unsent()
        return reachable

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Gate pool={self.pool!r} redis={self.redis_url} leases={len(self._leases)}>"


class _Handoff:
    """A decision an asyncio admission runs in a worker thread, and what becomes
    of it when the awaiting task is cancelled first.

    Whichever of the two comes second, the decision done (in its thread) or
    the task cancelled (on the loop), gives back what the decision admitted,
    unused (rate token refunded, counted ``dropped``), or deletes the waiter
    entry it wrote: exactly one of them, under the handoff's lock. Neither
    waits for the loop, which may be closed before the decision is done
    (``asyncio.run(asyncio.wait_for(...))``): a done-callback on it never ran,
    and the lease went back only as a dropped one, at the next heartbeat."""

    __slots__ = ("_abandoned", "_done", "_gate", "_lease", "_lock", "_loop", "_waiter")

    def __init__(self, gate: Gate, waiter: str, loop: asyncio.AbstractEventLoop) -> None:
        self._gate = gate
        self._waiter = waiter
        self._loop = loop
        self._lock = threading.Lock()
        self._done = False
        self._abandoned = False
        self._lease: Lease | None = None

    def decide(self, cls: str, vram: int, device: str | None, tenant: str | None) -> Decision:
        """The decision (in the worker thread); given back here if its task
        was cancelled meanwhile."""
        lease = None
        try:
            d = self._gate._decide(cls, vram, self._waiter, device, tenant, False)
            lease = d.lease
            return d
        finally:
            with self._lock:
                self._done = True
                self._lease = lease
                abandoned = self._abandoned
            if abandoned:
                self._give_back(lease)

    def abandon(self) -> None:
        """The awaiting task was cancelled (on the loop): give back what the
        decision, if done, left; else the decision does once done."""
        with self._lock:
            self._abandoned = True
            done = self._done
        if done:
            _off_loop(self._loop, self._give_back, self._lease)

    def _give_back(self, lease: Lease | None) -> None:
        if lease is not None:
            lease.release("dropped", refund=True)
        else:
            self._gate._forget_waiter(self._waiter)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's exception retrieved (asyncio logs it otherwise)."""
    if not future.cancelled():
        future.exception()


def _off_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """Run ``fn(*args)`` in the loop's executor, not waiting for it (a daemon
    thread when the loop no longer takes work)."""
    try:
        loop.run_in_executor(None, fn, *args)
    except RuntimeError:  # closed, or shutting its executor down
        threading.Thread(target=fn, args=args, daemon=True).start()


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
        self.waiter = waiter_id(gate.owner, _uuid.uuid4().hex)

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
    for gate in live_gates():
        # Exiting anyway; the leases expire within one TTL.
        if isinstance(gate, Gate):
            with contextlib.suppress(Exception):
                gate.close()


atexit.register(_close_all_at_exit)
