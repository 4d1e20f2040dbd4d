"""A read-only view of Asynq queues: sizes by state, latency, counters, pause.

:func:`read_queue` reads one queue in one script (``asynq_read_queue.lua``),
so every figure is of one instant; nothing is written, so status and
metrics can read as often as they like beside Asynq's servers. The figures
are those of Asynq's ``Inspector.GetQueueInfo`` (``internal/rdb/inspect.go``,
``currentStatsCmd``):

* sizes: ``LLEN`` of pending and active, ``ZCARD`` of scheduled, retry,
  archived and completed, and the aggregating tasks of every group; ``size``
  is their sum, as Asynq's;
* latency: the age of the oldest pending task (the tail of the pending list)
  from its hash's ``pending_since`` (Unix ns). A task without the field
  reads 0, as in Asynq: one requeued by a server's shutdown, or written by a
  client older than v0.22;
* processed and failed: the daily counters of the current UTC day and the
  all-time ones. Processed counts every finished attempt, failures included
  (Asynq's "succeeded" is processed - failed);
* paused: whether the queue's paused key exists, and whether the pause is
  gpugate's own (:class:`QueuePause`, written by :func:`~gpugate.asynq.pause_queue`).

Differences from Asynq's inspector: time is the scripts' time (Redis
``TIME``, or ``now_ms`` in tests) rather than the reading host's clock, so
every host agrees on latency and on which UTC day is "today"; a latency that
clock skew between producers and Redis would make negative reads 0; a queue
missing from ``asynq:queues`` is read (``registered`` False) instead of being
an error; memory usage (``MEMORY USAGE`` sampling) is not read.

:func:`throughput` and :func:`eta_s` turn readings into the drain time that
``gpugate status`` shows; :func:`queue_concerns` into verdict lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import redis

from .._exceptions import BackendError
from .._units import format_duration
from ..state._connect import REDIS_DOWN, Client
from ._keys import ALL_QUEUES, AsynqKeys, decode, encode
from ._run import run_script

__all__ = [
    "QueuePause",
    "QueueStats",
    "Throughput",
    "eta_s",
    "list_queues",
    "queue_concerns",
    "read_queue",
    "read_queues",
    "throughput",
]

DAY_S = 86_400
# Early in a UTC day today's counters say little: below this many seconds
# into the day, the day-average rate takes yesterday's count in too.
EARLY_IN_DAY_S = 3_600
# A rate measured between two readings closer than this is noise.
MIN_SPAN_S = 1.0
# Verdict threshold for the oldest pending task, unless the caller gives one
# per queue (the highest class's queues want a shorter one).
LATENCY_LIMIT_S = 600.0


def _int(v: object) -> int:
    """A reply as an integer; 0 for none or for text that is not one."""
    if v is None:
        return 0
    if isinstance(v, int):
        return v
    try:
        return int(decode(v))
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class QueuePause:
    """gpugate's own pause of an Asynq queue, from its marker.

    ``until_ms`` is when Redis ends it (0 = no expiry: until unpaused);
    ``at_ms`` when it was set or last changed; ``paused_at_s`` the paused
    key's value (Unix s, as Asynq writes it); ``pool`` and ``cls`` the pool
    and class whose pause set it (empty when set directly).
    """

    queue: str
    until_ms: int
    who: str
    why: str
    at_ms: int
    pool: str
    cls: str
    paused_at_s: int

    def remaining_s(self, now_ms: int) -> float | None:
        """Seconds until it ends by itself; ``None`` when it has no expiry."""
        return None if self.until_ms == 0 else max(0.0, (self.until_ms - now_ms) / 1000)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One Asynq queue at ``now_ms`` (the scripts' clock, ms).

    ``registered``: the queue is in ``asynq:queues`` (a client enqueued to it).
    ``day``: the UTC day (``YYYY-MM-DD``) of the ``*_today`` counters.
    ``oldest_pending_since_ns``: ``pending_since`` of the oldest pending task
    (Unix ns; 0 when there is none or it has no such field).
    ``paused_at_s``: the paused key's value (Unix s; 0 when not paused or not
    a number); ``paused_ttl_ms``: its TTL (``None`` for none).
    ``pause``: gpugate's pause, when the pause in force is gpugate's own.
    """

    queue: str
    registered: bool
    now_ms: int
    day: str
    pending: int
    active: int
    scheduled: int
    retry: int
    archived: int
    completed: int
    aggregating: int
    groups: int
    processed_today: int
    failed_today: int
    processed_total: int
    failed_total: int
    processed_yesterday: int
    oldest_pending_since_ns: int
    paused: bool
    paused_at_s: int
    paused_ttl_ms: int | None
    pause: QueuePause | None

    @property
    def size(self) -> int:
        """Tasks in the queue in any state, as Asynq's ``QueueInfo.Size``."""
        return (
            self.pending
            + self.active
            + self.scheduled
            + self.retry
            + self.archived
            + self.completed
            + self.aggregating
        )

    @property
    def latency_s(self) -> float:
        """Age of the oldest pending task in seconds (0 with none, or without ``pending_since``)."""
        if not self.oldest_pending_since_ns:
            return 0.0
        return max(0.0, (self.now_ms * 1_000_000 - self.oldest_pending_since_ns) / 1e9)

    @property
    def succeeded_today(self) -> int:
        """Attempts that succeeded this UTC day (processed - failed)."""
        return max(0, self.processed_today - self.failed_today)

    @property
    def backlog(self) -> int:
        """Tasks to work through before the queue is drained: pending + active."""
        return self.pending + self.active

    @property
    def paused_by(self) -> Literal["gpugate", "other"] | None:
        """Who paused it: ``"gpugate"``, ``"other"`` (AsynqMon, Asynq's CLI…), or ``None``."""
        if not self.paused:
            return None
        return "gpugate" if self.pause is not None else "other"

    def by_state(self) -> dict[str, int]:
        """Sizes by Asynq task state, in Asynq's order (the metric's ``state`` label)."""
        return {
            "pending": self.pending,
            "active": self.active,
            "scheduled": self.scheduled,
            "retry": self.retry,
            "archived": self.archived,
            "completed": self.completed,
            "aggregating": self.aggregating,
        }


