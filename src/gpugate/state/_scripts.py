"""The Lua scripts, loaded once per client.

Each operation is one ``.lua`` file under ``gpugate/lua``; ``_prelude.lua``
(helpers every script shares) is prepended to each. A script runs by EVALSHA
straight on the client (redis-py's ``Script`` wrapper costs 10-20 µs a call
in imports and copies) and is loaded again after a server restart or
failover (NOSCRIPT).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

SCRIPT_NAMES = (
    "admit_job",
    "publish_policy",
    "release_lease",
    "remove_worker",
    "renew_leases",
    "set_override",
)


@cache
def script_source(name: str) -> str:
    """The full text of script ``name`` as sent to Redis (prelude included;
    the ``asynq_`` scripts also get ``_asynq.lua``)."""
    lua = resources.files("gpugate") / "lua"
    parts = ["_prelude.lua"]
    if name.startswith("asynq_"):
        parts.append("_asynq.lua")  # helpers of the Asynq lifecycle scripts
    parts.append(f"{name}.lua")
    return "\n".join((lua / part).read_text(encoding="utf-8") for part in parts)


class LuaScript:
    """One script on one client: ``script(keys=[...], args=[...])`` runs it."""

    __slots__ = ("_client", "name", "sha", "source")

    def __init__(self, client: redis.Redis | redis.RedisCluster, name: str) -> None:
        self._client = client
        self.name = name
        self.source = script_source(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return self._client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self._client.script_load(self.source)
            return self._client.evalsha(self.sha, len(keys), *keys, *args)


class Scripts:
    """Every gpugate script on one client."""

    __slots__ = SCRIPT_NAMES

    admit_job: LuaScript
    publish_policy: LuaScript
    release_lease: LuaScript
    remove_worker: LuaScript
    renew_leases: LuaScript
    set_override: LuaScript

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        for name in SCRIPT_NAMES:
            setattr(self, name, LuaScript(client, name))
