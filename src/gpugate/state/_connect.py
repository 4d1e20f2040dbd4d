"""Which Redis to use, and a client configured for gpugate's access pattern.

The URL comes from, in order: the caller, ``$GPUGATE_REDIS_URL``,
``$REDIS_URL``, and last the embedded Redis of this host
(:func:`gpugate.state._embedded.embedded_url`). Any URL redis-py accepts
works: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS)
and ``unix:///path/to/socket[?db=N]``.

Redis Cluster: give the URL of any one node; :func:`connect` asks that node
``INFO cluster`` once and, if it says ``cluster_enabled:1``, returns a
:class:`redis.cluster.RedisCluster` that discovers the other nodes. Every
script touches one slot (all keys of a pool share the hash tag ``{<pool>}``,
see :mod:`gpugate.state._keys`), so nothing else changes. The query parameter
``?cluster=1`` (or ``yes``/``true``) says the URL is a cluster and skips the
probe; ``?cluster=0`` says it is not and skips it too. The probe exists so
that the URL of a node just works; it costs one round trip on the connection
the client then keeps using, and none for ``unix://`` (a cluster is reached
over TCP only). When the node cannot be reached for the probe, the URL is
taken for a plain Redis (as before, the client connects lazily and reports
the outage on its first command): name a cluster with ``?cluster=1`` where
the client may start before its cluster.

A cluster client made while its cluster cannot be reached (no node answers,
or its slots are not all served yet) is *pending*, as a plain client is
before its first command: :func:`connect` returns it (logging
``redis_cluster_unreachable``) and each use of it tries again to read the
cluster's layout, raising the cluster's error (one of :data:`REDIS_DOWN`:
the gate DEFERs ``backend_unavailable``) until that succeeds. Only a node
that answers but is not in cluster mode fails at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable
from typing import Any, TypeAlias, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import structlog
from redis.backoff import EqualJitterBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .._exceptions import BackendError

__all__ = [
    "REDIS_DOWN",
    "Client",
    "connect",
    "down_reason",
    "mask_url",
    "refuses_writes",
    "resolve_redis_url",
]

log = structlog.get_logger(__name__)

Client: TypeAlias = "redis.Redis | RedisCluster"
"""What :func:`connect` returns: a client of one Redis, or of a Redis Cluster."""

# The errors that mean "Redis cannot be reached now" (as opposed to a bad
# command or data): every caller turns them into BackendError.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    # Something answers there, but not in Redis's protocol (a wrong port).
    redis.exceptions.InvalidResponse,
    # It answers but takes no writes now: a replica after a failover, or full.
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
    # A slot moving between nodes: the client's redirections ran out
    # ("TTL exhausted"), or the node asks to try again (a multi-key script
    # whose keys are not all on one node yet).
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
)

# Inside a script, a refused write comes back as a plain script error that
# carries the server's own error: these say "no writes now", as the classes
# in REDIS_DOWN do for a command.
_REFUSED_WRITE_MARKS = ("OOM command not allowed", "READONLY", "MISCONF")


def refuses_writes(exc: BaseException) -> bool:
    """Whether a Redis error says the server takes no writes now (a replica
    after a failover, full past ``maxmemory``, or failing to persist), which
    gpugate treats as Redis being unreachable."""
    if isinstance(exc, REDIS_DOWN):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and any(m in text for m in _REFUSED_WRITE_MARKS)


REDIS_URL_ENVS = ("GPUGATE_REDIS_URL", "REDIS_URL")
MAX_RETRIES = 3
# Backoff between retries, in seconds: exponential from the base, capped, with jitter.
RETRY_BASE_S = 0.05
RETRY_CAP_S = 1.0
HEALTH_CHECK_INTERVAL_S = 30
# Connections a client opens to one server at most; more threads than this
# wait for a free one.
MAX_CONNECTIONS = 100
CLUSTER_QUERY_KEY = "cluster"

_MASK = "***"
_SECRET_QUERY_KEYS = frozenset({"password", "pass", "auth"})
_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})
_URL_FORMS = "redis://[user:password@]host[:port][/db], rediss://... or unix:///path/to/socket"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for logs and messages.

    ``redis://user:secret@host:6379/0`` becomes ``redis://user:***@host:6379/0``;
    a password given as ``?password=`` is masked too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or ("[" in parts.netloc and "]" not in parts.netloc):
        # Too malformed to parse: mask whatever sits between "user:" and "@".
        return re.sub(r"(//[^/@:]*:)[^/@]*@", rf"\g<1>{_MASK}@", url)
    masked = url
    # Edit the original text rather than re-assemble it, which could reshape
    # the URL (urlunsplit drops an empty "//" authority, for one).
    if "@" in parts.netloc:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        if sep:
            masked = masked.replace(parts.netloc, f"{user}:{_MASK}@{hostinfo}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(k, _MASK if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                safe="*",
            )
            masked = masked.replace(f"?{parts.query}", f"?{query}", 1)
    return masked


def resolve_redis_url(explicit: str | None) -> tuple[str, bool]:
    """The Redis URL to use, and whether it is the embedded one.

    ``explicit`` wins, then ``$GPUGATE_REDIS_URL``, then ``$REDIS_URL`` (empty
    values count as unset); with none of them, this host's embedded Redis,
    started if need be.
    """
    if explicit:
        return explicit, False
    for name in REDIS_URL_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value, False
    from ._embedded import embedded_url

    return embedded_url(), True


def connect(url: str, *, socket_timeout_s: float = 2.0) -> Client:
    """A client for ``url`` that returns bytes and retries lost connections.

    Connection errors are retried up to 3 times with exponential backoff and
    jitter; a timeout is not retried: ``socket_timeout_s`` bounds connecting
    and each reply, so a hung server costs one timeout per call. A plain
    Redis client connects lazily, on its first command, except that a
    ``redis://``/``rediss://`` URL without ``?cluster=`` is asked once
    whether it is a cluster node; a :class:`~redis.cluster.RedisCluster` reads
    the cluster's layout when made, or at its first use when the cluster
    cannot be reached then (see the module docstring). Raises
    :class:`~gpugate.BackendError` (password masked) when the URL is unusable
    or names a server that answers but is not a cluster node.
    """
    target, cluster = _cluster_hint(url)
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # More threads than connections wait for one (a socket timeout at
        # most) instead of failing as if Redis were down.
        "max_connections": MAX_CONNECTIONS,
        "timeout": socket_timeout_s,
        "retry": _Retry(
            EqualJitterBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S),
            MAX_RETRIES,
            # Not timeouts: a server that does not answer in time is hung or
            # cut off, and each try would wait the whole timeout again (the
            # call may also have run). Connection errors fail fast.
            supported_errors=(RedisConnectionError,),
        ),
    }
    try:
        if not cluster:
            client = redis.Redis(
                connection_pool=redis.BlockingConnectionPool.from_url(target, **options)
            )
            client.auto_close_connection_pool = True
            if cluster is False or not _may_be_cluster(target) or not _is_cluster_node(client, url):
                return client
            client.close()
        # redis-py's cluster client counts the retries itself (connections to
        # the nodes get none) and ignores the options that do not apply to it.
        cluster_client = cast(
            _RedisCluster,
            _RedisCluster.from_url(
                target, connection_pool_class=redis.BlockingConnectionPool, **options
            ),
        )
    except (ValueError, TypeError) as exc:
        raise BackendError(
            f"cannot use Redis URL {mask_url(url)}: {_without_secrets(str(exc), url)}; "
            f"expected {_URL_FORMS}"
        ) from None
    failed = cluster_client._gpugate_failed
    if failed is not None:
        if _NOT_A_CLUSTER in str(failed):
            cluster_client.close()
            raise BackendError(
                f"cannot use the Redis at {mask_url(url)} as a Redis Cluster: "
                f"{_without_secrets(str(failed), url)}; drop ?cluster=1 for a plain Redis, "
                "or give the URL of a node of the cluster"
            )
        log.warning(
            "redis_cluster_unreachable",
            url=mask_url(url),
            error=_without_secrets(str(failed), url),
            note="each use tries again; meanwhile calls fail as with Redis down",
            fix="check that a node of the cluster listens there and the cluster is ok "
            "(redis-cli cluster info)",
        )
    return cluster_client


# What redis-py says when the node named as a cluster is a plain Redis.
_NOT_A_CLUSTER = "Cluster mode is not enabled"


class _Retry(Retry):
    """redis-py's :class:`~redis.retry.Retry`, except that refused credentials
    are not tried again: redis-py raises them as a connection error, and
    another try can only fail the same way (a wrong password cost each call
    its backoffs, 2.5 s per decision)."""

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        def retryable(error: Exception) -> bool:
            if _refused_credentials(error):
                return False
            return is_retryable is None or is_retryable(error)

        return super().call_with_retry(do, fail, retryable, with_failure_count)


class _RedisCluster(RedisCluster):
    """A :class:`~redis.cluster.RedisCluster` that may be made before its
    cluster is up, and whose :meth:`close` closes its sockets.

    redis-py reads the cluster's layout in the constructor and raises when no
    node answers. Here a failed read leaves the client *pending*: its
    instance holds only what it was made with (what the failed attempt set
    is dropped), so every use reaches :meth:`__getattr__`, which runs the
    constructor again (one thread at a time) and raises its error while the
    cluster is still unreachable. ``_gpugate_failed`` is the error of the
    attempt made by the constructor (``None``: connected).

    ``RedisCluster.from_url`` hands each node a connection pool that the
    node's client does not own, so ``RedisCluster.close()`` leaves those
    connections open until garbage collection (a ``ResourceWarning``, and
    sockets held by a closed gate). Closing the pools here fixes that.
    """

    _gpugate_failed: BaseException | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        state = self.__dict__
        state["_gpugate_lock"] = threading.RLock()
        state["_gpugate_pending"] = (args, kwargs)
        state["_gpugate_failed"] = None
        try:
            self._gpugate_connect()
        except (RedisClusterException, RedisError) as exc:
            state["_gpugate_failed"] = exc

    def _gpugate_connect(self) -> None:
        """Read the cluster's layout now if still pending; raise redis-py's error if it fails."""
        state = self.__dict__
        with state["_gpugate_lock"]:
            pending = state.get("_gpugate_pending")
            if pending is None:
                return
            if state.get("_gpugate_busy"):
                # The constructor itself asks for what it has not set yet.
                raise AttributeError("_gpugate_busy")
            state["_gpugate_busy"] = True
            try:
                super().__init__(*pending[0], **pending[1])
            except BaseException:
                # Release what the attempt opened, then forget it: the next use starts afresh.
                with contextlib.suppress(Exception):
                    super().close()
                kept = {k: state[k] for k in ("_gpugate_lock", "_gpugate_pending")}
                state.clear()
                state.update(kept, _gpugate_failed=None)
                raise
            finally:
                state.pop("_gpugate_busy", None)
            del state["_gpugate_pending"]
            state["_gpugate_failed"] = None

    def __getattr__(self, name: str) -> Any:
        # Reached only for what the instance lacks: everything while pending.
        if name.startswith("_gpugate_") or "_gpugate_pending" not in self.__dict__:
            raise AttributeError(name)
        try:
            self._gpugate_connect()
        except AttributeError:
            raise AttributeError(name) from None
        return getattr(self, name)

    def close(self) -> None:
        """Close the client and every connection it holds to the nodes."""
        if "_gpugate_pending" in self.__dict__:
            return  # nothing was opened, or the failed attempt closed it
        nodes = self.get_nodes()  # type: ignore[no-untyped-call]
        super().close()
        for node in nodes:
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


def _cluster_hint(url: str) -> tuple[str, bool | None]:
    """``url`` without its ``cluster`` query parameter, and that parameter (None if absent)."""
    try:
        query = urlsplit(url).query
    except ValueError:
        return url, None  # redis-py rejects it, with a message worth showing
    if not query:
        return url, None
    kept: list[str] = []
    hint: bool | None = None
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if unquote(name) != CLUSTER_QUERY_KEY:
            kept.append(part)
            continue
        word = unquote(value).strip().lower()
        if word not in _TRUE | _FALSE:
            raise BackendError(
                f"cannot use Redis URL {mask_url(url)}: cluster={unquote(value)!r} is not a "
                "yes or no; write ?cluster=1 for a Redis Cluster, ?cluster=0 for a plain Redis"
            )
        hint = word in _TRUE
    if hint is None:
        return url, None
    # Only the query changes: the rest of the text reaches redis-py as written.
    rest = "&".join(kept)
    return url.replace(f"?{query}", f"?{rest}" if rest else "", 1), hint


def _may_be_cluster(url: str) -> bool:
    # redis-py reaches a cluster over TCP only.
    return url.startswith(("redis://", "rediss://"))


def _is_cluster_node(client: redis.Redis, url: str) -> bool:
    """Whether the server behind ``client`` runs in cluster mode: one ``INFO cluster``."""
    try:
        info = client.info("cluster")
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        log.warning(
            "redis_cluster_probe_failed",
            url=mask_url(url),
            error=_without_secrets(str(exc), url),
            assumed="plain Redis",
            fix="check that Redis runs there; for a Redis Cluster add ?cluster=1 "
            "(or ?cluster=0 for a plain Redis) to skip this probe",
        )
        return False
    except redis.exceptions.InvalidResponse as exc:
        raise BackendError(
            f"{mask_url(url)} does not answer as a Redis server does "
            f"({_without_secrets(str(exc), url)}): check its host and port"
        ) from None
    except redis.ResponseError as exc:
        # INFO may be denied by an ACL or renamed; a cluster must then say so in its URL.
        log.debug("redis_cluster_probe_refused", url=mask_url(url), error=str(exc))
        return False
    enabled = str(info.get("cluster_enabled", 0)) == "1"
    if enabled:
        log.debug("redis_cluster_detected", url=mask_url(url))
    return enabled


def _without_secrets(text: str, url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, _MASK)
    return text.replace(url, mask_url(url)).splitlines()[0] if text else "invalid URL"


_CREDENTIAL_MARKS = ("NOAUTH", "WRONGPASS", "HELLO must be called", "invalid username-password")


def _refused_credentials(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, redis.AuthenticationError) or any(m in text for m in _CREDENTIAL_MARKS)


def down_reason(exc: BaseException) -> str:
    """How to say what a Redis failure in :data:`REDIS_DOWN` (or a refused
    write) means, after "Redis at <url> ": a server that answered is not
    called unreachable, and the fix is named."""
    text = str(exc)
    if _refused_credentials(exc):
        return f"refused the credentials: {text} (check the user and password in the URL)"
    if "READONLY" in text:
        return f"takes no writes: {text} (a replica: point the URL at the primary)"
    if "OOM command not allowed" in text:
        return f"is full: {text} (maxmemory reached; free memory or raise it)"
    if "MISCONF" in text:
        return f"refuses writes: {text} (it cannot save its snapshot; see its log)"
    return f"is unreachable: {text}"