def list_queues(client: Client) -> list[str]:
    """The queues in ``asynq:queues`` (every queue a client has enqueued to), sorted."""
    try:
        members = client.smembers(ALL_QUEUES)
    except REDIS_DOWN as exc:
        raise BackendError(f"Redis is unreachable while listing Asynq queues: {exc}") from exc
    except redis.ResponseError as exc:
        raise BackendError(
            f"{ALL_QUEUES} is not the set of queues Asynq keeps ({exc}); is this Asynq's Redis?"
        ) from exc
    # A blank member names no queue Asynq could serve; skip it rather than fail.
    return sorted(name for name in (decode(m) for m in members) if name.strip())


def read_queue(
    client: Client,
    queue: str,
    *,
    now_ms: int | None = None,
    registered: bool | None = None,
) -> QueueStats:
    """Read one Asynq queue; one round trip (two when ``registered`` is not given).

    ``now_ms`` injects the scripts' clock (tests); by default it is Redis
    ``TIME``. ``registered`` says whether the queue is in ``asynq:queues``,
    when the caller already knows; otherwise it is asked. A queue nobody has
    used reads as empty and not paused. Raises :class:`~gpugate.BackendError`
    when Redis cannot be read.
    """
    keys = AsynqKeys(queue)
    raw = run_script(
        client,
        "asynq_read_queue",
        f"read Asynq queue {queue!r}",
        [
            keys.pending,
            keys.active,
            keys.scheduled,
            keys.retry,
            keys.archived,
            keys.completed,
            keys.processed_total,
            keys.failed_total,
            keys.paused,
            keys.groups,
            keys.pause_marker,
        ],
        [encode(keys.prefix), now_ms or 0],
        hint=f"its keys (asynq:{{{queue}}}:*) should hold what Asynq writes there",
    )
    if registered is None:
        try:
            # Bytes, so that a name that is not UTF-8 is found (the stubs say str).
            registered = bool(client.sismember(ALL_QUEUES, encode(queue)))  # type: ignore[arg-type]
        except REDIS_DOWN as exc:
            raise BackendError(f"Redis is unreachable while reading Asynq queues: {exc}") from exc
    return _stats(queue, registered, raw)


def read_queues(
    client: Client, queues: Iterable[str] | None = None, *, now_ms: int | None = None
) -> dict[str, QueueStats]:
    """Read ``queues`` (default: every queue in ``asynq:queues``), in the order given.

    One round trip for the registry, then one per queue (each queue is read
    atomically; queues are not read at one instant together).
    """
    known = set(list_queues(client))
    names = sorted(known) if queues is None else list(dict.fromkeys(queues))
    return {q: read_queue(client, q, now_ms=now_ms, registered=q in known) for q in names}


