"""``gpugate metrics``: a standalone Prometheus endpoint for one pool, and its event log.

The endpoint exports the pool's state read from Redis at each scrape
(:class:`~gpugate.metrics.PoolCollector`). Being the one long-running process
that watches the whole pool, it also logs what changed between two scrapes:
leases that expired (their holder died), OOMs, overrides set, cleared or
expired, quarantined GPUs, and changes of the status verdict.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import structlog
from prometheus_client import CollectorRegistry

from ..metrics import MetricsServer, PoolCollector
from ..state._connect import mask_url
from ..state._inspect import PoolView
from ..state._verdict import Verdict, assess
from ._common import open_asynq_client, open_client, pool_name

log = structlog.get_logger(__name__)


class PoolEvents:
    """Logs what changed in a pool between two views (one per scrape)."""

    def __init__(self) -> None:
        self._last: PoolView | None = None
        self._last_verdict: Verdict | None = None
        self._lock = threading.Lock()

    def __call__(self, view: PoolView, verdict: Verdict | None = None) -> None:
        """Compare ``view`` with the previous one and log the differences.

        ``verdict`` is the one the collector exported (with the queues'
        concerns); by default, the view's own.
        """
        verdict = assess(view) if verdict is None else verdict
        with self._lock:
            before, self._last = self._last, view
            previous, self._last_verdict = self._last_verdict, verdict
        p = view.pool
        now = view.now_ms
        if before is None or previous is None:
            for o in view.overrides:
                log.info("override_in_force", pool=p, **_override_fields(o, now))
            log.info("pool_verdict", pool=p, level=verdict.level, verdict=verdict.line)
            return
        for name, c in view.classes.items():
            b = before.classes.get(name)
            if b is None:
                continue
            if c.expired > b.expired:
                log.warning(
                    "leases_expired",
                    pool=p,
                    cls=name,
                    count=c.expired - b.expired,
                    note="their holders stopped renewing (died, hung, or lost Redis)",
                )
            ooms, ooms_before = c.released.get("oom", 0), b.released.get("oom", 0)
            if ooms > ooms_before:
                log.error("jobs_oom", pool=p, cls=name, count=ooms - ooms_before)
        old = {(o.kind, o.cls, o.at_ms): o for o in before.overrides}
        new = {(o.kind, o.cls, o.at_ms): o for o in view.overrides}
        for key in new.keys() - old.keys():
            log.warning("override_set", pool=p, **_override_fields(new[key], now))
        for key in old.keys() - new.keys():
            o = old[key]
            still = any(k[:2] == key[:2] for k in new)
            if still:
                continue  # replaced by a newer one, logged above
            expired = o.until_ms != 0 and o.until_ms <= now
            log.info(
                "override_expired" if expired else "override_cleared",
                pool=p,
                kind=o.kind,
                cls=o.cls,
                who=o.who,
            )
        quarantined_before = {d.uuid for d in before.devices if d.quarantined}
        for d in view.devices:
            if d.quarantined and d.uuid not in quarantined_before:
                log.error("gpu_quarantined", pool=p, device=d.uuid)
        if previous.level != verdict.level:
            log.warning(
                "pool_verdict_changed",
                pool=p,
                level=verdict.level,
                was=previous.level,
                verdict=verdict.line,
            )


def _override_fields(o: object, now_ms: int) -> dict[str, object]:
    from ..state._inspect import OverrideView

    assert isinstance(o, OverrideView)
    left = o.remaining_s(now_ms)
    return {
        "kind": o.kind,
        "cls": o.cls,
        "n": o.n,
        "who": o.who,
        "why": o.why,
        "reverts_in_s": None if left is None else round(left, 3),
    }


def run_metrics(
    redis_url: str | None,
    pool: str | None,
    addr: str,
    port: int,
    asynq_redis_url: str | None = None,
) -> int:
    """Serve ``/metrics`` for the pool until SIGINT or SIGTERM."""
    client, url, _ = open_client(redis_url)
    asynq_client, asynq_url = open_asynq_client(asynq_redis_url, client, url)
    name = pool_name(pool)
    registry = CollectorRegistry()
    registry.register(
        PoolCollector(client, name, redis_url=url, asynq_client=asynq_client, on_read=PoolEvents())
    )
    server = MetricsServer(registry, addr, port)
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info(
        "metrics_serving",
        pool=name,
        redis=mask_url(url),
        asynq_redis=mask_url(asynq_url),
        url=server.url,
    )
    # The one line a script (or a person) waits for; the port matters with --port 0.
    where = " (listening on every interface)" if server.every_interface else ""
    print(f"serving pool {name} on {server.url}{where}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.close()
        if asynq_client is not client:
            asynq_client.close()
        client.close()
    print("stopped", file=sys.stderr, flush=True)
    return 0
