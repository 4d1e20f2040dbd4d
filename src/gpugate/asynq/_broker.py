"""Every write Asynq's own server makes to a task, as one script each: the worker's broker.

These are the Redis side of a task's life as Asynq v0.26.0 writes it
(``internal/rdb/rdb.go``), so that Go servers, the inspector and AsynqMon
see a task handled by gpugate exactly as one handled by Go:

* :func:`peek` then :func:`claim`: Asynq's dequeue (``dequeueCmd``) split in
  two, so a worker can look at the oldest pending task before it takes it;
  the claim only succeeds while that task is still the oldest.
* :func:`extend_leases`: the heartbeat's ``ExtendLease``.
* :func:`done` (success, no retention), :func:`mark_complete` (success with
  a retention), :func:`retry`, :func:`archive`, :func:`requeue` (shutdown):
  the processor's endings. Each answers False where Asynq's script answers
  ``NOT FOUND``: the task is no longer active and leased (a recoverer took
  it after the lease ran out), and the caller must forget it.
* :func:`forward` (the forwarder), :func:`lease_expired` (the recoverer's
  listing), :func:`delete_expired_completed` (the janitor),
  :func:`write_result` (``ResultWriter``).

Time is the caller's clock, as in Asynq (Go passes its host's ``time.Now()``):
``now_s`` and ``retry_at_s`` are Unix seconds (float); zset scores and
message times are whole seconds, rounded down as Go's ``Time.Unix()`` does;
``pending_since`` is Unix ns; a daily counter's key is the UTC day of
``now_s`` and it expires 90 days after the increment that creates it.

The one difference: Asynq's archive cutoff is 90 calendar days back in the
Go process's local time zone; here it is 90 x 86400 s (the same in UTC).
Redis errors raise :class:`~gpugate.BackendError`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

import redis
import structlog

from .._exceptions import BackendError, UsageError
from ..state._connect import REDIS_DOWN, Client
from ._keys import AsynqKeys, decode, encode, utc_day
from ._proto import TaskMessage, decode_task_message, encode_task_message
from ._run import run_script

__all__ = [
    "ARCHIVE_MAX_AGE_S",
    "ARCHIVE_MAX_SIZE",
    "ERR_LEASE_EXPIRED",
    "LEASE_DURATION_S",
    "PAUSED",
    "Peek",
    "archive",
    "claim",
    "default_retry_delay",
    "delete_expired_completed",
    "done",
    "extend_leases",
    "forward",
    "lease_expired",
    "mark_complete",
    "peek",
    "requeue",
    "retry",
    "write_result",
]

log = structlog.get_logger(__name__)

PAUSED: Final = "paused"
# The error_msg Asynq's recoverer writes into a task whose lease ran out
# (``asynq.ErrLeaseExpired``, recoverer.go).
ERR_LEASE_EXPIRED: Final[str] = "asynq: task lease expired"
# Asynq's LeaseDuration: a lease runs this long from a dequeue or heartbeat,
# and the recoverer takes a task this long after its lease ran out.
LEASE_DURATION_S: Final = 30
# Asynq keeps at most this many archived tasks per queue (the trim leaves
# one fewer once it is reached), none older than ARCHIVE_MAX_AGE_S.
ARCHIVE_MAX_SIZE: Final = 10_000
ARCHIVE_MAX_AGE_S: Final = 90 * 86_400
# Daily counters expire this long after the increment that creates them.
_STATS_TTL_S = 90 * 86_400
# Both Asynq's total counters start again at 1 when processed reaches this.
_MAX_INT64 = (1 << 63) - 1
# Asynq's forwarder moves at most this many tasks a script (forwardCmd).
_FORWARD_BATCH = 100


@dataclass(frozen=True, slots=True)
class Peek:
    """The oldest pending task of a queue: the one Asynq's dequeue would take next.

    ``message`` is decoded from the task hash's ``msg``.
    """

    queue: str
    task_id: str
    message: TaskMessage


def _whole_s(t: float) -> int:
    """``t`` as Go's ``Time.Unix()`` gives it: whole seconds, rounded down."""
    return math.floor(t)


def _id(task_id: str) -> bytes:
    return encode(task_id)


# -- taking a task ------------------------------------------------------------------