def _stats(queue: str, registered: bool, raw: list[object]) -> QueueStats:
    (
        now,
        day,
        pending,
        active,
        scheduled,
        retry,
        archived,
        completed,
        processed_today,
        failed_today,
        processed_total,
        failed_total,
        processed_yesterday,
        oldest,
        groups,
        aggregating,
        paused_value,
        pttl,
        owned,
        _marker_v,
        m_until,
        m_who,
        m_why,
        m_at,
        m_pool,
        m_cls,
    ) = raw
    paused_raw = None if paused_value is None else decode(paused_value)
    ttl = _int(pttl)
    pause = None
    if owned == 1:  # the read script's verdict (pause_owned, _asynq.lua)
        pause = QueuePause(
            queue=queue,
            until_ms=_int(m_until),
            who=decode(m_who),
            why=decode(m_why),
            at_ms=_int(m_at),
            pool=decode(m_pool),
            cls=decode(m_cls),
            paused_at_s=_int(paused_raw),
        )
    return QueueStats(
        queue=queue,
        registered=registered,
        now_ms=_int(now),
        day=decode(day),
        pending=_int(pending),
        active=_int(active),
        scheduled=_int(scheduled),
        retry=_int(retry),
        archived=_int(archived),
        completed=_int(completed),
        aggregating=_int(aggregating),
        groups=_int(groups),
        processed_today=_int(processed_today),
        failed_today=_int(failed_today),
        processed_total=_int(processed_total),
        failed_total=_int(failed_total),
        processed_yesterday=_int(processed_yesterday),
        oldest_pending_since_ns=_int(oldest),
        paused=paused_raw is not None,
        paused_at_s=_int(paused_raw),
        paused_ttl_ms=ttl if ttl > 0 else None,
        pause=pause,
    )


# -- throughput and drain time ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Throughput:
    """Attempts a queue finishes per second, and what the figure rests on.

    ``basis`` ``"measured"``: the growth of the all-time processed counter
    between two readings ``span_s`` apart (``gpugate status --watch``, the
    metrics exporter). ``"today"``: the current UTC day's processed counter
    over the time since midnight, with yesterday's count taken in during the
    first hour of the day (``span_s`` is then the day and a bit).
    """

    per_s: float
    basis: Literal["measured", "today"]
    span_s: float

    def describe(self) -> str:
        """``12.5/min over 30s``, ``3.1/min today``."""
        per_min = self.per_s * 60
        rate = f"{per_min:.3g}/min" if per_min >= 0.1 else f"{self.per_s * 3600:.3g}/h"
        if self.basis == "today":
            return f"{rate} (today's average)"
        return f"{rate} over {format_duration(round(self.span_s))}"


def throughput(after: QueueStats, before: QueueStats | None = None) -> Throughput | None:
    """The queue's recent throughput: measured between two readings, else today's average.

    ``before`` is an earlier reading of the same queue; a measurement needs
    at least a second between them and a counter that did not go back (Asynq
    restarts a total that reaches MaxInt64). ``None`` when neither basis has
    any time to go on (a reading taken exactly at UTC midnight, with no
    counter for the day before).
    """
    if before is not None and before.queue == after.queue:
        span = (after.now_ms - before.now_ms) / 1000
        done = after.processed_total - before.processed_total
        if span >= MIN_SPAN_S and done >= 0:
            return Throughput(done / span, "measured", span)
    into_day = (after.now_ms / 1000) % DAY_S
    done = after.processed_today
    span = into_day
    if into_day < EARLY_IN_DAY_S:
        done += after.processed_yesterday
        span += DAY_S
    if span <= 0:
        return None
    return Throughput(done / span, "today", span)


def eta_s(stats: QueueStats, rate: Throughput | None) -> float | None:
    """Seconds until the backlog (pending + active) is worked off at ``rate``.

    0 with no backlog; ``None`` when it will not drain by itself: the queue is
    paused, or nothing was processed (no rate, or a rate of 0).
    """
    if stats.backlog == 0:
        return 0.0
    if stats.paused or rate is None or rate.per_s <= 0:
        return None
    return stats.backlog / rate.per_s


def queue_concerns(
    stats: QueueStats,
    rate: Throughput | None,
    *,
    latency_limit_s: float = LATENCY_LIMIT_S,
) -> list[str]:
    """What is wrong with a queue, as verdict lines for ``gpugate status``; empty if nothing.

    A queue with waiting tasks is a concern when it is paused (saying by
    whom and until when), or when its oldest pending task has waited
    ``latency_limit_s`` or more (with the backlog, and the drain time at the
    recent rate, or "nothing processed").
    """
    q = stats.queue
    out: list[str] = []
    if stats.paused and stats.pending:
        if stats.pause is not None:
            left = stats.pause.remaining_s(stats.now_ms)
            until = "no expiry" if left is None else f"reverts in {_short(left)}"
            who = stats.pause.who or "gpugate"
            out.append(f"queue {q} paused by {who} ({until}): {stats.pending} pending")
        else:
            out.append(
                f"queue {q} paused outside gpugate (AsynqMon or asynq CLI; no expiry): "
                f"{stats.pending} pending"
            )
        return out
    if stats.pending and stats.latency_s >= latency_limit_s:
        eta = eta_s(stats, rate)
        if eta is None:
            how = "nothing processed" + (" today" if rate is None or rate.basis == "today" else "")
        else:
            how = f"ETA {_short(eta)} at {rate.describe()}" if rate is not None else ""
        out.append(
            f"queue {q} oldest task waits {_short(stats.latency_s)}, {stats.backlog} to do, {how}"
        )
    return out


def _short(seconds: float) -> str:
    return format_duration(round(seconds) if seconds >= 1 else round(seconds, 3))
