"""Every Redis key name of Asynq that gpugate reads or writes, in one place.

Asynq (hibiken/asynq, the layout stable since v0.23 and read at v0.26.0,
``internal/base/base.go``) keeps its keys global to the Redis database, not
per gpugate pool. Every per-queue key starts ``asynq:{<queue>}:``; the
``{…}`` is a Redis Cluster hash tag, so all keys of one queue share a slot.

Key schema (``Q`` = ``asynq:{<queue>}:``; times in Unix seconds unless marked):

* ``asynq:queues`` (set): every queue a client has enqueued to.
* ``Q pending`` (list): task ids; LPUSH on enqueue, the tail (right end) is
  the oldest and is dequeued first. ``Q active`` (list): ids being processed.
* ``Q lease``, ``Q scheduled``, ``Q retry``, ``Q archived``, ``Q completed``
  (zsets): id -> lease expiry, process-at, retry-at, time archived,
  retention expiry.
* ``Q t:<id>`` (hash): one task: ``msg`` (protobuf TaskMessage), ``state``,
  ``pending_since`` (Unix ns, only while pending), ``unique_key``, ``group``,
  ``result``.
* ``Q paused`` (string): exists = paused; value = Unix s of the pause; Asynq
  sets it with no TTL.
* ``Q processed:<YYYY-MM-DD>``, ``Q failed:<YYYY-MM-DD>`` (strings): attempts
  finished and failed that UTC day (90-day TTL); ``Q processed``,
  ``Q failed``: all-time totals, no TTL.
* ``Q groups`` (set): group names; ``Q g:<group>`` (zset) per group.

Every running server's heartbeat, every 5 s (``S`` = ``{<host>:<pid>:<server
id>}``, a hash tag, so a server's two keys share a slot; Asynq's
``ServerInfoKey`` and ``WorkersKey`` are :func:`server_info_key` and
:func:`workers_key`):

* ``asynq:servers`` (zset): member ``asynq:servers:S`` -> expiry of that key
  (heartbeat time + TTL, whole seconds); ``asynq:workers`` (zset): the same
  for ``asynq:workers:S``. Members outlive their keys until an inspector
  prunes them.
* ``asynq:servers:S`` (string): protobuf ServerInfo, TTL 10 s (two
  heartbeats). ``asynq:workers:S`` (hash): task id -> protobuf WorkerInfo,
  same TTL; absent while the server has no task in hand.

gpugate adds one key of its own per queue it pauses, in its own namespace but
with the queue's hash tag, so that one script checks both atomically:

* ``gpugate:asynq:{<queue>}:pause`` (hash): gpugate's pause of the queue:
  ``v`` (the paused key's value gpugate wrote), ``until`` (ms, 0 = no
  expiry), ``who``, ``why``, ``at`` (ms), ``pool``, ``cls``; it expires with
  the paused key.
"""

from __future__ import annotations

import time

from .._exceptions import ConfigError

__all__ = [
    "ALL_QUEUES",
    "ALL_SERVERS",
    "ALL_WORKERS",
    "CANCEL_CHANNEL",
    "AsynqKeys",
    "check_queue_name",
    "decode",
    "encode",
    "server_info_key",
    "utc_day",
    "workers_key",
]

ALL_QUEUES = "asynq:queues"
ALL_SERVERS = "asynq:servers"
ALL_WORKERS = "asynq:workers"
CANCEL_CHANNEL = "asynq:cancel"


def server_info_key(host: str, pid: int, server_id: str) -> str:
    """``asynq:servers:{<host>:<pid>:<server_id>}``: one server's ServerInfo (a string)."""
    return f"{ALL_SERVERS}:{{{host}:{pid:d}:{server_id}}}"


def workers_key(host: str, pid: int, server_id: str) -> str:
    """``asynq:workers:{<host>:<pid>:<server_id>}``: one server's WorkerInfo hash."""
    return f"{ALL_WORKERS}:{{{host}:{pid:d}:{server_id}}}"


