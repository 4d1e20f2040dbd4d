"""Asynq's server registry: where AsynqMon and ``asynq server ls`` find servers.

A running Asynq server announces itself from its heartbeater
(``heartbeat.go``): at start and then every 5 s it calls
``RDB.WriteServerState`` (``internal/rdb/rdb.go``) with its ``ServerInfo``,
one ``WorkerInfo`` per task in hand, and a TTL of two heartbeats (10 s); on
shutdown it calls ``RDB.ClearServerState``. :func:`write_server_state` and
:func:`clear_server_state` write exactly that, so a Python worker lists
beside Go servers. With ``S`` = ``{<host>:<pid>:<server id>}``:

* ``asynq:servers`` (zset): ``ZADD`` member ``asynq:servers:S``, score = the
  writer's clock + TTL, truncated to whole Unix seconds (Go's
  ``time.Time.Unix``). ``asynq:workers``: the same for ``asynq:workers:S``,
  even when the server has no task in hand.
* ``asynq:servers:S`` (string): the ServerInfo, with the TTL.
* ``asynq:workers:S`` (hash): deleted, then task id -> WorkerInfo, then the
  TTL; so with no task in hand the key does not exist, while its zset member
  does.

The two zsets are in slots of their own, so each ``ZADD`` is a command of
its own (Asynq's order: both zsets, then the per-server keys); the two
per-server keys share the hash tag ``S`` and are written in one MULTI, so a
reader sees the old state or the new one, on Redis Cluster too (where the
installed redis-py supports cluster transactions; older ones write them in
one pipeline, in order). Clearing removes both zset members, then deletes
both keys (one ``DEL``).

Asynq fills the ServerInfo from its ``Config``: ``concurrency``, ``queues``
(name -> priority), ``strict_priority``, ``status`` (``"active"`` while it
processes; ``"stopped"`` after ``Server.Stop``, still heartbeating; ``"new"``
and ``"closed"`` before and after), ``start_time_ns`` (when the heartbeater
started) and ``active_worker_count`` (tasks in hand). Asynq's inspector
attaches each WorkerInfo to the ServerInfo with the same ``server_id`` and
drops the others, so every worker written must name its server.

:func:`list_servers` and :func:`list_workers` read what Asynq's inspector
reads (``ListServers``, ``ListWorkers``): the keys named by the zsets'
members, skipping those that no longer exist (a crashed server's members
stay until an inspector prunes them) and, as Asynq does, values that are
not a ServerInfo/WorkerInfo. Unlike Asynq's, they write nothing (Asynq's
listing also deletes members whose score has passed) and trust the keys'
TTLs rather than the reader's clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.cluster
import structlog

from .._exceptions import BackendError, ConfigError, UsageError
from .._units import to_ms
from ..state._connect import REDIS_DOWN, Client
from ._keys import ALL_SERVERS, ALL_WORKERS, encode, server_info_key, workers_key
from ._proto import (
    ServerInfo,
    WorkerInfo,
    decode_server_info,
    decode_worker_info,
    encode_server_info,
    encode_worker_info,
)

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "SERVER_STATE_TTL_S",
    "clear_server_state",
    "list_servers",
    "list_workers",
    "write_server_state",
]

log = structlog.get_logger(__name__)

# Asynq's heartbeater writes every 5 s with a TTL of two beats, so one late
# beat does not make the server vanish from the listings.
HEARTBEAT_INTERVAL_S = 5.0
SERVER_STATE_TTL_S = 2 * HEARTBEAT_INTERVAL_S

# redis-py 6 added MULTI on Redis Cluster (keys of one slot); before, a
# cluster pipeline cannot be a transaction.
_CLUSTER_MULTI = hasattr(redis.cluster, "TransactionStrategy")


def write_server_state(
    client: Client,
    info: ServerInfo,
    workers: Sequence[WorkerInfo],
    *,
    ttl_s: float = SERVER_STATE_TTL_S,
    now_s: float | None = None,
) -> None:
    """Announce ``info`` and its ``workers`` (tasks in hand) as one heartbeat of Asynq's.

    Writes what Asynq's ``WriteServerState`` writes (see the module
    docstring): both zset members with score ``floor(now_s + ttl_s)``, the
    ServerInfo and the WorkerInfo hash (replaced whole) expiring in
    ``ttl_s``. ``now_s`` is the writer's clock in Unix seconds (default: this
    host's, as Asynq's); call again within ``ttl_s`` to stay listed. Three
    round trips. Raises :class:`~gpugate.ConfigError` for a TTL under 1 ms,
    :class:`~gpugate.UsageError` for a worker of another server, and
    :class:`~gpugate.BackendError` when Redis fails (the state may then be
    partly written; the next heartbeat rewrites it whole).
    """
    ttl_ms = _ttl_ms(ttl_s)
    now = time.time() if now_s is None else now_s
    expires_s = math.floor(now + ttl_s)
    server = (info.host, info.pid, info.server_id)
    entries: dict[bytes, bytes] = {}
    for worker in workers:
        if (worker.host, worker.pid, worker.server_id) != server:
            raise UsageError(
                f"WorkerInfo of task {worker.task_id!r} names server "
                f"{_name(worker.host, worker.pid, worker.server_id)}, not "
                f"{_name(*server)}; Asynq's inspector drops a worker whose server_id is "
                "not its server's, so give each worker its server's host, pid and server_id"
            )
        entries[encode(worker.task_id)] = encode_worker_info(worker)
    skey = encode(server_info_key(*server))
    wkey = encode(workers_key(*server))
    payload = encode_server_info(info)
    try:
        client.zadd(ALL_SERVERS, {skey: expires_s})
        client.zadd(ALL_WORKERS, {wkey: expires_s})
        pipe = client.pipeline(transaction=_can_multi(client))
        pipe.set(skey, payload, px=ttl_ms)
        pipe.delete(wkey)
        if entries:
            pipe.hset(wkey, mapping=entries)  # type: ignore[arg-type]
            pipe.pexpire(wkey, ttl_ms)
        pipe.execute()
    except REDIS_DOWN as exc:
        raise BackendError(
            f"Redis is unreachable; Asynq server {_name(*server)} not announced: {exc}"
        ) from exc
    except redis.ResponseError as exc:
        raise BackendError(
            f"cannot announce Asynq server {_name(*server)}: {exc}; {ALL_SERVERS} and "
            f"{ALL_WORKERS} should be zsets, as Asynq writes them"
        ) from exc


def clear_server_state(client: Client, host: str, pid: int, server_id: str) -> None:
    """Remove a server from the listings, as Asynq's ``ClearServerState`` on shutdown.

    Removes both zset members, then deletes the ServerInfo and the
    WorkerInfo hash. Three round trips; clearing a server that is not listed
    does nothing. Raises :class:`~gpugate.BackendError` when Redis fails.
    """
    skey = encode(server_info_key(host, pid, server_id))
    wkey = encode(workers_key(host, pid, server_id))
    try:
        client.zrem(ALL_SERVERS, skey)
        client.zrem(ALL_WORKERS, wkey)
        client.delete(skey, wkey)
    except REDIS_DOWN as exc:
        raise BackendError(
            f"Redis is unreachable; Asynq server {_name(host, pid, server_id)} still listed: {exc}"
        ) from exc
    except redis.ResponseError as exc:
        raise BackendError(
            f"cannot clear Asynq server {_name(host, pid, server_id)}: {exc}; "
            f"{ALL_SERVERS} and {ALL_WORKERS} should be zsets, as Asynq writes them"
        ) from exc


def list_servers(client: Client) -> list[ServerInfo]:
    """Every Asynq server listed now, in ``asynq:servers`` order (by expiry).

    A member whose key has expired is left out, and so is a value that is
    not a ServerInfo (logged). Two round trips; each key is read on its own,
    so the list is not one instant's. Raises :class:`~gpugate.BackendError`
    when Redis fails or ``asynq:servers`` is not a zset.
    """
    members = _members(client, ALL_SERVERS)
    servers: list[ServerInfo] = []
    for member, value in zip(members, _read_each(client, "get", members), strict=True):
        if value is None:
            continue
        try:
            servers.append(decode_server_info(value))
        except BackendError as exc:
            _skip(member, str(exc))
    return servers


def list_workers(client: Client) -> list[WorkerInfo]:
    """Every task in hand of every Asynq server listed now.

    Servers in ``asynq:workers`` order, each one's tasks by task id; an
    expired or missing hash and a value that is not a WorkerInfo (logged)
    are left out. Two round trips. Raises :class:`~gpugate.BackendError`
    when Redis fails or ``asynq:workers`` is not a zset.
    """
    members = _members(client, ALL_WORKERS)
    workers: list[WorkerInfo] = []
    for member, value in zip(members, _read_each(client, "hgetall", members), strict=True):
        if not value:
            continue
        for task_id in sorted(value):
            try:
                workers.append(decode_worker_info(value[task_id]))
            except BackendError as exc:
                _skip(member, str(exc), task_id=task_id.decode("utf-8", "surrogateescape"))
    return workers


def _members(client: Client, zset: str) -> list[bytes]:
    try:
        # The stubs of redis-py versions disagree on this reply's type.
        members: Any = client.zrange(zset, 0, -1)
        return [bytes(m) for m in members]
    except REDIS_DOWN as exc:
        raise BackendError(f"Redis is unreachable while listing {zset}: {exc}") from exc
    except redis.ResponseError as exc:
        raise BackendError(
            f"{zset} is not the zset Asynq keeps its servers in ({exc}); is this Asynq's Redis?"
        ) from exc


def _read_each(client: Client, command: str, keys: list[bytes]) -> list[Any]:
    """``command`` on each key in one pipeline; a key that fails reads as None (logged)."""
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        getattr(pipe, command)(key)
    try:
        replies: list[Any] = pipe.execute(raise_on_error=False)
    except REDIS_DOWN as exc:
        raise BackendError(f"Redis is unreachable while listing Asynq servers: {exc}") from exc
    out: list[Any] = []
    for key, reply in zip(keys, replies, strict=True):
        if isinstance(reply, REDIS_DOWN):
            raise BackendError(f"Redis is unreachable while listing Asynq servers: {reply}")
        if isinstance(reply, Exception):
            # Asynq's listing skips what it cannot read; so does this one.
            _skip(key, str(reply))
            reply = None
        out.append(reply)
    return out


def _skip(key: bytes, reason: str, **fields: str) -> None:
    log.warning(
        "asynq_server_entry_skipped",
        key=key.decode("utf-8", "surrogateescape"),
        reason=reason,
        **fields,
    )


def _can_multi(client: Client) -> bool:
    return _CLUSTER_MULTI or not isinstance(client, redis.cluster.RedisCluster)


def _ttl_ms(ttl_s: float) -> int:
    ok = isinstance(ttl_s, (int, float)) and not isinstance(ttl_s, bool)
    if not ok or not math.isfinite(ttl_s) or ttl_s * 1000 < 1:
        raise ConfigError(
            f"the TTL of an Asynq server's state must be at least 1ms, got {ttl_s!r}; "
            f"Asynq uses {SERVER_STATE_TTL_S:g}s, two {HEARTBEAT_INTERVAL_S:g}s heartbeats",
            key="ttl_s",
            value=ttl_s,
        )
    return to_ms(ttl_s)


def _name(host: str, pid: int, server_id: str) -> str:
    return f"{host}:{pid}:{server_id}"
