"""Pool state in Redis, exported at scrape time by a custom collector.

:class:`PoolCollector` reads one pool with :func:`gpugate.state._inspect.read_pool`
on every scrape (two pipelined round trips, no writes) and yields gauges and
counters labelled ``pool`` and, where they apply, ``class``, ``device``,
``reason``, ``outcome`` or ``kind`` — never lease, job or worker ids. When
Redis cannot be read, a scrape still answers: ``gpugate_pool_up`` is 0 and
the pool's other series are absent (Prometheus marks them stale), which is
what alerting on ``gpugate_pool_up == 0`` expects.

The Asynq queues of the pool's classes (their policy's ``queues``) are read
at each scrape too, from the Redis Asynq uses (``asynq_client``, by default
the pool's), into ``gpugate_queue_*`` series labelled ``pool`` and ``queue``
(and ``state`` for task counts). A failure to read them is logged and drops
only those series (``gpugate_queues_up`` is then 0); the pool's series stay.
Their verdict lines count in ``gpugate_pool_health`` as in ``gpugate status``.

Every worker of a pool sees the same Redis, so export these from one place
(``gpugate metrics``, or one chosen worker): a worker's own decisions,
latencies and lease outcomes are in :mod:`gpugate.metrics._instruments`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import structlog
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .._exceptions import BackendError
from .._logging import Throttle
from ..asynq import QueueStats
from ..state._connect import Client
from ..state._inspect import PoolView, read_pool
from ..state._queues import QueuesView, read_pool_queues
from ..state._verdict import Verdict, assess
from ._instruments import JOB_OUTCOMES

__all__ = ["PoolCollector"]

log = structlog.get_logger(__name__)

# The job outcomes a pool counts: the releases', an operator's expiry, and the
# ends of leases at their class's max duration.
_OUTCOMES = (*JOB_OUTCOMES, "expired_by_operator", "max_duration")


class PoolCollector(Collector):
    """Exports pool ``pool``'s state, read from Redis at each scrape.

    ``client`` is a gpugate Redis client (:func:`gpugate.state._connect.connect`);
    ``redis_url`` is used (masked) in log lines only. ``asynq_client`` reads
    the Asynq queues of the pool's classes (default: ``client``). ``on_read``
    is called with each view read and its verdict (the ``gpugate metrics``
    command logs pool events from it). ``now_ms`` and ``asynq_now_ms`` inject
    the scripts' clocks of the pool and of the queue reads (tests).
    """

    def __init__(
        self,
        client: Client,
        pool: str,
        *,
        redis_url: str = "",
        asynq_client: Client | None = None,
        on_read: Callable[[PoolView, Verdict], None] | None = None,
        now_ms: Callable[[], int] | None = None,
        asynq_now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.client = client
        self.pool = pool
        self.redis_url = redis_url
        self.asynq_client = client if asynq_client is None else asynq_client
        self._on_read = on_read
        self._now_ms = now_ms
        self._asynq_now_ms = asynq_now_ms
        self._throttle = Throttle(60.0)
        self._lock = threading.Lock()
        self.last_view: PoolView | None = None
        # The previous scrape's queue readings: the rate is measured against them.
        self._queue_readings: dict[str, QueueStats] = {}

    def describe(self) -> list[Metric]:
        """Nothing: registering the collector must not read Redis."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Read the pool and yield its metric families."""
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "gpugate_pool_up",
            "1 if the pool's state could be read from Redis at this scrape, else 0.",
            labels=["pool"],
        )
        duration = GaugeMetricFamily(
            "gpugate_pool_read_duration_seconds",
            "Time to read the pool's state from Redis at this scrape.",
            labels=["pool"],
        )
        try:
            view = read_pool(
                self.client,
                self.pool,
                redis_url=self.redis_url,
                now_ms=self._now_ms() if self._now_ms is not None else None,
            )
        except BackendError as exc:
            dropped = self._throttle.allow("down")
            if dropped is not None:
                log.warning(
                    "pool_read_failed",
                    pool=self.pool,
                    error=str(exc),
                    similar_events_suppressed=dropped,
                )
            up.add_metric([self.pool], 0)
            duration.add_metric([self.pool], time.perf_counter() - started)
            yield up
            yield duration
            return
        queues = self._read_queues(view)
        verdict = assess(view, extra=queues.concerns)
        with self._lock:
            self.last_view = view
        if self._on_read is not None:
            try:
                self._on_read(view, verdict)
            except Exception:  # a logging hook must not break the scrape
                log.exception("pool_event_hook_failed", pool=self.pool)
        up.add_metric([self.pool], 1)
        yield up
        yield from _families(view, verdict)
        yield from _queue_families(view, queues)
        duration.add_metric([self.pool], time.perf_counter() - started)
        yield duration

    def _read_queues(self, view: PoolView) -> QueuesView:
        with self._lock:
            previous = dict(self._queue_readings)
        queues = read_pool_queues(
            self.asynq_client,
            view.policy,
            previous=previous,
            now_ms=self._asynq_now_ms() if self._asynq_now_ms is not None else None,
        )
        if queues.error is not None:
            dropped = self._throttle.allow("asynq")
            if dropped is not None:
                log.warning(
                    "asynq_read_failed",
                    pool=self.pool,
                    error=queues.error,
                    similar_events_suppressed=dropped,
                )
            return queues
        with self._lock:
            self._queue_readings = queues.readings()
        return queues