def peek(client: Client, queue: str) -> Peek | Literal["paused"] | None:
    """The oldest pending task of ``queue``; :data:`PAUSED` if the queue is paused; None if empty.

    One read-only script: the paused check and the task come from one instant.
    Raises :class:`~gpugate.BackendError` when the oldest pending id has no
    task hash or its ``msg`` does not decode (nothing Asynq writes).
    """
    keys = AsynqKeys(queue)
    reply = run_script(
        client,
        "asynq_peek",
        f"read the oldest pending task of Asynq queue {queue!r}",
        [keys.pending, keys.paused],
        [encode(keys.task_prefix)],
    )
    assert isinstance(reply, list)
    outcome = decode(reply[0])
    if outcome == "paused":
        return PAUSED
    if outcome == "empty":
        return None
    task_id = decode(reply[1])
    if not reply[2]:
        raise BackendError(
            f"task {task_id!r} is the oldest pending task of Asynq queue {queue!r} but "
            f"{keys.task(task_id)} has no msg; remove the id from {keys.pending} "
            "(LREM) or restore the task"
        )
    return Peek(queue=queue, task_id=task_id, message=decode_task_message(reply[2]))


def claim(client: Client, queue: str, task_id: str, *, lease_until_s: int) -> TaskMessage | None:
    """Take task ``task_id`` from ``queue`` as Asynq's dequeue does, if it is still the oldest.

    Atomically, only while the queue is not paused and ``task_id`` is the
    tail of pending: move it to active, set its state ``active``, drop its
    ``pending_since`` and lease it until ``lease_until_s`` (Unix s; Asynq:
    now + :data:`LEASE_DURATION_S`). Returns the task's message, or None
    when nothing was taken (paused meanwhile, or another worker took it).
    """
    keys = AsynqKeys(queue)
    reply = run_script(
        client,
        "asynq_claim",
        f"take task {task_id!r} of Asynq queue {queue!r}",
        [keys.pending, keys.paused, keys.active, keys.lease],
        [_id(task_id), int(lease_until_s), encode(keys.task_prefix)],
    )
    assert isinstance(reply, list)
    if decode(reply[0]) != "claimed":
        return None
    if not reply[1]:
        # Asynq's dequeue leaves such an id active and leased too; its
        # recoverer skips it, as lease_expired() does.
        log.warning("asynq_claimed_task_has_no_message", queue=queue, task_id=task_id)
        return None
    return decode_task_message(reply[1])


def extend_leases(
    client: Client, queue: str, task_ids: Sequence[str], *, lease_until_s: int
) -> list[str]:
    """Extend the leases of ``task_ids`` in ``queue`` to ``lease_until_s`` (Unix s).

    Asynq's ``ExtendLease`` (``ZADD XX``): an id without a lease entry is
    not given one. Returns the ids that had one (and now run to
    ``lease_until_s``); a task missing from the answer is lost to this worker.
    """
    if not task_ids:
        return []
    keys = AsynqKeys(queue)
    reply = run_script(
        client,
        "asynq_extend_lease",
        f"extend the leases of {len(task_ids)} tasks of Asynq queue {queue!r}",
        [keys.lease],
        [int(lease_until_s), *(_id(t) for t in task_ids)],
    )
    assert isinstance(reply, list)
    return [decode(t) for t in reply]


# -- ending an attempt --------------------------------------------------------------

# An attempt's end written again (its first try timed out, and may have run
# after all) names the leases its attempt held, "<last confirmed> <last
# tried>" Unix s: the scripts answer NOT FOUND when the task's lease is none
# of them (another attempt has the task by then). A first try passes none, as
# Asynq writes it.


def _guard(attempt_leases: str) -> list[str]:
    return [attempt_leases] if attempt_leases else []


def done(client: Client, msg: TaskMessage, *, now_s: float, attempt_leases: str = "") -> bool:
    """Task ``msg`` succeeded and has no retention: delete it, as Asynq's ``Done`` does.

    Removes it from active and lease, deletes its hash, counts it processed
    (today's counter and the total) and releases its uniqueness lock if it
    still holds it. False when the task was no longer active and leased.
    ``attempt_leases`` (an end written again, see ``_guard``):
    also False when the task's lease is none of these.
    """
    keys = AsynqKeys(msg.queue)
    now = _whole_s(now_s)
    script_keys = [
        keys.active,
        keys.lease,
        keys.task(msg.id),
        keys.processed(utc_day(now_s)),
        keys.processed_total,
    ]
    if msg.unique_key:
        script_keys.append(msg.unique_key)
    reply = run_script(
        client,
        "asynq_done",
        f"mark task {msg.id!r} of Asynq queue {msg.queue!r} done",
        script_keys,
        [_id(msg.id), now + _STATS_TTL_S, _MAX_INT64, *_guard(attempt_leases)],
        not_found=True,
    )
    return reply is not None


