"""The emergency commands: ``pause``, ``resume``, ``cap``, ``uncap``, ``drain``, ``leases``.

Each override goes through :class:`~gpugate.Gate` (the ``set_override``
script), records who set it and why, and prints what is now in force and
when it reverts. ``pause`` and ``drain`` also pause the classes' Asynq
queues (their policy's ``queues``) the Asynq way, with the same expiry;
``resume`` unpauses those of them whose pause is gpugate's.

``leases --expire ID`` ends one lease the way a release does (outcome
``expired_by_operator``): its memory keeps counting until a later sample,
and its holder finds it gone at its next heartbeat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
import structlog

from .._exceptions import BackendError, UsageError
from ..asynq import UnpauseResult, pause_queue, read_queues, unpause_queue
from ..state._connect import Client
from ..state._inspect import LeaseView, PoolView, read_pool
from ..state._keys import PoolKeys
from ..state._scripts import Scripts
from ._common import (
    ago,
    describe_override,
    no_policy,
    open_asynq_client,
    open_client,
    open_gate,
    out,
    overrides_from_reply,
    pool_name,
    size,
    who_am_i,
)
from ._queues import describe_pause

if TYPE_CHECKING:
    from ..admission import Gate

log = structlog.get_logger(__name__)


def _print_in_force(reply: dict[str, Any], classes: list[str], kind: str) -> None:
    found = [o for o in overrides_from_reply(reply) if o.cls in classes and o.kind == kind]
    for o in found:
        # The reply carries no clock; the override was set just now.
        out(describe_override(o, o.at_ms))


@contextlib.contextmanager
def _asynq(gate: Gate, explicit_url: str | None, needed: bool) -> Iterator[Client | None]:
    """A client of the Redis Asynq uses (the pool's unless one is set), closed after.

    ``None`` when no queue is involved: nothing is connected then.
    """
    if not needed:
        yield None
        return
    client, _ = open_asynq_client(explicit_url, gate.client, gate.redis_url)
    try:
        yield client
    finally:
        if client is not gate.client:
            client.close()


def _pause_classes(
    gate: Gate,
    classes: list[str],
    args: argparse.Namespace,
    *,
    reason: str,
) -> int:
    """Pause ``classes`` and their Asynq queues with the same expiry; print what is in force.

    A queue that cannot be paused (Asynq's Redis unreachable) is one line on
    stderr and exit status 2; the class pauses stand.
    """
    policy = gate.effective_policy
    who = who_am_i(args.who)
    reply: dict[str, Any] = {}
    for cls in classes:
        reply = gate.pause(cls, duration=args.duration, reason=reason, who=who)
    in_force = {o.cls: o for o in overrides_from_reply(reply) if o.kind == "pause"}
    queues = {cls: policy.class_policy(cls).queues for cls in classes}
    failed = 0
    with _asynq(gate, args.asynq_redis_url, any(queues.values())) as asynq:
        for cls in classes:
            o = in_force.get(cls)
            if o is not None:
                # The reply carries no clock; the override was set just now.
                out(describe_override(o, o.at_ms))
            for queue in queues[cls]:
                assert asynq is not None
                try:
                    result = pause_queue(
                        asynq,
                        queue,
                        duration=args.duration,
                        who=who,
                        reason=reason,
                        pool=gate.pool,
                        cls=cls,
                    )
                except BackendError as exc:
                    failed += 1
                    out(f"gpugate: error: queue {queue} of {cls} not paused: {exc}", sys.stderr)
                    continue
                out("  " + describe_pause(result, cls))
    return 2 if failed else 0


def run_pause(args: argparse.Namespace) -> int:
    """``gpugate pause CLASS... | --all``: the classes, and their Asynq queues."""
    with open_gate(args.redis_url, args.pool) as gate:
        policy = gate.effective_policy
        if args.all and args.classes:
            raise UsageError("name classes to pause, or pass --all, not both")
        classes = list(policy.classes) if args.all else _classes(policy, args.classes, "pause")
        return _pause_classes(gate, classes, args, reason=args.reason)


def run_drain(args: argparse.Namespace) -> int:
    """``gpugate drain [CLASS]``: pause every class but the highest, or one class."""
    with open_gate(args.redis_url, args.pool) as gate:
        policy = gate.effective_policy
        if args.cls is not None:
            policy.class_policy(args.cls)
            classes = [args.cls]
        else:
            top = policy.highest_classes
            classes = [name for name in policy.classes if name not in top]
            if not classes:
                what = f"one class ({top[0]})" if len(top) == 1 else "only classes of one priority"
                raise UsageError(
                    f"pool {gate.pool!r} has {what}; drain keeps the highest-priority "
                    "classes running, so there is nothing to drain; "
                    "use `gpugate pause --all` to stop everything"
                )
        status = _pause_classes(gate, classes, args, reason=args.reason or "drain")
        if args.cls is None:
            if len(top) == 1:
                out(f"{top[0]} (the highest class) keeps running")
            else:
                out(f"{', '.join(top)} (the highest priority, {len(top)} classes) keep running")
    return status


def run_resume(args: argparse.Namespace) -> int:
    """``gpugate resume [CLASS...]``: lift pauses (all of them without a class).

    The classes' Asynq queues are unpaused too, but only where the pause is
    gpugate's: a queue paused with AsynqMon or the asynq CLI stays paused.
    Without a class, a class whose queues gpugate paused for this pool is
    resumed too, even when the class itself is no longer paused.
    """
    with open_gate(args.redis_url, args.pool) as gate:
        policy = gate.effective_policy
        reply = gate.overrides()
        paused = sorted(overrides_from_reply_classes(reply, "pause"))
        owners = policy.queue_classes()
        failed = 0
        with _asynq(gate, args.asynq_redis_url, bool(owners)) as asynq:
            if args.classes:
                classes = _classes(policy, args.classes, "resume")
            else:
                classes = paused
                if asynq is not None:
                    try:
                        readings = read_queues(asynq, list(owners))
                    except (BackendError, redis.RedisError) as exc:
                        failed += 1
                        out(f"gpugate: error: cannot read the classes' queues: {exc}", sys.stderr)
                        readings = {}
                    held = {
                        owners[q]
                        for q, s in readings.items()
                        if s.pause is not None and s.pause.pool == gate.pool
                    }
                    classes = paused + [c for c in policy.classes if c in held - set(paused)]
            if not classes:
                out(f"nothing is paused in pool {gate.pool}")
                return 2 if failed else 0
            who = who_am_i(args.who)
            for cls in classes:
                reply = gate.resume(cls, reason=args.reason, who=who)
                state = "resumed" if cls in paused else "was not paused"
                out(f"{cls} {state}")
                cp = policy.classes.get(cls)  # None: a pause left from a dropped class
                for queue in cp.queues if cp is not None else ():
                    assert asynq is not None
                    try:
                        result = unpause_queue(asynq, queue, only_own=True)
                    except BackendError as exc:
                        failed += 1
                        out(
                            f"gpugate: error: queue {queue} of {cls} not resumed: {exc}",
                            sys.stderr,
                        )
                        continue
                    out("  " + _describe_unpause(result))
        caps = [o for o in overrides_from_reply(reply) if o.kind == "cap"]
        for o in caps:
            out(f"still in force: {describe_override(o, o.at_ms)}")
    return 2 if failed else 0


def _describe_unpause(r: UnpauseResult) -> str:
    if r.outcome == "unpaused":
        return f"queue {r.queue} resumed: Asynq servers take its tasks again"
    if r.outcome == "not_ours":
        return (
            f"queue {r.queue} stays paused: not gpugate's pause "
            "(AsynqMon or asynq CLI; resume it there)"
        )
    return f"queue {r.queue} was not paused"


def overrides_from_reply_classes(reply: dict[str, Any], kind: str) -> list[str]:
    """The classes with an override of ``kind`` in ``set_override``'s reply (or ``ovr``)."""
    return [o.cls for o in overrides_from_reply(reply) if o.kind == kind]


def run_cap(args: argparse.Namespace) -> int:
    """``gpugate cap CLASS N``: lower a class's pool-wide cap for a while."""
    with open_gate(args.redis_url, args.pool) as gate:
        cp = gate.effective_policy.class_policy(args.cls)
        reply = gate.cap(
            args.cls, args.n, duration=args.duration, reason=args.reason, who=who_am_i(args.who)
        )
        _print_in_force(reply, [args.cls], "cap")
        if not cp.lowered_by(args.n):
            out(
                f"note: the policy's cap of {args.cls} is {cp.max_concurrent}; a runtime cap "
                "only lowers it, so this changes nothing (apply a new policy to raise it)"
            )
    return 0


def run_uncap(args: argparse.Namespace) -> int:
    """``gpugate uncap CLASS``: remove a runtime cap."""
    with open_gate(args.redis_url, args.pool) as gate:
        cp = gate.effective_policy.class_policy(args.cls)
        had = args.cls in overrides_from_reply_classes(gate.overrides(), "cap")
        gate.uncap(args.cls, reason=args.reason, who=who_am_i(args.who))
        policy_cap = "none" if cp.max_concurrent is None else str(cp.max_concurrent)
        if had:
            out(f"{args.cls} uncapped: the policy's cap ({policy_cap}) applies again")
        else:
            out(f"{args.cls} had no runtime cap; the policy's cap is {policy_cap}")
    return 0


def _classes(policy: Any, names: list[str], verb: str) -> list[str]:
    if not names:
        raise UsageError(
            f"name a class to {verb}, or pass --all; classes: {', '.join(policy.classes)}"
        )
    for name in names:
        policy.class_policy(name)  # raises UsageError with "did you mean"
    return list(dict.fromkeys(names))


# -- leases -------------------------------------------------------------------------


def _lease_row(lease: LeaseView, now: int) -> dict[str, Any]:
    return {
        "id": lease.id,
        "class": lease.cls,
        "device": lease.device,
        "estimate_bytes": lease.estimate,
        "actual_bytes": lease.actual or None,
        "held_s": round(max(0, now - lease.start_ms) / 1000, 3),
        "expires_in_s": round((lease.expires_ms - now) / 1000, 3),
        "overdue": lease.overdue(now),
        "max_deadline_in_s": (
            round((lease.max_deadline_ms - now) / 1000, 3) if lease.max_deadline_ms else None
        ),
        "owner": lease.owner,
        "tenant": lease.tenant,
    }


def run_leases(args: argparse.Namespace) -> int:
    """``gpugate leases [--class C] [--json] [--expire ID]``."""
    client, url, _ = open_client(args.redis_url)
    pool = pool_name(args.pool)
    try:
        view = read_pool(client, pool, redis_url=url)
        if view.policy is None and view.policy_error is None:
            raise no_policy(pool, "it has no leases")
        if args.expire is not None:
            return _expire(client, view, args)
        if args.cls is not None and view.policy is not None:
            view.policy.class_policy(args.cls)
        now = view.now_ms
        shown = [
            lease
            for lease in view.leases
            if lease.released_ms == 0
            and lease.expires_ms > 0
            and (args.cls is None or lease.cls == args.cls)
        ]
        if args.json:
            out(json.dumps({"pool": pool, "leases": [_lease_row(x, now) for x in shown]}, indent=2))
            return 0
        if not shown:
            which = f" of class {args.cls}" if args.cls else ""
            out(f"no live leases{which} in pool {pool}")
            return 0
        rows = [["ID", "CLASS", "DEVICE", "VRAM", "HELD", "EXPIRES", "OWNER", "TENANT"]]
        for lease in shown:
            vram = size(lease.estimate)
            if lease.actual:
                vram += f" (uses {size(lease.actual)})"
            left = (lease.expires_ms - now) / 1000
            if left > 0:
                expires = f"in {ago(left)}"
            elif lease.overdue(now):
                expires = f"OVERDUE {ago(-left)}"
            else:  # the class's max duration ended it; the next call reaps it
                expires = f"ENDED {ago(-left)} ago (max_duration)"
            rows.append(
                [
                    lease.id,
                    lease.cls,
                    lease.device,
                    vram,
                    ago(max(0, now - lease.start_ms) / 1000),
                    expires,
                    lease.owner,
                    lease.tenant or "-",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            out("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        return 0
    finally:
        client.close()


def _expire(client: Any, view: PoolView, args: argparse.Namespace) -> int:
    lease = view.lease(args.expire)
    if lease is None:
        live = ", ".join(x.id for x in view.live_leases()[:10]) or "none"
        raise UsageError(
            f"no live lease {args.expire!r} in pool {view.pool!r} (live ids: {live}); "
            "`gpugate leases` lists them"
        )
    keys = PoolKeys(view.pool)
    done = Scripts(client).release_lease(
        keys=[keys.state, keys.exp, keys.buckets],
        args=[keys.prefix, 0, lease.device, lease.id, "expired_by_operator", "0"],
    )
    who = who_am_i(args.who)
    what = (
        f"lease {lease.id} ({lease.cls}, {size(lease.held)} on {lease.device}, "
        f"held by {lease.owner})"
    )
    if not int(done):
        out(f"{what} had already ended")
        return 0
    log.warning(
        "lease_expired_by_operator",
        pool=view.pool,
        lease_id=lease.id,
        cls=lease.cls,
        device=lease.device,
        owner=lease.owner,
        who=who,
        reason=args.reason,
    )
    out(
        f"{what} ended by {who}: {args.reason or 'no reason given'}; its memory counts until "
        "the next sample shows it gone, and its holder finds it lost at its next heartbeat"
    )
    return 0
