"""What every part of a gate shares: its connection, the pool's policy, and
how a Redis failure becomes a gpugate error.

:class:`GateCore` declares the state a gate keeps (set by ``Gate.__init__``)
for the parts built on it: lease keeping (``_keeping``), the worker record and
idle memory (``_workers``), overrides (``_overrides``) and the decisions
(``_gate``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from .. import _process
from .._exceptions import BackendError, ConfigError, UsageError
from .._units import quote
from ..metrics import Metrics
from ..policy import Policy
from ..sampling import Sampler
from ..state._connect import REDIS_DOWN, down_reason, refuses_writes
from ..state._keys import PoolKeys
from ..state._scripts import Scripts
from ..state._wire import publish_args
from ._heartbeat import Heartbeat
from ._idle import IdleMemory
from ._lease import LeaseRegistry

log = structlog.get_logger(__name__)

RecycleCallback = Callable[[str, int], None]

# How much faster this host's monotonic clock may run than Redis's: NTP slews
# a clock by at most 500 ppm.
_CLOCK_DRIFT = 5e-4


@functools.cache
def _default_policy() -> Policy:
    # Frozen, so one parse serves every gate of the process.
    return Policy.default()


def _b2s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def refusal(exc: BackendError) -> str:
    """The error reply behind ``exc`` (``"nopolicy"``, ``"unknown_class x"``,
    an ACL refusal...), or ``""`` when Redis did not answer."""
    cause = exc.__cause__
    if isinstance(cause, redis.ResponseError) and not refuses_writes(cause):
        return str(cause)
    return ""


class GateCore:
    """A gate's connection, policy and shared state (see ``Gate``)."""

    pool: str
    redis_url: str
    owner: str
    policy: Policy | None
    pool_policy: Policy | None
    pool_policy_version: str | None
    _pool_policy_auto: bool
    policy_mismatch: bool
    sampler: Sampler
    metrics: Metrics
    stats: dict[str, int]
    _keys: PoolKeys
    _client: redis.Redis | redis.RedisCluster
    _scripts: Scripts
    _socket_timeout_s: float
    _pool_version_b: bytes
    _clock_ms: Callable[[], int] | None
    _pid: int
    _gpu_pid: int
    _seq: int
    _register: bool
    _started_ms: int
    _closed: bool
    _maybe_orphans: bool
    _lock: threading.Lock
    _beat_lock: threading.Lock
    _close_lock: threading.RLock
    _leases: LeaseRegistry
    _heartbeat: Heartbeat | None
    _idle: IdleMemory
    _idle_sent: dict[str, int]
    _recycle: set[str]
    _on_recycle: list[RecycleCallback]
    # What a beat has to tell holders, called once its lock is released.
    _told: list[Callable[[], None]]
    # The script clock (ms) in the last reply that carried it, and when that
    # reply came back (monotonic s): the script ran before then.
    _redis_clock: tuple[float, int] | None

    def _note_redis_clock(self, redis_ms: Any, received: float) -> None:
        """A reply that came back at ``received`` (monotonic) carried the
        script clock ``redis_ms``."""
        self._redis_clock = (received, int(redis_ms))

    def _redis_ms_at(self, mono: float) -> int:
        """A lower bound of the pool's script clock (ms) at monotonic time
        ``mono``, for placing a sample taken then on that clock: from the last
        reply that carried the clock (a round trip to read it the first
        time), less the most this host's clock may have run ahead of Redis's
        since. 0 with an injected clock: the scripts take that clock as it is."""
        if self._clock_ms is not None:
            return 0
        clock = self._redis_clock
        if clock is None:
            now = self._call(self._scripts.read_clock, keys=[self._keys.state], args=[0])
            self._note_redis_clock(now, time.monotonic())
            clock = self._redis_clock
            assert clock is not None
        received, redis_ms = clock
        elapsed_ms = (mono - received) * 1000
        # Before the reply came (another thread's, noted since): the script
        # may have run as late as that.
        drift = 1 - _CLOCK_DRIFT if elapsed_ms >= 0 else 1 + _CLOCK_DRIFT
        return redis_ms + math.floor(elapsed_ms * drift)

    @property
    def client(self) -> redis.Redis | redis.RedisCluster:
        """The Redis client this gate talks through (for metrics exporters, inspection)."""
        return self._client

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

        Returns the pool's policy version. Without a policy of its own the
        gate publishes to an empty pool the pool's policy it last knew (Redis
        lost its state: the operator's policy is restored, with a warning),
        else :meth:`Policy.default`. A forced publish that drops classes lifts
        their pauses and caps with them (those still in force are logged,
        ``overrides_lifted_with_class``).
        """
        return self._sync_policy(force=force)[0]

    def apply_policy(self) -> tuple[str, list[tuple[str, str]]]:
        """Publish this gate's own policy to the pool, replacing the pool's
        (what ``gpugate policy apply FILE`` does); running gates follow it.

        Returns the pool's new policy version and, for each pause or cap
        still in force that the new policy lifted because it has no such
        class, ``(kind, class)`` with kind ``"pause"`` or ``"cap"``, read in
        the same script call that published. Raises :class:`UsageError` on a
        gate made without a policy.
        """
        if self.policy is None:
            raise UsageError(
                "apply_policy publishes the gate's own policy: make the Gate with policy=..."
            )
        return self._sync_policy(force=True)

    def _sync_policy(self, *, force: bool) -> tuple[str, list[tuple[str, str]]]:
        """:meth:`sync_policy`, and the ``(kind, class)`` of each pause or cap
        still in force that the publish lifted with its class (for
        :meth:`apply_policy`, from the same script call)."""
        self._check_usable()
        if force:
            return self._publish(self.policy or self.pool_policy or Policy.default(), "1")
        # Into a pool without a policy (new, or Redis lost its state): the
        # pool's policy this gate last knew, else its own. Either replaces an
        # automatic default, which a worker without either publishes.
        known = None if self._pool_policy_auto else self.pool_policy
        mine = known or self.policy
        if mine is None:
            return self._publish(Policy.default(), "d")
        return self._publish(mine, "r" if known is not None else "0", restoring=known is not None)

    def _publish(
        self, mine: Policy, mode: str, *, restoring: bool = False
    ) -> tuple[str, list[tuple[str, str]]]:
        """Run ``publish_policy.lua`` with ``mine`` in ``mode`` (its ARGV[2])."""
        published, version, *raw_lifted = self._call(
            self._scripts.publish_policy,
            keys=[self._keys.state],
            args=publish_args(mine, prefix=self._keys.prefix, mode=mode, clock_ms=self._now_arg()),
        )
        version = _b2s(version)
        lifted = [(kind, cls) for kind, cls in (_b2s(x).split(" ", 1) for x in raw_lifted)]
        if lifted:
            # The policy dropped classes that had a pause or cap in force.
            log.warning(
                "overrides_lifted_with_class",
                pool=self.pool,
                lifted=[f"{kind} {cls}" for kind, cls in lifted],
                note="the new policy has no such class",
            )
        if published and restoring:
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
            self._adopt(None, version, auto=mode == "d")
        else:
            doc, auto = self._call(self._client.hmget, self._keys.state, "pdoc", "pauto")
            self._adopt(
                _b2s(doc) if doc is not None else None,
                version,
                auto=auto is not None and _b2s(auto) == version,
            )
        self._check_mismatch()
        return self.pool_policy_version or "", lifted

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

    def _follow_pool_policy(
        self, version: bytes, doc: bytes | None = None, auto: bytes | None = None
    ) -> None:
        """The pool's policy changed while this gate runs (`gpugate policy apply`):
        read it again (unless the caller read it, ``doc``), and beat at once so
        that renewals follow a new lease TTL."""
        was = self.pool_policy_version
        prior = None if self._pool_policy_auto else self.pool_policy
        if doc is None:
            try:
                doc, auto = self._call(self._client.hmget, self._keys.state, "pdoc", "pauto")
            except BackendError:
                return  # the next decision or beat tries again
        self._adopt(_b2s(doc) if doc is not None else None, _b2s(version), auto=auto == version)
        log.info("pool_policy_changed", pool=self.pool, was=was, now=self.pool_policy_version)
        restore = prior or self.policy
        if self._pool_policy_auto and restore is not None:
            # A worker without a policy published the default into a pool that
            # had lost its state (an uncapped one): put back what this gate knew.
            # On failure the next decision or beat follows the version again.
            with contextlib.suppress(BackendError):
                self._publish(restore, "r", restoring=True)
        self._check_mismatch()
        if self._heartbeat is not None:
            self._heartbeat.kick()

    def _current_policy(self) -> Policy:
        """The pool's policy as stored now, for a choice that must not rest on
        this gate's copy (up to lease_ttl/3 old after `gpugate policy apply`);
        a change is followed as a decision follows it. Without a policy in the
        pool, :attr:`effective_policy`."""
        self._check_usable()
        doc, version, auto = self._call(
            self._client.hmget, self._keys.state, "pdoc", "pversion", "pauto"
        )
        if version is not None and version != self._pool_version_b:
            self._follow_pool_policy(version, doc, auto)
        return self.effective_policy

    def read_pool_policy(self) -> Policy | None:
        """The policy stored in the pool (``None`` if it has none); publishes nothing."""
        self._check_usable()
        doc, stored, auto = self._call(
            self._client.hmget, self._keys.state, "pdoc", "pversion", "pauto"
        )
        if doc is None:
            return None
        self._adopt(
            _b2s(doc),
            _b2s(stored) if stored is not None else None,
            auto=auto is not None and auto == stored,
        )
        return self.pool_policy

    def _adopt(self, doc: str | None, version: str | None = None, *, auto: bool = False) -> None:
        """Take the pool's policy (``doc``, or :attr:`pool_policy` as set) and
        version; ``auto``: a worker's automatic default (see publish_policy.lua)."""
        self._pool_policy_auto = auto
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
        """``fn(*args, **kwargs)``, every Redis failure a :class:`BackendError`:
        unreachable (also a server refusing writes: a replica, maxmemory), or
        an error reply (a script's own, such as ``nopolicy``: see
        :func:`refusal`; an ACL refusal; a key of another type)."""
        try:
            return fn(*args, **kwargs)
        except REDIS_DOWN as exc:
            raise self._unreachable(exc) from exc
        except redis.ResponseError as exc:
            if refuses_writes(exc):
                raise self._unreachable(exc) from exc
            raise BackendError(f"Redis at {self.redis_url} refused a call: {exc}") from exc

    def _unreachable(self, exc: BaseException) -> BackendError:
        return BackendError(f"Redis at {self.redis_url} {down_reason(exc)}")

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