def mark_complete(
    client: Client, msg: TaskMessage, *, now_s: float, attempt_leases: str = ""
) -> bool:
    """Task ``msg`` succeeded and has a retention: keep it completed, as Asynq's ``MarkAsComplete``.

    Sets ``completed_at`` in the message, adds the task to the completed
    zset until ``now + retention``, counts it processed and releases its
    uniqueness lock if it still holds it. False when the task was no longer
    active and leased (``attempt_leases``: as in :func:`done`).
    """
    keys = AsynqKeys(msg.queue)
    now = _whole_s(now_s)
    encoded = encode_task_message(replace(msg, completed_at=now))
    script_keys = [
        keys.active,
        keys.lease,
        keys.completed,
        keys.task(msg.id),
        keys.processed(utc_day(now_s)),
        keys.processed_total,
    ]
    if msg.unique_key:
        script_keys.append(msg.unique_key)
    reply = run_script(
        client,
        "asynq_complete",
        f"mark task {msg.id!r} of Asynq queue {msg.queue!r} completed",
        script_keys,
        [
            _id(msg.id),
            now + _STATS_TTL_S,
            now + msg.retention,
            encoded,
            _MAX_INT64,
            *_guard(attempt_leases),
        ],
        not_found=True,
    )
    return reply is not None


def retry(
    client: Client,
    msg: TaskMessage,
    *,
    retry_at_s: float,
    error: str,
    is_failure: bool,
    now_s: float,
    attempt_leases: str = "",
) -> bool:
    """An attempt of ``msg`` failed: to the retry zset, due at ``retry_at_s`` (Asynq's ``Retry``).

    The message gets ``error_msg`` = ``error`` and ``last_failed_at`` = now;
    a failure (``is_failure``, Asynq's ``IsFailure``) also gets ``retried``
    + 1 and counts as processed and failed; a non-failure (a rate limit)
    changes neither. False when the task was no longer active and leased
    (``attempt_leases``: as in :func:`done`).
    """
    keys = AsynqKeys(msg.queue)
    now = _whole_s(now_s)
    modified = replace(
        msg,
        retried=msg.retried + 1 if is_failure else msg.retried,
        error_msg=error,
        last_failed_at=now,
    )
    day = utc_day(now_s)
    reply = run_script(
        client,
        "asynq_retry",
        f"move task {msg.id!r} of Asynq queue {msg.queue!r} to retry",
        [
            keys.task(msg.id),
            keys.active,
            keys.lease,
            keys.retry,
            keys.processed(day),
            keys.failed(day),
            keys.processed_total,
            keys.failed_total,
        ],
        [
            _id(msg.id),
            encode_task_message(modified),
            _whole_s(retry_at_s),
            now + _STATS_TTL_S,
            1 if is_failure else 0,
            _MAX_INT64,
            *_guard(attempt_leases),
        ],
        not_found=True,
    )
    return reply is not None


def archive(
    client: Client, msg: TaskMessage, *, error: str, now_s: float, attempt_leases: str = ""
) -> bool:
    """Move ``msg`` to the archive (retries exhausted, or ``SkipRetry``), as Asynq's ``Archive``.

    The message gets ``error_msg`` and ``last_failed_at`` (``retried`` stays);
    it counts as processed and failed. The archive is trimmed as Asynq trims
    it: entries older than 90 days go, then the oldest beyond
    :data:`ARCHIVE_MAX_SIZE` - 1, with their task hashes. False when the
    task was no longer active and leased (``attempt_leases``: as in :func:`done`).
    """
    keys = AsynqKeys(msg.queue)
    now = _whole_s(now_s)
    modified = replace(msg, error_msg=error, last_failed_at=now)
    day = utc_day(now_s)
    reply = run_script(
        client,
        "asynq_archive",
        f"archive task {msg.id!r} of Asynq queue {msg.queue!r}",
        [
            keys.task(msg.id),
            keys.active,
            keys.lease,
            keys.archived,
            keys.processed(day),
            keys.failed(day),
            keys.processed_total,
            keys.failed_total,
        ],
        [
            _id(msg.id),
            encode_task_message(modified),
            now,
            now - ARCHIVE_MAX_AGE_S,
            ARCHIVE_MAX_SIZE,
            now + _STATS_TTL_S,
            _MAX_INT64,
            encode(keys.task_prefix),
            *_guard(attempt_leases),
        ],
        not_found=True,
    )
    return reply is not None


