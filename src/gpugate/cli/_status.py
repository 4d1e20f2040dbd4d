"""``gpugate status``: the pool at a glance, as text, JSON, or refreshed in place.

Everything shown is read from the pool in Redis (:mod:`gpugate.state._inspect`),
so it works from any machine that reaches the Redis, GPU or not. The first
line after the header is the verdict (``OK``, ``DEGRADED: …``,
``CRITICAL: …``); then GPUs, classes (with each one's admission answers of
the last 5 minutes), the classes' Asynq queues (when the policy names any),
overrides and workers.

The queues are read from the Redis Asynq uses (``--asynq-redis-url``, by
default the pool's); their concerns join the verdict as in the
``gpugate_pool_health`` metric. ``--watch`` measures each queue's rate
between two frames; a single reading uses today's average.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from .. import __version__, _speedups
from .._exceptions import BackendError
from ..asynq import QueueStats
from ..state._connect import Client, mask_url
from ..state._inspect import (
    RECENT_WINDOWS,
    DecisionCounts,
    PoolView,
    WorkerView,
    read_pool,
)
from ..state._queues import QueuesView, read_pool_queues
from ..state._verdict import Verdict, assess
from ._common import Style, ago, clock, describe_override, size
from ._queues import HEADER as QUEUE_HEADER
from ._queues import queue_cells, queue_json

BAR_WIDTH = 24
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Rates:
    """Per-class admissions and completions per minute, from two views."""

    admitted: dict[str, float]
    done: dict[str, float]


def rates(before: PoolView, after: PoolView) -> Rates | None:
    """Per-minute rates between two reads of the same pool (``None`` if no time passed)."""
    minutes = (after.now_ms - before.now_ms) / 60_000
    if minutes <= 0:
        return None
    admitted: dict[str, float] = {}
    done: dict[str, float] = {}
    for name, c in after.classes.items():
        b = before.classes.get(name)
        if b is None:
            continue
        admitted[name] = max(0, c.admitted - b.admitted) / minutes
        done[name] = max(0, sum(c.released.values()) - sum(b.released.values())) / minutes
    return Rates(admitted, done)


# -- JSON -----------------------------------------------------------------------


def to_json(
    view: PoolView,
    verdict: Verdict,
    embedded: bool,
    rate: Rates | None,
    queues: QueuesView | None = None,
) -> dict[str, Any]:
    """The status as plain data (``--json``); sizes in bytes, times in seconds.

    ``queues`` is there only when the pool's classes have queues; with an
    error reading them, ``queues_error`` says why.
    """
    now = view.now_ms
    doc: dict[str, Any] = {
        "pool": view.pool,
        "redis": view.redis_url,
        "embedded": embedded,
        "time": now / 1000,
        "gpugate": __version__,
        "fast_path": _speedups.IMPLEMENTATION,
        "verdict": {
            "level": verdict.level,
            "line": verdict.line,
            "reasons": list(verdict.reasons),
            "notes": list(verdict.notes),
        },
        "policy": {
            "version": view.policy_version,
            "classes": list(view.policy.classes) if view.policy else [],
            "error": view.policy_error,
        },
        "gpus": [
            {
                "uuid": d.uuid,
                "total_bytes": d.total,
                "used_bytes": d.used,
                "reserved_bytes": d.reserved,
                "unmanaged_bytes": d.unmanaged,
                "free_bytes": d.free,
                "available_bytes": d.available,
                "utilization": d.utilization,
                "fragmentation": d.fragmentation,
                "idle_workers_bytes": d.idle_workers,
                "quarantined": d.quarantined,
                "leases": d.leases,
                "sample_age_s": round(d.sample_age_s(now), 3) if d.sample_ms else None,
            }
            for d in view.devices
        ],
        "classes": {},
        "overrides": [
            {
                "kind": o.kind,
                "class": o.cls,
                "n": o.n,
                "who": o.who,
                "why": o.why,
                "set_at": o.at_ms / 1000 if o.at_ms else None,
                "since": o.since_ms / 1000 if o.since_ms else None,
                "reverts_at": o.until_ms / 1000 if o.until_ms else None,
                "reverts_in_s": o.remaining_s(now),
            }
            for o in view.overrides
        ],
        "workers": [
            {
                "owner": w.owner,
                "host": w.host,
                "pid": w.pid,
                "leases": w.leases,
                "overdue_leases": w.overdue,
                "waiting": w.waiting,
                "last_seen_s_ago": round(max(0, now - w.last_seen_ms) / 1000, 3),
                "alive": w.alive(now, view.ttl_ms),
                "registered": w.registered,
                "info": dict(w.info),
                "idle_memory_bytes": dict(w.idle_memory),
                "policy_mismatch": _policy_mismatch(w, view),
            }
            for w in view.workers
        ],
        "leases": {
            "live": len(view.live_leases()),
            "overdue": sum(1 for lease in view.leases if lease.overdue(now)),
        },
    }
    for name, c in view.classes.items():
        doc["classes"][name] = {
            "priority": c.priority,
            "leases": c.leases,
            "overdue_leases": c.overdue,
            "cap": c.cap,
            "cap_policy": c.cap_policy,
            "rate_per_s": c.rate,
            "burst": c.burst,
            "tokens": None if c.tokens is None else round(c.tokens, 3),
            "reserved_bytes": c.reserved,
            "waiting": c.waiters,
            "waiting_by_reason": dict(c.waiting_by_reason),
            "oldest_wait_s": round(c.oldest_wait_s, 3),
            "admitted_total": c.admitted,
            "released_total": dict(c.released),
            "expired_total": c.expired,
            "paused": c.pause is not None,
            "admitted_per_min": None if rate is None else round(rate.admitted.get(name, 0), 2),
            "done_per_min": None if rate is None else round(rate.done.get(name, 0), 2),
            "recent": {
                f"{minutes}m": _counts_json(c.recent.window(minutes)) for minutes in RECENT_WINDOWS
            },
            "unadmitted_s": round(c.recent.unadmitted_s(), 3),
        }
    if view.policy is not None and view.policy.queue_classes() and queues is not None:
        doc["queues"] = [queue_json(q.stats, q.cls, q.rate, q.eta_s) for q in queues.queues]
        if queues.error is not None:
            doc["queues_error"] = queues.error
    return doc


def _counts_json(w: DecisionCounts) -> dict[str, Any]:
    return {
        "span_s": round(w.span_s, 3),
        "admitted": w.admitted,
        "deferred": w.deferred,
        "rejected": w.rejected,
        "admitted_by_reason": dict(w.reasons.get("admit", {})),
        "deferred_by_reason": dict(w.reasons.get("defer", {})),
        "rejected_by_reason": dict(w.reasons.get("reject", {})),
    }


# -- text -----------------------------------------------------------------------


def _bar(st: Style, used: int, committed: int, total: int) -> str:
    """``[████▒▒░░░░]``: used (NVML), reserved by the gate beyond it, free."""
    if total <= 0:
        return "[" + "?" * BAR_WIDTH + "]"
    u = min(BAR_WIDTH, round(BAR_WIDTH * used / total))
    c = min(BAR_WIDTH, max(u, round(BAR_WIDTH * committed / total)))
    ratio = committed / total
    paint = st.green if ratio < 0.7 else st.yellow if ratio < 0.9 else st.red
    return "[" + paint("█" * u + "▒" * (c - u)) + st.dim("░" * (BAR_WIDTH - c)) + "]"


def _expired_cell(expired: int, by_operator: int, max_duration: int) -> str:
    """Leases whose holder stopped renewing them, and those an operator ended
    (``gpugate leases --expire``) or the class's max duration ended: none was
    released by its holder."""
    cell = str(expired) + (f" +{by_operator} by operator" if by_operator else "")
    return cell + (f" +{max_duration} max_duration" if max_duration else "")


def _table(rows: list[list[str]]) -> list[str]:
    """Left-aligned columns; cells may hold ANSI codes (widths count visible text)."""
    widths = [max(len(_ANSI.sub("", r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [cell + " " * (widths[i] - len(_ANSI.sub("", cell))) for i, cell in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(
    view: PoolView,
    verdict: Verdict,
    st: Style,
    *,
    embedded: bool = False,
    rate: Rates | None = None,
    queues: QueuesView | None = None,
    asynq_url: str | None = None,
) -> str:
    """The status as text, as gpustat would lay it out.

    ``queues``: the QUEUES section, left out when the pool's classes have no
    queues; ``asynq_url`` is named there when it is not the pool's Redis.
    """
    now = view.now_ms
    lines: list[str] = []
    where = "embedded Redis (this host only)" if embedded else view.redis_url
    policy = f"policy {view.policy_version}" if view.policy_version else st.yellow("no policy")
    lines.append(
        st.bold(f"gpugate {__version__}")
        + f"  pool {st.bold(view.pool)}  {where}  {policy}"
        + f"  fast path {_speedups.IMPLEMENTATION}  {clock(now)}"
    )
    lines.append(st.level(verdict.level, st.bold(verdict.line)))
    for note in verdict.notes:
        lines.append(st.dim(f"  note: {note}"))

    lines.append("")
    if view.devices:
        rows = [
            [
                st.cyan("GPU"),
                st.cyan("MEMORY"),
                st.cyan("USED"),
                st.cyan("GATE"),
                st.cyan("FREE"),
                st.cyan("TOTAL"),
                st.cyan("UTIL"),
                st.cyan("FRAG"),
                st.cyan("QUAR"),
                st.cyan("LEASES"),
                st.cyan("SAMPLE"),
            ]
        ]
        for d in view.devices:
            if not d.sample_ms:
                rows.append(
                    [
                        d.uuid,
                        "[" + " " * BAR_WIDTH + "]",
                        "?",
                        size(d.reserved),
                        "?",
                        "?",
                        "-",
                        "-",
                        "-",
                        str(d.leases),
                        st.yellow("never"),
                    ]
                )
                continue
            age = d.sample_age_s(now)
            age_text = f"{ago(age)} ago"
            rows.append(
                [
                    d.uuid,
                    _bar(st, d.used, d.committed, d.total),
                    size(d.used),
                    size(d.reserved),
                    size(d.available),
                    size(d.total),
                    "-" if d.utilization is None else f"{d.utilization:.0%}",
                    "-" if d.fragmentation is None else f"{d.fragmentation:.0%}",
                    "-" if d.quarantined is None else ("yes" if d.quarantined else "no"),
                    str(d.leases),
                    age_text if age < 60 else st.yellow(age_text),
                ]
            )
        lines += _table(rows)
        lines.append(
            st.dim(
                "  █ used (driver)  ▒ reserved by the gate, not yet in use  ░ free"
                "  · GATE = held for leases · FREE = what a new job could get"
                "  · UTIL/FRAG/QUAR: '-' = unknown (no heartbeat from its host, or not reported)"
            )
        )
    else:
        lines.append(st.yellow("no GPU has sent a sample to this pool"))

    lines.append("")
    if view.classes:
        header = [
            "CLASS",
            "PRIO",
            "LEASES",
            "CAP",
            "TOKENS",
            "WAITING",
            "OLDEST",
            "ADMITTED",
            "ENDED ok/err/oom/drop",
            "EXPIRED",
        ]
        if rate is not None:
            header += ["ADM/MIN", "DONE/MIN"]
        rows = [[st.cyan(h) for h in header]]
        for name, c in view.classes.items():
            cap = "-" if c.cap is None else str(c.cap)
            if c.cap_override is not None and c.cap != c.cap_policy:
                cap = st.yellow(
                    f"{cap} (policy {c.cap_policy if c.cap_policy is not None else '-'})"
                )
            leases = str(c.leases) + (st.yellow(f" +{c.overdue} overdue") if c.overdue else "")
            tokens = "-" if c.tokens is None else f"{c.tokens:.1f}/{c.burst}"
            waiting = str(c.waiters)
            if c.waiting_by_reason:
                waiting += (
                    " (" + ", ".join(f"{r} {n}" for r, n in c.waiting_by_reason.items()) + ")"
                )
            name_cell = name + (st.yellow(" PAUSED") if c.pause is not None else "")
            oldest = ago(c.oldest_wait_s) if c.waiters else "-"
            ended = "/".join(str(c.released.get(k, 0)) for k in ("ok", "error", "oom", "dropped"))
            row = [
                name_cell,
                str(c.priority),
                leases,
                cap,
                tokens,
                waiting,
                oldest,
                str(c.admitted),
                ended,
                _expired_cell(
                    c.expired,
                    c.released.get("expired_by_operator", 0),
                    c.released.get("max_duration", 0),
                ),
            ]
            if rate is not None:
                row += [f"{rate.admitted.get(name, 0):.1f}", f"{rate.done.get(name, 0):.1f}"]
            rows.append(row)
        lines += _table(rows)
        recent = []
        for name, c in view.classes.items():
            last = c.recent.last_5m
            text = last.describe()
            if last.rejected or (last.deferred and not last.admitted):
                text = st.yellow(text)
            elif not last.total:
                text = st.dim(text)
            recent.append([name, f"last 5m: {text}"])
        lines += ["  " + line for line in _table(recent)]
        lines.append(
            st.dim(
                "  (the admission script's answers, counted by minute in Redis;"
                " DEFERs of a worker's local pre-check are not counted)"
            )
        )

    if view.policy is not None and view.policy.queue_classes() and queues is not None:
        lines.append("")
        lines += _queue_lines(view, queues, st, asynq_url)

    lines.append("")
    lines.append(st.cyan("OVERRIDES"))
    if view.overrides:
        for o in view.overrides:
            lines.append("  " + st.yellow(describe_override(o, now)))
    else:
        lines.append("  none")

    lines.append("")
    lines.append(
        st.cyan("WORKERS") + st.dim("  (heartbeats in the registry, or leases and waiters)")
    )
    if view.workers:
        head = (
            *("HOST", "PID", "LEASES", "WAITING", "LAST SEEN", ""),
            *("VERSION", "FAST PATH", "POLICY"),
        )
        rows = [[st.cyan(h) for h in head]]
        for w in view.workers:
            seen = max(0.0, (now - w.last_seen_ms) / 1000)
            alive = w.alive(now, view.ttl_ms)
            state = st.green("alive") if alive else st.red("silent")
            leases = str(w.leases) + (st.red(f" +{w.overdue} overdue") if w.overdue else "")
            policy = str(w.info.get("policy_version") or "pool's")
            if _policy_mismatch(w, view):
                policy = st.yellow(policy + " (differs from the pool's)")
            rows.append(
                [
                    w.host,
                    str(w.pid or "?"),
                    leases,
                    str(w.waiting),
                    f"{ago(seen)} ago",
                    state,
                    str(w.info.get("version", "-")),
                    str(w.info.get("fastpath", "-")),
                    policy if w.registered else "-",
                ]
            )
        lines += ["  " + line for line in _table(rows)]
    else:
        lines.append("  none registered, holding a lease or waiting")
    return "\n".join(lines)


def _queue_lines(view: PoolView, queues: QueuesView, st: Style, asynq_url: str | None) -> list[str]:
    shown = mask_url(asynq_url) if asynq_url else view.redis_url
    where = "" if shown == view.redis_url else f" in {shown}"
    lines = [st.cyan("QUEUES") + st.dim(f"  (Asynq{where}; backlog = pending + active)")]
    if queues.error is not None:
        lines.append("  " + st.yellow(f"cannot read them: {queues.error}"))
        return lines
    rows = [[st.cyan(h) for h in QUEUE_HEADER]]
    for q in queues.queues:
        rows.append(queue_cells(st, q.stats, q.cls, q.rate, q.eta_s))
    lines += ["  " + line for line in _table(rows)]
    return lines


def _policy_mismatch(w: WorkerView, view: PoolView) -> bool:
    """A registered worker started with a policy that is not the pool's."""
    mine = w.info.get("policy_version")
    return bool(mine) and view.policy_version is not None and mine != view.policy_version