def check_queue_name(queue: object) -> str:
    """``queue`` if Asynq accepts it as a queue name (any text but blank), else ConfigError.

    This is Asynq's own rule (``base.ValidateQueueName``): names are not
    trimmed, so ``" q"`` and ``"q"`` are two queues.
    """
    if not isinstance(queue, str) or not queue.strip():
        raise ConfigError(
            f"{queue!r} is not an Asynq queue name; a queue name has at least one "
            "character other than white space, such as 'default' or 'ocr:bulk'",
            key="queue",
            value=queue,
        )
    return queue


def encode(key: str) -> bytes:
    """A key as the bytes Redis stores.

    Queue names read back from Redis are decoded with ``surrogateescape``, so a
    name that is not UTF-8 names the same keys again.
    """
    return key.encode("utf-8", "surrogateescape")


def decode(value: object) -> str:
    """A Redis reply as text, the inverse of :func:`encode` (None reads as "").

    Bytes that are not UTF-8 (a queue name, say) keep their bytes, escaped.
    """
    if value is None:
        return ""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def utc_day(unix_s: float) -> str:
    """``YYYY-MM-DD`` of ``unix_s`` in UTC, as Asynq names its daily counters."""
    return time.strftime("%Y-%m-%d", time.gmtime(unix_s))


class AsynqKeys:
    """The key names of one Asynq queue, and gpugate's pause marker for it."""

    __slots__ = (
        "active",
        "archived",
        "completed",
        "failed_total",
        "group_prefix",
        "groups",
        "lease",
        "pause_marker",
        "paused",
        "pending",
        "prefix",
        "processed_total",
        "queue",
        "retry",
        "scheduled",
        "task_prefix",
    )

    def __init__(self, queue: str) -> None:
        self.queue = check_queue_name(queue)
        self.prefix = f"asynq:{{{queue}}}:"
        self.pending = self.prefix + "pending"
        self.active = self.prefix + "active"
        self.lease = self.prefix + "lease"
        self.scheduled = self.prefix + "scheduled"
        self.retry = self.prefix + "retry"
        self.archived = self.prefix + "archived"
        self.completed = self.prefix + "completed"
        self.paused = self.prefix + "paused"
        self.processed_total = self.prefix + "processed"
        self.failed_total = self.prefix + "failed"
        self.groups = self.prefix + "groups"
        self.task_prefix = self.prefix + "t:"
        self.group_prefix = self.prefix + "g:"
        # The queue's hash tag comes first, so the marker shares the queue's slot.
        self.pause_marker = f"gpugate:asynq:{{{queue}}}:pause"

    def task(self, task_id: str) -> str:
        """The hash of task ``task_id``."""
        return self.task_prefix + task_id

    def group(self, name: str) -> str:
        """The zset of group ``name`` (aggregating tasks)."""
        return self.group_prefix + name

    def unique(self, task_type: str, payload: bytes | None) -> str:
        """The uniqueness lock of a ``task_type`` task with ``payload`` (``base.UniqueKey``).

        ``Q unique:<type>:<md5 hex of payload>``; a nil payload (None) ends in
        ``:<type>:``. A unique task's message carries this name in ``unique_key``.
        """
        import hashlib

        if payload is None:
            return f"{self.prefix}unique:{task_type}:"
        # Asynq's checksum only names the lock; it guards nothing (FIPS hosts allow it so).
        checksum = hashlib.md5(payload, usedforsecurity=False).hexdigest()
        return f"{self.prefix}unique:{task_type}:{checksum}"

    def processed(self, day: str) -> str:
        """Attempts finished on UTC day ``day`` (``YYYY-MM-DD``, see :func:`utc_day`)."""
        return f"{self.prefix}processed:{day}"

    def failed(self, day: str) -> str:
        """Attempts failed on UTC day ``day`` (``YYYY-MM-DD``)."""
        return f"{self.prefix}failed:{day}"

    def __repr__(self) -> str:
        return f"<AsynqKeys queue={self.queue!r}>"