def requeue(client: Client, msg: TaskMessage) -> bool:
    """Put active task ``msg`` back as the next pending task, as Asynq does when shutdown times out.

    ``RPUSH`` to pending (the dequeue end) and state ``pending``; the
    message, ``retried`` and the counters stay, and, as in Asynq,
    ``pending_since`` is not written (the queue's latency reads 0 while it
    is the oldest). False when the task was no longer active and leased.
    """
    keys = AsynqKeys(msg.queue)
    reply = run_script(
        client,
        "asynq_requeue",
        f"requeue task {msg.id!r} of Asynq queue {msg.queue!r}",
        [keys.active, keys.lease, keys.pending, keys.task(msg.id)],
        [_id(msg.id)],
        not_found=True,
    )
    return reply is not None


# -- housekeeping -------------------------------------------------------------------


def forward(client: Client, queue: str, *, now_s: float) -> int:
    """Move the due scheduled and retry tasks of ``queue`` to pending, as Asynq's forwarder does.

    Due: scored at or before ``now_s`` (whole seconds). Scheduled first,
    then retry, 100 a script until none is left; each joins pending at the
    head (taken last, ``LPUSH``) with ``pending_since`` = now, or its group's
    zset (state ``aggregating``) when it has a group. A paused queue is
    forwarded too, as in Asynq. Returns how many tasks moved.
    """
    keys = AsynqKeys(queue)
    now = _whole_s(now_s)
    now_ns = round(now_s * 1e9)
    moved = 0
    for source in (keys.scheduled, keys.retry):
        while True:
            n = run_script(
                client,
                "asynq_forward",
                f"forward the due tasks of {source}",
                [source, keys.pending],
                [now, encode(keys.task_prefix), now_ns, encode(keys.group_prefix)],
            )
            assert isinstance(n, int)
            moved += n
            if n == 0:
                break
    return moved


def lease_expired(client: Client, queue: str, *, cutoff_s: float) -> list[TaskMessage]:
    """Active tasks of ``queue`` whose lease ran out by ``cutoff_s`` (Asynq's ``ListLeaseExpired``).

    Asynq's recoverer passes now - :data:`LEASE_DURATION_S` and then, for
    each, :func:`archive` if ``retried >= retry`` else :func:`retry`, with
    error :data:`ERR_LEASE_EXPIRED`. Ordered by lease expiry; an id without
    a task hash is skipped, as in Asynq.
    """
    keys = AsynqKeys(queue)
    reply = run_script(
        client,
        "asynq_lease_expired",
        f"list the lease-expired tasks of Asynq queue {queue!r}",
        [keys.lease],
        [_whole_s(cutoff_s), encode(keys.task_prefix)],
    )
    assert isinstance(reply, list)
    return [decode_task_message(m) for m in reply]


def delete_expired_completed(client: Client, queue: str, *, now_s: float, batch: int = 100) -> int:
    """Delete the completed tasks of ``queue`` whose retention ended, as Asynq's janitor does.

    Expired: scored at or before ``now_s`` (whole seconds). ``batch`` tasks
    a script (Asynq's default 100) until none is left; returns how many.
    """
    if batch < 1:
        raise UsageError(f"delete_expired_completed: batch must be at least 1, not {batch!r}")
    keys = AsynqKeys(queue)
    deleted = 0
    while True:
        n = run_script(
            client,
            "asynq_delete_expired_completed",
            f"delete the expired completed tasks of Asynq queue {queue!r}",
            [keys.completed],
            [_whole_s(now_s), encode(keys.task_prefix), batch],
        )
        assert isinstance(n, int)
        deleted += n
        if n == 0:
            return deleted


def write_result(client: Client, queue: str, task_id: str, data: bytes) -> int:
    """Store ``data`` as the result of task ``task_id``, as Asynq's ``ResultWriter.Write``.

    ``HSET`` of the task hash's ``result`` field, unconditionally, as in
    Asynq. Returns ``len(data)``.
    """
    key = AsynqKeys(queue).task(task_id)
    try:
        client.hset(encode(key), "result", data)
    except REDIS_DOWN as exc:
        raise BackendError(
            f"Redis is unreachable; cannot write the result of {key}: {exc}"
        ) from exc
    except redis.ResponseError as exc:
        raise BackendError(
            f"cannot write the result of {key}: {exc}; it should be the task's hash"
        ) from exc
    return len(data)


def default_retry_delay(
    retried: int, error: BaseException | None = None, *, rng: random.Random | None = None
) -> float:
    """Seconds until the next attempt, as Asynq's ``DefaultRetryDelayFunc``.

    ``retried**4 + 15 + randint(0, 29) * (retried + 1)`` whole seconds (from
    Sidekiq); ``error`` is not used, as in Asynq. ``rng``: the random source
    (tests); by default the ``random`` module's.
    """
    del error
    draw = rng.randrange(30) if rng is not None else random.randrange(30)
    return float(int(float(retried) ** 4) + 15 + draw * (retried + 1))
