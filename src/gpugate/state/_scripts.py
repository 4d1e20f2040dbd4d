"""The Lua scripts, loaded once per client.

Each operation is one ``.lua`` file under ``gpugate/lua``; ``_prelude.lua``
(helpers every script shares) is prepended to each. redis-py's ``Script``
runs them by EVALSHA and reloads them after a server restart (NOSCRIPT).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

SCRIPT_NAMES = ("admit_job", "publish_policy", "release_lease", "renew_leases", "set_override")


@cache
def script_source(name: str) -> str:
    """The full text of script ``name`` as sent to Redis (prelude included)."""
    lua = resources.files("gpugate") / "lua"
    prelude = (lua / "_prelude.lua").read_text(encoding="utf-8")
    body = (lua / f"{name}.lua").read_text(encoding="utf-8")
    return prelude + "\n" + body


class Scripts:
    """Every gpugate script registered on one client."""

    __slots__ = SCRIPT_NAMES

    admit_job: Script
    publish_policy: Script
    release_lease: Script
    renew_leases: Script
    set_override: Script

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        for name in SCRIPT_NAMES:
            setattr(self, name, client.register_script(script_source(name)))
