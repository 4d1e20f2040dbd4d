"""The pool's Asynq queues as status and metrics show them: readings, rate, ETA, verdict lines.

A class's ``queues`` (its policy) name the Asynq queues its workers run.
:func:`read_pool_queues` reads each of them with :func:`gpugate.asynq.read_queue`
from the Redis Asynq uses (not necessarily the pool's), adds the throughput
(measured against the caller's previous reading when there is one, else
today's average), the drain time, and the lines they add to the pool's
verdict. ``gpugate status`` and the metrics collector both call it and hand
:attr:`QueuesView.concerns` to :func:`~gpugate.state._verdict.assess` as
``extra``, so the printed verdict and ``gpugate_pool_health`` agree.

A queue's oldest pending task is a concern after the wait that makes its
class's requests one: 30 s for the pool's highest class, 10 min for the
others (``TOP_CLASS_WAIT_S``, ``OTHER_CLASS_WAIT_S``). Queues that Asynq's
Redis cannot give are one concern, naming the error; the pool's own state
is still read and shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis

from .._exceptions import BackendError
from ..asynq import QueueStats, Throughput, eta_s, queue_concerns, read_queues, throughput
from ..policy import Policy
from ._connect import Client
from ._verdict import OTHER_CLASS_WAIT_S, TOP_CLASS_WAIT_S

__all__ = ["QueueView", "QueuesView", "read_pool_queues"]


@dataclass(frozen=True, slots=True)
class QueueView:
    """One queue of the pool: its reading, its class, rate, drain time and concerns.

    ``rate`` is ``None`` when there is nothing to go on (see
    :func:`gpugate.asynq.throughput`); ``eta_s`` is 0 with no backlog and
    ``None`` when the queue will not drain by itself (paused, nothing
    processed).
    """

    stats: QueueStats
    cls: str
    rate: Throughput | None
    eta_s: float | None
    concerns: tuple[str, ...]

    @property
    def queue(self) -> str:
        """The queue's name."""
        return self.stats.queue


@dataclass(frozen=True, slots=True)
class QueuesView:
    """The pool's queues in class order (empty when no class has any).

    ``error`` says why they could not be read (Asynq's Redis unreachable);
    ``queues`` is then empty.
    """

    queues: tuple[QueueView, ...] = ()
    error: str | None = None

    @property
    def concerns(self) -> tuple[str, ...]:
        """The verdict lines of every queue, and one for a failed read."""
        lines = [line for q in self.queues for line in q.concerns]
        if self.error is not None:
            lines.append(f"Asynq queues unreadable: {self.error}")
        return tuple(lines)

    def readings(self) -> dict[str, QueueStats]:
        """Each queue's reading, to pass as ``previous`` to the next read."""
        return {q.queue: q.stats for q in self.queues}


def read_pool_queues(
    client: Client,
    policy: Policy | None,
    *,
    previous: Mapping[str, QueueStats] | None = None,
    now_ms: int | None = None,
) -> QueuesView:
    """Read the queues of ``policy``'s classes from ``client`` (the Redis Asynq uses).

    ``previous`` holds the caller's last readings (:meth:`QueuesView.readings`),
    so the rate is measured between the two. Reads nothing when no class has
    queues. A :class:`~gpugate.BackendError` (or any Redis error) becomes
    :attr:`QueuesView.error` rather than an exception: the queues are one
    part of the pool's status.
    """
    if policy is None:
        return QueuesView()
    owners = policy.queue_classes()
    if not owners:
        return QueuesView()
    try:
        readings = read_queues(client, list(owners), now_ms=now_ms)
    except BackendError as exc:
        return QueuesView(error=str(exc))
    except redis.RedisError as exc:
        # read_queues wraps what its scripts raise, not a registry
        # (asynq:queues) of the wrong type; that must not break a scrape either.
        return QueuesView(error=f"cannot read Asynq's queue registry: {exc}")
    before = previous or {}
    top = policy.highest_classes
    views = []
    for queue, stats in readings.items():
        cls = owners[queue]
        rate = throughput(stats, before.get(queue))
        limit = TOP_CLASS_WAIT_S if cls in top else OTHER_CLASS_WAIT_S
        views.append(
            QueueView(
                stats=stats,
                cls=cls,
                rate=rate,
                eta_s=eta_s(stats, rate),
                concerns=tuple(queue_concerns(stats, rate, latency_limit_s=limit)),
            )
        )
    return QueuesView(tuple(views))
