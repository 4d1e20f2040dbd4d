"""Which Redis to use, and a client configured for gpugate's access pattern.

The URL comes from, in order: the caller, ``$GPUGATE_REDIS_URL``,
``$REDIS_URL``, and last the embedded Redis of this host
(:func:`gpugate.state._embedded.embedded_url`). Any URL redis-py accepts
works: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS)
and ``unix:///path/to/socket[?db=N]``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .._exceptions import BackendError

__all__ = ["connect", "mask_url", "resolve_redis_url"]

REDIS_URL_ENVS = ("GPUGATE_REDIS_URL", "REDIS_URL")
MAX_RETRIES = 3
# Backoff between retries, in seconds: exponential from the base, capped, with jitter.
RETRY_BASE_S = 0.05
RETRY_CAP_S = 1.0
HEALTH_CHECK_INTERVAL_S = 30

_MASK = "***"
_SECRET_QUERY_KEYS = frozenset({"password", "pass", "auth"})


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


def connect(url: str, *, socket_timeout_s: float = 2.0) -> redis.Redis:
    """A client for ``url`` that returns bytes and retries lost connections.

    Connection errors and timeouts are retried up to 3 times with exponential
    backoff and jitter; ``socket_timeout_s`` bounds both connecting and each
    reply. The client connects lazily, on its first command. Raises
    :class:`~gpugate.BackendError` (password masked) when the URL is unusable.
    """
    try:
        return redis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            retry=Retry(
                EqualJitterBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S),
                MAX_RETRIES,
                supported_errors=(RedisConnectionError, RedisTimeoutError),
            ),
        )
    except (ValueError, TypeError) as exc:
        reason = _without_secrets(str(exc), url)
        raise BackendError(
            f"cannot use Redis URL {mask_url(url)}: {reason}; expected "
            "redis://[user:password@]host[:port][/db], rediss://... or unix:///path/to/socket"
        ) from None


def _without_secrets(text: str, url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, _MASK)
    return text.replace(url, mask_url(url)).splitlines()[0] if text else "invalid URL"
