"""Helpers shared by the Asynq tests: the captured states in ``tests/fixtures/asynq``.

Each ``*.json`` there is one scenario run by Asynq v0.26.0's own Go code,
with the whole keyspace after every step (see the README there). These
helpers load a captured state into a test Redis, dump the test Redis in the
same form, and (for the lifecycle tests) move a captured state in time by
whole days so its clock values stay meaningful next to the real clock.
"""

from __future__ import annotations

import base64
import calendar
import copy
import dataclasses
import json
import re
import time
from functools import cache
from pathlib import Path
from typing import Any, cast

import redis

from gpugate.asynq import decode_task_message, encode_task_message
from gpugate.asynq._keys import utc_day
from gpugate.asynq._proto import _iter_fields

FIXTURES = Path(__file__).parent / "fixtures" / "asynq"


@cache
def scenario(name: str) -> dict[str, Any]:
    """One captured scenario, by file name without ``.json``."""
    with open(FIXTURES / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


def step(name: str, index: int) -> dict[str, Any]:
    return scenario(name)["steps"][index]  # type: ignore[no-any-return]


def all_steps() -> list[tuple[str, int]]:
    return [
        (path.stem, i)
        for path in sorted(FIXTURES.glob("*.json"))
        for i in range(len(scenario(path.stem)["steps"]))
    ]


def server_ms(st: dict[str, Any]) -> int:
    """The capture's Redis TIME in ms (what the scripts' clock is set to)."""
    t = st["server_time"]
    return int(t["unix"]) * 1000 + int(t["usec"]) // 1000


def raw(v: dict[str, str]) -> bytes:
    return base64.b64decode(v["b64"])


def normal(entry: dict[str, Any]) -> Any:
    """A captured value as plain bytes: what a dump of the test Redis gives too."""
    kind, value = entry["type"], entry["value"]
    if kind == "string":
        return raw(value)
    if kind == "list":
        return [raw(v) for v in value]
    if kind == "set":
        return sorted(raw(v) for v in value)
    if kind == "hash":
        return {k.encode(): raw(v) for k, v in value.items()}
    if kind == "zset":
        return [(raw(m["member"]), float(m["score"])) for m in value]
    raise AssertionError(f"unexpected type {kind}")


def load(client: redis.Redis, st: dict[str, Any]) -> None:
    """Restore a captured keyspace: every key with its type, value and TTL."""
    pipe = client.pipeline(transaction=True)
    for name, entry in st["keys"].items():
        key = name.encode()
        value = normal(entry)
        kind = entry["type"]
        if kind == "string":
            pipe.set(key, value)
        elif kind == "list":
            pipe.rpush(key, *value)
        elif kind == "set":
            pipe.sadd(key, *value)
        elif kind == "hash":
            pipe.hset(key, mapping=value)
        elif kind == "zset":
            pipe.zadd(key, dict(value))
        if entry["ttl_ms"] > 0:
            pipe.pexpire(key, entry["ttl_ms"])
    pipe.execute()


def dump(client: redis.Redis) -> dict[str, tuple[str, bool, Any]]:
    """The test database as ``name -> (type, has_ttl, value)``, values as in :func:`normal`."""
    out: dict[str, tuple[str, bool, Any]] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()  # type: ignore[union-attr]
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            scored = cast(list[tuple[bytes, float]], client.zrange(key, 0, -1, withscores=True))
            value = [(m, float(s)) for m, s in scored]
        else:
            raise AssertionError(f"unexpected type {kind} of {key!r}")
        out[key.decode()] = (kind, client.pttl(key) > 0, value)
    return out


def expected(st: dict[str, Any]) -> dict[str, tuple[str, bool, Any]]:
    """A captured keyspace in the form of :func:`dump`."""
    return {
        name: (entry["type"], entry["ttl_ms"] > 0, normal(entry))
        for name, entry in st["keys"].items()
    }


def asynq_only(keys: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in keys.items() if k.startswith("asynq:")}


# -- moving a captured state in time ------------------------------------------------

DAY_S = 86_400


def whole_days_since(unix_s: int, now_s: float) -> int:
    """The whole days from ``unix_s`` to ``now_s`` in seconds (0 when ``now_s`` is earlier).

    A captured state moved by this much keeps its time of day and its UTC
    day boundaries, and sits less than a day before ``now_s``: a daily
    counter written with the capture's clock then expires 90 days after
    about now, as it did when captured, rather than at once.
    """
    return max(0, int(now_s - unix_s) // DAY_S) * DAY_S


def _day_key(name: str, shift_s: int) -> str:
    """``…:processed:<day>`` / ``…:failed:<day>`` with the day moved by ``shift_s``."""
    head, sep, day = name.rpartition(":")
    if not sep or not (head.endswith(":processed") or head.endswith(":failed")):
        return name
    year, month, mday = (int(x) for x in day.split("-"))
    noon = calendar.timegm((year, month, mday, 12, 0, 0))
    return f"{head}:{utc_day(noon + shift_s)}"


def _b64(data: bytes) -> dict[str, str]:
    """Bytes as a capture writes them (``raw`` reads only ``b64``)."""
    return {"b64": base64.b64encode(data).decode()}


def shifted(st: dict[str, Any], shift_s: int) -> dict[str, Any]:
    """Captured step ``st`` with every clock value ``shift_s`` seconds later.

    Zset scores, ``pending_since``, the paused key's value, the days in
    daily counter names, ``server_time`` and the message times
    ``last_failed_at``, ``completed_at`` and ``deadline`` (where set) move;
    everything else (TTLs included, as they are relative) stays.
    """
    if not shift_s:
        return st
    out = copy.deepcopy(st)
    out["server_time"]["unix"] += shift_s
    keys: dict[str, Any] = {}
    for name, entry in out["keys"].items():
        kind, value = entry["type"], entry["value"]
        if kind == "zset":
            for m in value:
                m["score"] = float(m["score"]) + shift_s
        elif kind == "hash" and ":t:" in name:
            if "pending_since" in value:
                ns = int(raw(value["pending_since"])) + shift_s * 1_000_000_000
                value["pending_since"] = _b64(str(ns).encode())
            if "msg" in value:
                msg = decode_task_message(raw(value["msg"]))
                moved = {
                    f: getattr(msg, f) + shift_s
                    for f in ("last_failed_at", "completed_at", "deadline")
                    if getattr(msg, f)
                }
                value["msg"] = _b64(encode_task_message(dataclasses.replace(msg, **moved)))
        elif kind == "string" and name.endswith(":paused"):
            entry["value"] = _b64(str(int(raw(value)) + shift_s).encode())
        keys[_day_key(name, shift_s)] = entry
    out["keys"] = keys
    return out


# -- captured states at today's date, compared by the README's rules --------------

# The first capture's time; every capture is within minutes of it.
CAPTURED_AT_S = 1795413014
SHIFT_S = whole_days_since(CAPTURED_AT_S, time.time())

Dump = dict[str, tuple[str, bool, Any]]
_TASK_KEY = re.compile(r"^asynq:\{.*\}:t:")


def at(unix_s: float) -> float:
    """A time of the captures, moved as the captured states are."""
    return unix_s + SHIFT_S


def captured(name: str, index: int) -> dict[str, Any]:
    """Step ``index`` of scenario ``name``, moved in time, without the servers' heartbeat keys."""
    st = shifted(step(name, index), SHIFT_S)
    heartbeat = ("asynq:servers", "asynq:workers")
    return {**st, "keys": {k: v for k, v in st["keys"].items() if not k.startswith(heartbeat)}}


def field_numbers(data: bytes) -> tuple[int, ...]:
    return tuple(number for number, _, _ in _iter_fields(data))


def normalized(keys: Dump) -> tuple[Dump, dict[str, int]]:
    """``keys`` with task msgs decoded (with their wire field numbers) and pending_since apart.

    pending_since compares relative to the clock; everything else exactly.
    """
    out: Dump = {}
    since: dict[str, int] = {}
    for name, (kind, has_ttl, value) in keys.items():
        if kind == "hash" and _TASK_KEY.match(name):
            value = dict(value)
            if b"msg" in value:
                data = value[b"msg"]
                value[b"msg"] = (decode_task_message(data), field_numbers(data))
            if b"pending_since" in value:
                since[name] = int(value.pop(b"pending_since"))
                value[b"pending_since"] = "<unix ns>"
        out[name] = (kind, has_ttl, value)
    return out, since


def assert_state(client: redis.Redis, want: Dump, *, since_tolerance_ns: int = 1_000_000) -> None:
    """The test database holds ``want`` (in :func:`dump` form), by the README's rules."""
    got, got_since = normalized(dump(client))
    exp, exp_since = normalized(want)
    assert got == exp
    assert got_since.keys() == exp_since.keys()
    for name, ns in exp_since.items():
        assert abs(got_since[name] - ns) <= since_tolerance_ns, name