def _families(view: PoolView, verdict: Verdict) -> Iterator[Metric]:
    p = view.pool
    now = view.now_ms

    info = InfoMetricFamily(
        "gpugate_pool_policy", "The policy version the pool enforces.", labels=["pool"]
    )
    if view.policy_version:
        info.add_metric([p], {"version": view.policy_version})
    yield info

    health = GaugeMetricFamily(
        "gpugate_pool_health",
        "The status verdict: 0 OK, 1 DEGRADED, 2 CRITICAL, -1 UNKNOWN (no policy).",
        labels=["pool"],
    )
    health.add_metric([p], verdict.severity)
    yield health

    gpus = GaugeMetricFamily(
        "gpugate_gpus",
        "Devices that reported to the pool lately: a memory sample from a decision or from "
        "their host's heartbeat within 2 minutes, or one lease TTL if longer.",
        labels=["pool"],
    )
    gpus.add_metric([p], len(view.reporting_devices()))
    yield gpus

    dev_labels = ["pool", "device"]
    g_total = GaugeMetricFamily(
        "gpugate_gpu_memory_total_bytes",
        "Device memory, as last sampled, while the device reports (as gpugate_gpus counts).",
        labels=dev_labels,
    )
    g_used = GaugeMetricFamily(
        "gpugate_gpu_memory_used_bytes",
        "Device memory in use (NVML), as last sampled, while the device reports.",
        labels=dev_labels,
    )
    g_free = GaugeMetricFamily(
        "gpugate_gpu_memory_free_bytes",
        "Device memory not in use (total - used), as last sampled, while the device reports.",
        labels=dev_labels,
    )
    g_reserved = GaugeMetricFamily(
        "gpugate_gpu_memory_reserved_bytes",
        "Memory the gate holds for leases on the device: sum of max(estimate, actual).",
        labels=dev_labels,
    )
    g_unmanaged = GaugeMetricFamily(
        "gpugate_gpu_memory_unmanaged_bytes",
        "Memory in use beyond the leases' measured actuals (notebooks, contexts, others).",
        labels=dev_labels,
    )
    g_avail = GaugeMetricFamily(
        "gpugate_gpu_memory_available_bytes",
        "Memory a new job could get: total - max(used, unmanaged + reserved).",
        labels=dev_labels,
    )
    g_age = GaugeMetricFamily(
        "gpugate_gpu_sample_age_seconds",
        "Age of the device's freshest memory sample in the pool (also once it stopped reporting).",
        labels=dev_labels,
    )
    g_leases = GaugeMetricFamily(
        "gpugate_gpu_leases", "Live leases on the device.", labels=dev_labels
    )
    g_util = GaugeMetricFamily(
        "gpugate_gpu_utilization_ratio",
        "Device utilisation, 0 to 1 (absent while samples do not carry it).",
        labels=dev_labels,
    )
    g_frag = GaugeMetricFamily(
        "gpugate_gpu_fragmentation_ratio",
        "Memory held by allocators but unused, over total (absent while not measured).",
        labels=dev_labels,
    )
    g_idle = GaugeMetricFamily(
        "gpugate_gpu_memory_idle_workers_bytes",
        "Memory idle registered workers hold above their warm baseline (part of fragmentation).",
        labels=dev_labels,
    )
    g_quar = GaugeMetricFamily(
        "gpugate_gpu_quarantined",
        "1 if the device is quarantined (lost: nothing is admitted there), else 0; "
        "absent while no gate's heartbeat has reported on it.",
        labels=dev_labels,
    )
    # A device's measured figures are exported while it reports, as
    # gpugate_gpus counts it: a host that died leaves its last sample behind
    # (97 % used, say), which must not read as current to GpugateHighGPUMemory
    # and the dashboard. The sample stays until the heartbeat of a living gate
    # removes it, 10 lease TTLs on (renew_leases.lua), or for good with none.
    reporting = {d.uuid for d in view.reporting_devices()}
    for d in view.devices:
        labels = [p, d.uuid]
        # The pool's own records and its hosts' reports hold for every device it
        # knows, sampled or not: a GPU lost before its worker started (the usual
        # case after a pod restart) never sent a sample, and is quarantined.
        g_reserved.add_metric(labels, d.reserved)
        g_leases.add_metric(labels, d.leases)
        if d.quarantined is not None:
            g_quar.add_metric(labels, int(d.quarantined))
        if d.sample_ms:
            g_age.add_metric(labels, d.sample_age_s(now))
        if d.uuid not in reporting:
            continue
        g_total.add_metric(labels, d.total)
        g_used.add_metric(labels, d.used)
        g_free.add_metric(labels, d.free)
        g_unmanaged.add_metric(labels, d.unmanaged)
        g_avail.add_metric(labels, d.available)
        if d.utilization is not None:
            g_util.add_metric(labels, d.utilization)
        if d.fragmentation is not None:
            g_frag.add_metric(labels, d.fragmentation)
        g_idle.add_metric(labels, d.idle_workers)
    yield from (g_total, g_used, g_free, g_reserved, g_unmanaged, g_avail, g_age, g_leases)
    yield from (g_util, g_frag, g_idle, g_quar)

    cls_labels = ["pool", "class"]
    leases = GaugeMetricFamily("gpugate_leases", "Live leases of the class.", labels=cls_labels)
    overdue = GaugeMetricFamily(
        "gpugate_leases_overdue",
        "Leases past their expiry, not reaped yet: their holders stopped renewing them.",
        labels=cls_labels,
    )
    reserved = GaugeMetricFamily(
        "gpugate_class_reserved_bytes",
        "Memory the gate holds for the class's live leases.",
        labels=cls_labels,
    )
    waiters = GaugeMetricFamily(
        "gpugate_waiters",
        "Deferred requests still waiting, by the reason of their last DEFER.",
        labels=["pool", "class", "reason"],
    )
    oldest = GaugeMetricFamily(
        "gpugate_waiter_oldest_seconds",
        "How long the class's longest-waiting request has waited (0 when none waits).",
        labels=cls_labels,
    )
    tokens = GaugeMetricFamily(
        "gpugate_tokens", "Tokens in the class's bucket (classes with a rate).", labels=cls_labels
    )
    cap = GaugeMetricFamily(
        "gpugate_class_cap",
        "The class's pool-wide cap in force: the policy's, lowered by a runtime cap.",
        labels=cls_labels,
    )
    priority = GaugeMetricFamily(
        "gpugate_class_priority", "The class's priority.", labels=cls_labels
    )
    admitted = CounterMetricFamily(
        "gpugate_pool_admissions",
        "GPU leases granted to the class, pool-wide (live + released + expired).",
        labels=cls_labels,
    )
    released = CounterMetricFamily(
        "gpugate_pool_lease_releases",
        "Leases ended by their holder, an operator (expired_by_operator) or their class's "
        "max duration (max_duration), pool-wide, by outcome.",
        labels=["pool", "class", "outcome"],
    )
    expired = CounterMetricFamily(
        "gpugate_pool_leases_expired",
        "Leases that expired because their holder stopped renewing them, pool-wide "
        "(not those their class's max duration ended).",
        labels=cls_labels,
    )
    ooms = CounterMetricFamily(
        "gpugate_pool_ooms",
        "Jobs whose lease ended with a CUDA out-of-memory error, pool-wide.",
        labels=cls_labels,
    )
    decisions = GaugeMetricFamily(
        "gpugate_pool_decisions",
        "Answers of the admission script in the last 5 minutes (the current minute and the "
        "5 before it), pool-wide, read from Redis: a windowed count, not a counter. "
        "For rates use each worker's gpugate_decisions_total.",
        labels=["pool", "class", "outcome", "reason"],
    )
    for name, c in view.classes.items():
        labels = [p, name]
        # Every (outcome, reason) answered in the 15 minutes kept, so that a
        # series falls to 0 before it disappears.
        last_5m = c.recent.last_5m.reasons
        for outcome, per in c.recent.last_15m.reasons.items():
            for reason in sorted(per):
                decisions.add_metric(
                    [p, name, outcome, reason], last_5m.get(outcome, {}).get(reason, 0)
                )
        leases.add_metric(labels, c.leases)
        overdue.add_metric(labels, c.overdue)
        reserved.add_metric(labels, c.reserved)
        for reason, n in c.waiting_by_reason.items():
            waiters.add_metric([p, name, reason], n)
        oldest.add_metric(labels, c.oldest_wait_s)
        if c.tokens is not None:
            tokens.add_metric(labels, c.tokens)
        if c.cap is not None:
            cap.add_metric(labels, c.cap)
        priority.add_metric(labels, c.priority)
        admitted.add_metric(labels, c.admitted)
        for outcome in sorted(set(_OUTCOMES) | set(c.released)):
            released.add_metric([p, name, outcome], c.released.get(outcome, 0))
        expired.add_metric(labels, c.expired)
        ooms.add_metric(labels, c.released.get("oom", 0))
    yield from (leases, overdue, reserved, waiters, oldest, tokens, cap, priority, decisions)
    yield from (admitted, released, expired, ooms)

    ovr_labels = ["pool", "class", "kind"]
    active = GaugeMetricFamily(
        "gpugate_override_active",
        "1 for each runtime pause or cap in force (kind pause|cap).",
        labels=ovr_labels,
    )
    set_at = GaugeMetricFamily(
        "gpugate_override_set_timestamp_seconds",
        "When the override in force was last set or changed (Unix time).",
        labels=ovr_labels,
    )
    since = GaugeMetricFamily(
        "gpugate_override_since_timestamp_seconds",
        "When the override came into force (Unix time): kept when it is set again while "
        "in force (a pause extended, a cap changed); afresh after it was lifted or expired.",
        labels=ovr_labels,
    )
    until = GaugeMetricFamily(
        "gpugate_override_expiry_timestamp_seconds",
        "When the override reverts by itself (Unix time); 0 when it has no expiry.",
        labels=ovr_labels,
    )
    for o in view.overrides:
        labels = [p, o.cls, o.kind]
        active.add_metric(labels, 1)
        set_at.add_metric(labels, o.at_ms / 1000)
        since.add_metric(labels, (o.since_ms or o.at_ms) / 1000)
        until.add_metric(labels, o.until_ms / 1000)
    yield from (active, set_at, since, until)

    workers = GaugeMetricFamily(
        "gpugate_workers",
        "Processes holding a lease or waiting, by whether they renewed within one lease TTL.",
        labels=["pool", "state"],
    )
    ttl = view.ttl_ms
    alive = sum(1 for w in view.workers if w.alive(now, ttl))
    workers.add_metric([p, "alive"], alive)
    workers.add_metric([p, "silent"], len(view.workers) - alive)
    yield workers


