"""Running one Asynq script: the scripts built once per client, Redis errors as BackendError.

Every Asynq read and write of gpugate (inspection, pause, the task
lifecycle) is one script of ``gpugate/lua/asynq_*.lua`` on the queue's slot,
run through :func:`run_script`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import redis

from .._exceptions import BackendError
from ..state._connect import REDIS_DOWN, Client
from ..state._scripts import LuaScript
from ._keys import encode

__all__ = ["run_script", "script"]

_HINT = "the queue's keys (asynq:{<queue>}:*) should hold what Asynq writes there"

_scripts: weakref.WeakKeyDictionary[Client, dict[str, LuaScript]] = weakref.WeakKeyDictionary()


def script(client: Client, name: str) -> LuaScript:
    """Script ``name`` on ``client``, built once per client."""
    per_client = _scripts.get(client)
    if per_client is None:
        per_client = _scripts.setdefault(client, {})
    found = per_client.get(name)
    if found is None:
        found = per_client[name] = LuaScript(client, name)
    return found


def run_script(
    client: Client,
    name: str,
    what: str,
    keys: Sequence[str | bytes],
    args: Sequence[object],
    *,
    hint: str = _HINT,
    not_found: bool = False,
) -> Any:
    """Run script ``name``; ``what`` says what it does and ``hint`` what to check, for errors.

    With ``not_found``, Asynq's ``NOT FOUND`` reply comes back as None.
    """
    encoded = [encode(k) if isinstance(k, str) else k for k in keys]
    try:
        return script(client, name)(keys=encoded, args=args)
    except REDIS_DOWN as exc:
        raise BackendError(f"Redis is unreachable; cannot {what}: {exc}") from exc
    except redis.ResponseError as exc:
        if not_found and str(exc).startswith("NOT FOUND"):
            return None
        raise BackendError(f"cannot {what}: {exc}; {hint}") from exc
