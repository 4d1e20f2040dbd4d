"""Every Redis key name of a pool, in one place.

All keys of a pool share the hash tag ``{<pool>}`` so that every script touches
one Redis Cluster slot. The Lua scripts receive the prefix and build some keys
from it themselves (``P dev:<uuid>``, with the layout of
:meth:`PoolKeys.device`; ``P ghosts``, ``P dec:<minute>``, ``P gpus``, the
``P wake`` channel) instead of taking them in KEYS: on Redis Cluster that is
safe only because they carry the same hash tag, so every key of a pool must
be made from this prefix.

Key schema (``P`` = ``gpugate:{<pool>}:``):

==================  =======  ==================================================
key                 type     meaning
==================  =======  ==================================================
``P state``         hash     policy records and version, overrides, counters
                             (``n:<class>``, ``d:<class>:<uuid>``,
                             ``d::<uuid>``), per-device memory sums
                             (``m:<uuid>``; its idle field is the device's
                             fragmentation), lease sequence ``seq``, script
                             clock ``clock``, outcome counters, ``swept``
                             (the last look for stale samples)
``P exp``           zset     live leases ``<uuid>\\t<id>`` scored by expiry (ms)
``P waiters``       hash     waiter id -> waiter record (class, priority,
                             since, vram, device, what it waits for, expiry)
``P samples``       hash     device uuid -> ``total used taken_ms`` (the
                             freshest sample a decision sent); heartbeats
                             remove samples 10 TTLs old (at least 2 minutes),
                             once per TTL (``swept`` in ``P state``)
``P buckets``       hash     class -> ``tokens updated_ms`` (token buckets)
``P dev:<uuid>``    hash     lease id -> lease record on that device (live
                             leases and ghosts)
``P ghosts``        zset     ghosts ``<uuid>\\t<id>`` by release time (ms)
``P dec:<minute>``  hash     ``<class> <outcome> <reason>`` -> answers in that
                             minute, kept 16 minutes
``P workers``       zset     worker (gate owner ``host:pid:hex``) -> last
                             heartbeat (ms); silent for 10 TTLs: pruned
``P workerinfo``    hash     worker -> JSON (host, pid, version, fast path,
                             sampler, policy version, leases held)
``P idlemem``       hash     worker -> ``<uuid> <bytes> ...``: its idle excess
                             per device (NVML's figure for its pid above its
                             warm baseline while it holds no lease), summed
                             into the idle field of ``m:<uuid>``
``P idleseen``      zset     worker with an ``idlemem`` entry -> last
                             heartbeat (ms); one TTL silent: the entry goes
``P gpus``          hash     worker -> ``<ms> <JSON>``: its last snapshot of
                             its host's GPUs (host, utilisation, faults,
                             quarantined devices), sent with each heartbeat,
                             removed with its registration; readers merge the
                             entries per device (gates of one host name may
                             see different devices). The previous version
                             keyed it by host: such an entry is read, and a
                             gate of that host removes it 10 TTLs stale
``P wake``          channel  published on release and expiry (``<uuid>
                             <class>``: what the lease end freed), on
                             override change (``override``) and on policy
                             change (``policy``)
==================  =======  ==================================================
"""

from __future__ import annotations

import re

from .._exceptions import ConfigError

_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class PoolKeys:
    """The key names of one pool."""

    __slots__ = (
        "buckets",
        "exp",
        "ghosts",
        "gpus",
        "idle_memory",
        "idle_seen",
        "pool",
        "prefix",
        "samples",
        "state",
        "waiters",
        "wake",
        "workerinfo",
        "workers",
    )

    def __init__(self, pool: str) -> None:
        if not isinstance(pool, str) or not _POOL_NAME.match(pool):
            raise ConfigError(
                f"{pool!r} is not a pool name; use 1-64 letters, digits, '_', '.', ':' or '-'",
                key="pool",
                value=pool,
            )
        self.pool = pool
        self.prefix = f"gpugate:{{{pool}}}:"
        self.state = self.prefix + "state"
        self.exp = self.prefix + "exp"
        self.waiters = self.prefix + "waiters"
        self.samples = self.prefix + "samples"
        self.buckets = self.prefix + "buckets"
        self.workers = self.prefix + "workers"
        self.workerinfo = self.prefix + "workerinfo"
        self.idle_memory = self.prefix + "idlemem"
        self.idle_seen = self.prefix + "idleseen"
        self.ghosts = self.prefix + "ghosts"
        self.gpus = self.prefix + "gpus"
        self.wake = self.prefix + "wake"

    def device(self, uuid: str) -> str:
        """The hash holding the leases on device ``uuid``."""
        return f"{self.prefix}dev:{uuid}"

    def decisions(self, minute: int) -> str:
        """The hash counting answers in ``minute`` (script time in ms // 60000)."""
        return f"{self.prefix}dec:{minute}"


# -- the ids gates write into those keys ------------------------------------------


def owner_id(host: str, pid: int, tag: str) -> str:
    """A gate's owner id, ``host:pid:tag``: a lease's owner, a worker registry
    member, the start of its waiter ids. ``tag`` tells gates of one process apart."""
    return f"{host}:{pid}:{tag}"


def owner_parts(owner: str) -> tuple[str, int | None]:
    """The host and process id in an owner id (``(owner, None)`` when it is not one)."""
    parts = owner.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return owner, None


def waiter_id(owner: str, request: str) -> str:
    """The waiter id of a gate's request: ``owner|request``."""
    return f"{owner}|{request}"


def poller_waiter_id(owner: str, cls: str, vram: int, device: str, poller: str) -> str:
    """The waiter id of a ``try_admit`` poller: ``owner|class|vram|device|poller``
    (``device`` empty when not pinned; ``poller`` names the calling thread and task)."""
    return waiter_id(owner, f"{cls}|{vram}|{device}|{poller}")


def waiter_owner(waiter: str) -> str:
    """The owner id a waiter id starts with."""
    return waiter.split("|", 1)[0]