def _queue_families(view: PoolView, queues: QueuesView) -> Iterator[Metric]:
    """The Asynq queues of the pool's classes; nothing when no class has queues."""
    if view.policy is None or not view.policy.queue_classes():
        return
    p = view.pool
    up = GaugeMetricFamily(
        "gpugate_queues_up",
        "1 if the Asynq queues of the pool's classes could be read at this scrape, else 0 "
        "(the other gpugate_queue_* series are then absent).",
        labels=["pool"],
    )
    up.add_metric([p], 0 if queues.error is not None else 1)
    yield up
    if queues.error is not None:
        return
    q_labels = ["pool", "queue"]
    tasks = GaugeMetricFamily(
        "gpugate_queue_tasks",
        "Tasks in the Asynq queue, by state (pending, active, scheduled, retry, archived, "
        "completed, aggregating), as Asynq's inspector counts them.",
        labels=["pool", "queue", "state"],
    )
    latency = GaugeMetricFamily(
        "gpugate_queue_latency_seconds",
        "Age of the queue's oldest pending task (0 with none), by Redis time.",
        labels=q_labels,
    )
    paused = GaugeMetricFamily(
        "gpugate_queue_paused",
        "1 if the queue is paused (by gpugate or with Asynq's tools), else 0.",
        labels=q_labels,
    )
    eta = GaugeMetricFamily(
        "gpugate_queue_eta_seconds",
        "Time to work off the backlog (pending + active) at the recent rate; 0 with none; "
        "absent when the queue will not drain by itself (paused, nothing processed).",
        labels=q_labels,
    )
    processed = CounterMetricFamily(
        "gpugate_queue_processed",
        "Task attempts the queue's Asynq servers finished, failures included "
        "(Asynq's all-time counter).",
        labels=q_labels,
    )
    failed = CounterMetricFamily(
        "gpugate_queue_failed",
        "Task attempts that failed (Asynq's all-time counter).",
        labels=q_labels,
    )
    for q in queues.queues:
        s = q.stats
        labels = [p, q.queue]
        for state, n in s.by_state().items():
            tasks.add_metric([p, q.queue, state], n)
        latency.add_metric(labels, s.latency_s)
        paused.add_metric(labels, int(s.paused))
        if q.eta_s is not None:
            eta.add_metric(labels, q.eta_s)
        processed.add_metric(labels, s.processed_total)
        failed.add_metric(labels, s.failed_total)
    yield from (tasks, latency, paused, eta, processed, failed)
