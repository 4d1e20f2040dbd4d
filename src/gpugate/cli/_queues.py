"""``gpugate queues``, and how status and the pause commands describe Asynq queues.

``gpugate queues`` lists every queue in ``asynq:queues`` (and the queues of
the pool's classes that nobody has enqueued to yet), read from the Redis
Asynq uses: tasks by state, latency, today's counts, drain time at today's
average, and who paused it. It says which class of the pool's policy each
queue feeds; a pool without a policy is an error, as for the other commands
(a wrong ``--pool``). With only ``--asynq-redis-url`` (no pool Redis) it lists
the queues without classes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import redis

from .._exceptions import BackendError, UsageError
from .._units import format_duration
from ..asynq import (
    PauseResult,
    QueueStats,
    Throughput,
    eta_s,
    list_queues,
    read_queues,
    throughput,
)
from ..state._connect import Client, connect, mask_url
from ..state._inspect import read_pool
from ._common import (
    Style,
    ago,
    asynq_redis_url,
    clock,
    no_policy,
    open_asynq_client,
    open_client,
    out,
    pool_name,
)

OTHERS = "AsynqMon or asynq CLI"


def paused_text(stats: QueueStats) -> str:
    """``by gpugate (alice@h1) until 14:32:05 (in 28m)``, ``by someone else (…)``, or ``-``."""
    if not stats.paused:
        return "-"
    pause = stats.pause
    if pause is None:
        return f"by someone else ({OTHERS}; no expiry)"
    who = f" ({pause.who})" if pause.who else ""
    left = pause.remaining_s(stats.now_ms)
    if left is None:
        return f"by gpugate{who}, no expiry"
    return f"by gpugate{who} until {clock(pause.until_ms)} (in {ago(left)})"


def eta_text(stats: QueueStats, eta: float | None) -> str:
    """The drain time, ``-`` with no backlog, or why there is none."""
    if stats.backlog == 0:
        return "-"
    if eta is None:
        return "paused" if stats.paused else "no progress"
    return ago(eta)


def rate_text(rate: Throughput | None) -> str:
    """``12/min over 30s``, ``3.1/min (today's average)``, ``none today``, or ``-`` (no basis)."""
    if rate is None:
        return "-"
    if rate.per_s > 0:
        return rate.describe()
    return (
        "none today"
        if rate.basis == "today"
        else f"none over {format_duration(round(rate.span_s))}"
    )


def queue_json(
    stats: QueueStats, cls: str | None, rate: Throughput | None, eta: float | None
) -> dict[str, Any]:
    """One queue as plain data (``--json`` of status and queues); times in seconds."""
    pause = stats.pause
    return {
        "queue": stats.queue,
        "class": cls,
        "registered": stats.registered,
        "tasks": stats.by_state(),
        "size": stats.size,
        "latency_s": round(stats.latency_s, 3),
        "processed_today": stats.processed_today,
        "failed_today": stats.failed_today,
        "processed_total": stats.processed_total,
        "failed_total": stats.failed_total,
        "rate_per_s": None if rate is None else rate.per_s,
        "rate_basis": None if rate is None else rate.basis,
        "eta_s": None if eta is None else round(eta, 3),
        "paused": stats.paused,
        "paused_by": stats.paused_by,
        "pause": None
        if pause is None
        else {
            "who": pause.who,
            "why": pause.why,
            "class": pause.cls or None,
            "pool": pause.pool or None,
            "set_at": pause.at_ms / 1000 if pause.at_ms else None,
            "reverts_at": pause.until_ms / 1000 if pause.until_ms else None,
            "reverts_in_s": pause.remaining_s(stats.now_ms),
        },
    }


def queue_cells(
    st: Style, stats: QueueStats, cls: str | None, rate: Throughput | None, eta: float | None
) -> list[str]:
    """One row of :data:`HEADER`."""
    name = stats.queue + ("" if stats.registered else st.dim(" (unused)"))
    paused = paused_text(stats)
    if stats.paused:
        paused = st.yellow(paused)
    return [
        name,
        cls or "-",
        str(stats.pending),
        str(stats.active),
        str(stats.scheduled),
        str(stats.retry),
        str(stats.archived),
        str(stats.completed),
        ago(stats.latency_s) if stats.pending else "-",
        f"{stats.processed_today}/{stats.failed_today}",
        rate_text(rate),
        eta_text(stats, eta),
        paused,
    ]


HEADER = (
    "QUEUE",
    "CLASS",
    "PENDING",
    "ACTIVE",
    "SCHEDULED",
    "RETRY",
    "ARCHIVED",
    "COMPLETED",
    "LATENCY",
    "TODAY done/failed",
    "RATE",
    "ETA",
    "PAUSED",
)


def describe_pause(r: PauseResult, cls: str) -> str:
    """What :func:`~gpugate.asynq.pause_queue` did, for ``gpugate pause`` and ``drain``."""
    if r.outcome == "already_paused":
        return (
            f"queue {r.queue} already paused by someone else ({OTHERS}): left as it is; "
            f"it stays paused after {cls}'s pause ends"
        )
    if r.until_ms:
        when = f"until {clock(r.until_ms)} (in {ago((r.until_ms - r.now_ms) / 1000)})"
    else:
        when = f"until `gpugate resume {cls}` (no expiry)"
    if r.outcome == "extended":
        return f"queue {r.queue} stays paused by gpugate, now {when}"
    return f"queue {r.queue} paused {when}: Asynq servers take none of its tasks"


def run_queues(args: argparse.Namespace) -> int:
    """``gpugate queues [--json]``: every Asynq queue, with the pool's classes where known."""
    pool = pool_name(args.pool)
    explicit = asynq_redis_url(args.asynq_redis_url)
    pool_client: Client | None = None
    asynq: Client | None = None
    try:
        try:
            pool_client, url, _ = open_client(args.redis_url)
        except UsageError:
            # No pool Redis configured: Asynq's alone still lists the queues.
            if explicit is None:
                raise
        owners: dict[str, str] = {}
        if pool_client is not None:
            view = read_pool(pool_client, pool, redis_url=url)
            if view.policy is None and view.policy_error is None:
                raise no_policy(
                    pool,
                    "none of its classes feeds a queue",
                    " (with --asynq-redis-url and no pool Redis, `gpugate queues` lists "
                    "Asynq's queues without classes)",
                )
            if view.policy is not None:
                owners = view.policy.queue_classes()
            asynq, asynq_url = open_asynq_client(args.asynq_redis_url, pool_client, url)
        else:
            assert explicit is not None
            asynq, asynq_url = connect(explicit), explicit
        try:
            names = sorted(set(list_queues(asynq)) | set(owners))
            readings = read_queues(asynq, names)
        except redis.ResponseError as exc:
            # The scripts' errors come wrapped; the registry's do not.
            raise BackendError(
                f"cannot read Asynq's queue registry: {exc}; asynq:queues should be a set, "
                "as Asynq writes it"
            ) from exc
        rows = []
        for name, stats in readings.items():
            rate = throughput(stats)
            rows.append((stats, owners.get(name), rate, eta_s(stats, rate)))
    finally:
        if asynq is not None and asynq is not pool_client:
            asynq.close()
        if pool_client is not None:
            pool_client.close()
    if args.json:
        doc = {
            "pool": pool if pool_client is not None else None,
            "asynq_redis": mask_url(asynq_url),
            "queues": [queue_json(*row) for row in rows],
        }
        out(json.dumps(doc, indent=2))
        return 0
    if not rows:
        out(f"no Asynq queues in {mask_url(asynq_url)} (asynq:queues is empty)")
        return 0
    st = Style(False)
    table = [list(HEADER)] + [queue_cells(st, *row) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for r in table:
        out("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    out("  (RATE and ETA at today's average; `gpugate status --watch` measures the rate)")
    return 0