# -- the command ------------------------------------------------------------------


def run_status(
    client: Client,
    pool: str,
    url: str,
    *,
    embedded: bool,
    as_json: bool,
    watch: float | None,
    color: str,
    stream: IO[str] | None = None,
    frames: int | None = None,
    asynq: Client | None = None,
    asynq_url: str | None = None,
    asynq_now_ms: Callable[[], int] | None = None,
) -> int:
    """Print the status once, or every ``watch`` seconds until interrupted (or ``frames``).

    ``asynq`` reads the Asynq queues of the pool's classes (default:
    ``client``); ``asynq_now_ms`` injects the clock of those reads (tests).
    Each frame measures the queues' rate against the previous frame's reading.
    A watched frame that cannot read the pool is a line saying why, with
    ``as_json`` a document ``{pool, redis, time, error}``, and the watch goes on.
    """
    stream = stream or sys.stdout
    st = Style.for_stream(stream, color)
    previous: PoolView | None = None
    readings: dict[str, QueueStats] = {}
    shown = 0
    try:
        while True:
            try:
                view = read_pool(client, pool, redis_url=url)
            except BackendError as exc:
                if not watch:
                    raise
                # Watching through an incident: say so, and read again next time.
                # With --json the frame is a JSON document too: a script reading
                # stdout (jq) would stop at a text line, and with nothing there
                # it could not tell an unreadable pool from a stalled watch.
                if as_json:
                    failed = {
                        "pool": pool,
                        "redis": mask_url(url) if url else "",
                        "time": round(time.time(), 3),
                        "error": f"cannot read the pool: {exc}",
                    }
                    print(json.dumps(failed), file=stream, flush=True)
                else:
                    print(
                        f"{time.strftime('%H:%M:%S')}  cannot read the pool: {exc}",
                        file=stream,
                        flush=True,
                    )
                shown += 1
                if frames is not None and shown >= frames:
                    return 2
                time.sleep(watch)
                continue
            queues = read_pool_queues(
                client if asynq is None else asynq,
                view.policy,
                previous=readings,
                now_ms=None if asynq_now_ms is None else asynq_now_ms(),
            )
            if queues.error is None:
                readings = queues.readings()
            verdict = assess(view, extra=queues.concerns)
            rate = rates(previous, view) if previous is not None else None
            if as_json:
                doc = to_json(view, verdict, embedded, rate, queues)
                print(json.dumps(doc, indent=None if watch else 2), file=stream, flush=True)
            else:
                text = render(
                    view,
                    verdict,
                    st,
                    embedded=embedded,
                    rate=rate,
                    queues=queues,
                    asynq_url=asynq_url,
                )
                if watch and stream.isatty():
                    stream.write("\x1b[H\x1b[2J")
                print(text, file=stream, flush=True)
                if watch and not stream.isatty():
                    print("", file=stream, flush=True)
            shown += 1
            if not watch or (frames is not None and shown >= frames):
                return 0
            previous = view
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
