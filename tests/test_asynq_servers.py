"""gpugate's worker listed where Asynq's own tools list servers and workers.

The ground truth is ``tests/fixtures/asynq/*.json``: Redis states captured
from Asynq v0.26.0's own Go server (see the README there). Every ServerInfo
and WorkerInfo stored there is decoded and re-encoded against its
``decoded`` form (made with Asynq's ``asynq.proto`` and a standard protobuf
library, not with gpugate); the heartbeats of scenario 06 are written again
through gpugate into a Redis database of this module's own and compared key
by key; and the listings read back both captured states and our own. The
Redis tests run on the newest Redis found and on Redis 6.2.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.cluster import RedisCluster
from redis.crc import key_slot

from asynq_support import load, raw, step
from conftest import empty_database
from gpugate import BackendError, ConfigError, UsageError
from gpugate.asynq._keys import ALL_SERVERS, ALL_WORKERS, encode, server_info_key, workers_key
from gpugate.asynq._proto import (
    ServerInfo,
    WorkerInfo,
    _iter_fields,
    decode_server_info,
    decode_worker_info,
    encode_server_info,
    encode_worker_info,
)
from gpugate.asynq._servers import (
    HEARTBEAT_INTERVAL_S,
    SERVER_STATE_TTL_S,
    clear_server_state,
    list_servers,
    list_workers,
    write_server_state,
)
from gpugate.state._connect import connect
from gpugate.state._server import (
    LocalCluster,
    RedisProcess,
    redis_server_candidates,
    server_version,
)

FIXTURES = Path(__file__).parent / "fixtures" / "asynq"
# Asynq's keys are global to a Redis database; test_asynq_inspect uses 9.
SERVERS_DB = 10
UNREACHABLE = "redis://127.0.0.1:1/0?cluster=0"
NS = 1_000_000_000
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Any Timestamp Go could write: seconds in int64, nanos 0..999,999,999.
UNIX_NS = st.integers(min_value=-(2**63) * NS, max_value=(2**63 - 1) * NS + NS - 1)


# -- the captures -----------------------------------------------------------------


def unix_ns(stamp: dict[str, Any] | None) -> int | None:
    """A captured Timestamp (``{seconds, nanos, rfc3339}`` or null) as Unix ns."""
    return None if stamp is None else int(stamp["seconds"]) * NS + int(stamp["nanos"])


def server_info_from(value: dict[str, Any]) -> ServerInfo:
    """A captured ``decoded.value`` of a ServerInfo, built independently of the decoder."""
    return ServerInfo(
        host=value["host"],
        pid=value["pid"],
        server_id=value["server_id"],
        concurrency=value["concurrency"],
        queues=value["queues"],
        strict_priority=value["strict_priority"],
        status=value["status"],
        start_time_ns=unix_ns(value["start_time"]),
        active_worker_count=value["active_worker_count"],
    )


def worker_info_from(value: dict[str, Any]) -> WorkerInfo:
    """A captured ``decoded.value`` of a WorkerInfo."""
    return WorkerInfo(
        host=value["host"],
        pid=value["pid"],
        server_id=value["server_id"],
        task_id=value["task_id"],
        task_type=value["task_type"],
        task_payload=raw(value["task_payload"]),
        queue=value["queue"],
        start_time_ns=unix_ns(value["start_time"]),
        deadline_ns=unix_ns(value["deadline"]),
    )


def _captured(kind: str) -> Iterator[Any]:
    """Every stored ServerInfo (``kind="servers"``) or WorkerInfo: (raw bytes, decoded entry)."""
    for path in sorted(FIXTURES.glob("*.json")):
        for index, st_ in enumerate(json.loads(path.read_text())["steps"]):
            for key, decoded in st_["decoded"].items():
                if not key.startswith(f"asynq:{kind}:"):
                    continue
                stored = st_["keys"][key]["value"]
                if kind == "servers":
                    yield pytest.param(raw(stored), decoded, id=f"{path.stem}[{index}]")
                    continue
                for task_id, entry in decoded.items():
                    yield pytest.param(
                        raw(stored[task_id]), entry, id=f"{path.stem}[{index}]{task_id}"
                    )


CAPTURED_SERVERS = list(_captured("servers"))
CAPTURED_WORKERS = list(_captured("workers"))


def field_numbers(data: bytes) -> list[int]:
    return [number for number, _, _ in _iter_fields(data)]


def captured_server(name: str, index: int) -> tuple[ServerInfo, list[WorkerInfo]]:
    """The (only) server of a captured step and its workers, as Asynq wrote them."""
    st_ = step(name, index)
    (skey,) = (k for k in st_["decoded"] if k.startswith("asynq:servers:"))
    info = server_info_from(st_["decoded"][skey]["value"])
    wkey = workers_key(info.host, info.pid, info.server_id)
    workers = [worker_info_from(e["value"]) for e in st_["decoded"].get(wkey, {}).values()]
    return info, workers


# -- the test Redis ----------------------------------------------------------------


@pytest.fixture
def client(redis_both: RedisProcess) -> Iterator[redis.Redis]:
    """gpugate's client on an empty database of its own, on each Redis version."""
    with empty_database(redis_both, SERVERS_DB) as c:
        yield c


def is_registry_key(name: str) -> bool:
    return name.startswith((ALL_SERVERS, ALL_WORKERS))


def registry(client: redis.Redis) -> dict[str, tuple[str, bool, Any]]:
    """The server and worker keys now: ``name -> (type, has TTL, value)``."""
    out: dict[str, tuple[str, bool, Any]] = {}
    for key in client.scan_iter(count=1000):
        name = key.decode()
        if not is_registry_key(name):
            continue
        kind = client.type(key).decode()  # type: ignore[union-attr]
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            scored = cast(list[tuple[bytes, float]], client.zrange(key, 0, -1, withscores=True))
            value = [(m, float(s)) for m, s in scored]
        else:
            raise AssertionError(f"unexpected type {kind} of {name}")
        out[name] = (kind, client.pttl(key) > 0, value)
    return out


def captured_registry(st_: dict[str, Any]) -> dict[str, tuple[str, bool, Any]]:
    """The server and worker keys of a captured step, in the form of :func:`registry`."""
    out: dict[str, tuple[str, bool, Any]] = {}
    for name, entry in st_["keys"].items():
        if not is_registry_key(name):
            continue
        kind, value = entry["type"], entry["value"]
        if kind == "string":
            normal: Any = raw(value)
        elif kind == "hash":
            normal = {k.encode(): raw(v) for k, v in value.items()}
        else:
            normal = [(raw(m["member"]), float(m["score"])) for m in value]
        out[name] = (kind, entry["ttl_ms"] > 0, normal)
    return out


def unix_s(st_: dict[str, Any]) -> float:
    t = st_["server_time"]
    return int(t["unix"]) + int(t["usec"]) / 1e6


def assert_ttl_about(client: redis.Redis, key: str, ttl_s: float) -> None:
    """The key expires, in about ``ttl_s`` (wide margin: no timing is asserted)."""
    pttl = client.pttl(key)
    assert ttl_s * 1000 - 5000 < pttl <= ttl_s * 1000, (key, pttl)


def info_of(host: str, pid: int, sid: str, **fields: Any) -> ServerInfo:
    return ServerInfo(host=host, pid=pid, server_id=sid, status="active", **fields)


def worker_of(info: ServerInfo, task_id: str, **fields: Any) -> WorkerInfo:
    return WorkerInfo(
        host=info.host, pid=info.pid, server_id=info.server_id, task_id=task_id, **fields
    )


# -- the codec ---------------------------------------------------------------------


class TestCapturedServerInfo:
    """Every ServerInfo Asynq stored decodes to the fixture's value and re-encodes as Go's."""

    def test_the_fixtures_hold_server_infos(self) -> None:
        assert len(CAPTURED_SERVERS) >= 5
        values = [p.values[1]["value"] for p in CAPTURED_SERVERS]
        assert any(len(v["queues"]) > 1 for v in values)
        assert any(v["strict_priority"] for v in values)
        assert {v["active_worker_count"] for v in values} == {0, 1}

    @pytest.mark.parametrize(("data", "decoded"), CAPTURED_SERVERS)
    def test_decoding_gives_every_field_the_fixture_shows(
        self, data: bytes, decoded: dict[str, Any]
    ) -> None:
        info = decode_server_info(data)
        expected = decoded["value"]
        assert decoded["message"] == "asynq.ServerInfo"
        assert set(expected) == {f.removesuffix("_ns") for f in ServerInfo.__dataclass_fields__}
        assert info == server_info_from(expected)
        assert dict(info.queues) == expected["queues"]
        assert info.start_time_ns == unix_ns(expected["start_time"])

    @pytest.mark.parametrize(("data", "decoded"), CAPTURED_SERVERS)
    def test_encoding_writes_the_fields_go_writes_in_its_order(
        self, data: bytes, decoded: dict[str, Any]
    ) -> None:
        info = decode_server_info(data)
        encoded = encode_server_info(info)
        assert field_numbers(encoded) == decoded["wire_field_numbers"]
        if decoded["reencodes_identically"]:
            assert encoded == data
        assert decode_server_info(encoded) == info
        # Built from the fixture's value alone, it encodes to the same message.
        assert decode_server_info(encode_server_info(server_info_from(decoded["value"]))) == info


class TestCapturedWorkerInfo:
    """Every WorkerInfo Asynq stored decodes to the fixture's value and re-encodes as Go's."""

    def test_the_fixtures_hold_worker_infos(self) -> None:
        assert len(CAPTURED_WORKERS) >= 3

    @pytest.mark.parametrize(("data", "decoded"), CAPTURED_WORKERS)
    def test_decoding_gives_every_field_the_fixture_shows(
        self, data: bytes, decoded: dict[str, Any]
    ) -> None:
        info = decode_worker_info(data)
        expected = decoded["value"]
        assert decoded["message"] == "asynq.WorkerInfo"
        assert set(expected) == {f.removesuffix("_ns") for f in WorkerInfo.__dataclass_fields__}
        assert info == worker_info_from(expected)
        assert info.task_payload == raw(expected["task_payload"])
        assert info.deadline_ns == unix_ns(expected["deadline"])

    @pytest.mark.parametrize(("data", "decoded"), CAPTURED_WORKERS)
    def test_encoding_writes_the_fields_go_writes_in_its_order(
        self, data: bytes, decoded: dict[str, Any]
    ) -> None:
        info = decode_worker_info(data)
        encoded = encode_worker_info(info)
        assert field_numbers(encoded) == decoded["wire_field_numbers"]
        if decoded["reencodes_identically"]:
            assert encoded == data
        assert decode_worker_info(encoded) == info
        assert encode_worker_info(worker_info_from(decoded["value"])) == encoded


def server_infos() -> st.SearchStrategy[ServerInfo]:
    text = st.text(max_size=20)
    return st.builds(
        ServerInfo,
        host=text,
        pid=INT32,
        server_id=text,
        concurrency=INT32,
        queues=st.dictionaries(text, INT32, max_size=4),
        strict_priority=st.booleans(),
        status=text,
        start_time_ns=st.none() | UNIX_NS,
        active_worker_count=INT32,
    )


def worker_infos() -> st.SearchStrategy[WorkerInfo]:
    text = st.text(max_size=20)
    return st.builds(
        WorkerInfo,
        host=text,
        pid=INT32,
        server_id=text,
        task_id=text,
        task_type=text,
        task_payload=st.binary(max_size=32),
        queue=text,
        start_time_ns=st.none() | UNIX_NS,
        deadline_ns=st.none() | UNIX_NS,
    )


class TestRoundTrip:
    """Encoding then decoding gives the same message back, times to the nanosecond."""

    @given(server_infos())
    def test_any_server_info_survives_a_round_trip(self, info: ServerInfo) -> None:
        encoded = encode_server_info(info)
        assert decode_server_info(encoded) == info
        assert encode_server_info(decode_server_info(encoded)) == encoded

    @given(worker_infos())
    def test_any_worker_info_survives_a_round_trip(self, info: WorkerInfo) -> None:
        encoded = encode_worker_info(info)
        assert decode_worker_info(encoded) == info
        assert encode_worker_info(decode_worker_info(encoded)) == encoded

    def test_empty_messages_are_zero_bytes(self) -> None:
        assert encode_server_info(ServerInfo()) == b""
        assert decode_server_info(b"") == ServerInfo()
        assert encode_worker_info(WorkerInfo()) == b""
        assert decode_worker_info(b"") == WorkerInfo()

    def test_a_timestamp_at_the_epoch_is_written_as_an_empty_message(self) -> None:
        assert encode_server_info(ServerInfo(start_time_ns=0)) == b"\x42\x00"
        assert decode_server_info(b"\x42\x00").start_time_ns == 0

    def test_go_zero_time_has_negative_seconds_and_positive_nanos(self) -> None:
        # time.Time{} (year 1) is -62135596800 s; one ns before the epoch is -1 s + 999999999 ns.
        info = WorkerInfo(deadline_ns=-62135596800 * NS, start_time_ns=-1)
        assert decode_worker_info(encode_worker_info(info)) == info
        assert encode_worker_info(WorkerInfo(start_time_ns=-1)) == (
            b"\x42\x11\x08" + b"\xff" * 9 + b"\x01\x10\xff\x93\xeb\xdc\x03"
        )

    def test_a_queue_with_priority_zero_keeps_its_value_on_the_wire(self) -> None:
        assert encode_server_info(ServerInfo(queues={"q": 0})) == b"\x2a\x05\x0a\x01q\x10\x00"

    def test_queues_compare_regardless_of_order(self) -> None:
        a = ServerInfo(queues={"a": 1, "b": 2})
        b = ServerInfo(queues={"b": 2, "a": 1})
        assert a == b
        assert hash(a) == hash(b)
        assert encode_server_info(a) != encode_server_info(b)


class TestUnusualButValid:
    """Valid messages Go would accept are read the way Go reads them."""

    def test_unknown_fields_and_known_fields_of_another_wire_type_are_skipped(self) -> None:
        known = encode_server_info(ServerInfo(host="h", pid=7))
        odd = b"\x80\x01\x05" + b"\x92\x01\x02hi" + b"\x12\x01x"  # 16, 18, pid as bytes
        assert decode_server_info(known + odd) == ServerInfo(host="h", pid=7)

    def test_a_repeated_timestamp_is_merged_field_by_field(self) -> None:
        first = encode_worker_info(WorkerInfo(deadline_ns=5 * NS + 7))
        second = b"\x4a\x02\x10\x09"  # deadline again, nanos only
        assert decode_worker_info(first + second).deadline_ns == 5 * NS + 9

    def test_a_repeated_queue_keeps_its_last_priority(self) -> None:
        data = encode_server_info(ServerInfo(queues={"q": 1})) + encode_server_info(
            ServerInfo(queues={"q": 3})
        )
        assert dict(decode_server_info(data).queues) == {"q": 3}

    def test_any_nonzero_varint_is_true(self) -> None:
        assert decode_server_info(b"\x30\x02").strict_priority is True


class TestMalformed:
    """Bytes that are not a ServerInfo/WorkerInfo raise BackendError naming the fault."""

    @pytest.mark.parametrize(
        ("data", "fault"),
        [
            pytest.param(b"\x0a\x05abc", "needs 5 bytes but 3 remain", id="short-host"),
            pytest.param(b"\x10", "truncated varint", id="truncated-pid"),
            pytest.param(b"\x00\x00", "invalid field number 0", id="field-zero"),
            pytest.param(b"\x3a\x02\xff\xfe", "status is not valid UTF-8", id="bad-utf8"),
            pytest.param(b"\x2a\x03\x0a\x01\xff", "queues key", id="bad-queue-name"),
            pytest.param(b"\x2a\x01\x10", "truncated varint", id="bad-queue-entry"),
            pytest.param(b"\x42\x01\x08", "truncated varint", id="bad-timestamp"),
        ],
    )
    def test_malformed_server_info_raises(self, data: bytes, fault: str) -> None:
        with pytest.raises(BackendError, match="corrupt ServerInfo") as info:
            decode_server_info(data)
        assert fault in str(info.value)

    @pytest.mark.parametrize(
        ("data", "fault"),
        [
            pytest.param(b"\x22\x05abc", "needs 5 bytes", id="short-task-id"),
            pytest.param(b"\x2e", "unknown wire type 6", id="wire-type-6"),
            pytest.param(b"\x2a\x01\xc3", "task_type is not valid UTF-8", id="bad-utf8"),
            pytest.param(b"\x4a\x03\x08\xff\xff", "truncated varint", id="bad-deadline"),
        ],
    )
    def test_malformed_worker_info_raises(self, data: bytes, fault: str) -> None:
        with pytest.raises(BackendError, match="corrupt WorkerInfo") as info:
            decode_worker_info(data)
        assert fault in str(info.value)

    @given(st.binary(max_size=64))
    def test_arbitrary_bytes_decode_or_raise_backend_error(self, data: bytes) -> None:
        try:
            server = decode_server_info(data)
        except BackendError:
            pass
        else:
            assert decode_server_info(encode_server_info(server)) == server
        try:
            worker = decode_worker_info(data)
        except BackendError:
            pass
        else:
            assert decode_worker_info(encode_worker_info(worker)) == worker


class TestInvalidValues:
    """A message the wire cannot carry is refused when it is built."""

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"pid": 2**31},
            {"concurrency": "4"},
            {"strict_priority": 1},
            {"start_time_ns": 1.5},
            {"start_time_ns": 2**63 * NS},
            {"queues": {"q": 2**31}},
            {"queues": {1: 1}},
            {"queues": [("q", 1)]},
        ],
        ids=repr,
    )
    def test_server_info_refuses(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(UsageError, match="ServerInfo"):
            ServerInfo(**kwargs)

    @pytest.mark.parametrize(
        "kwargs",
        [{"task_payload": "text"}, {"deadline_ns": True}, {"task_id": None}],
        ids=repr,
    )
    def test_worker_info_refuses(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(UsageError, match="WorkerInfo"):
            WorkerInfo(**kwargs)

    def test_queues_are_read_only(self) -> None:
        with pytest.raises(TypeError):
            ServerInfo(queues={"q": 1}).queues["q"] = 2  # type: ignore[index]


# -- writing and clearing ----------------------------------------------------------


class TestKeys:
    """Key names as Asynq's ServerInfoKey and WorkersKey make them."""

    def test_keys_share_the_server_hash_tag(self) -> None:
        assert server_info_key("vm", 22102, "eb81") == "asynq:servers:{vm:22102:eb81}"
        assert workers_key("vm", 22102, "eb81") == "asynq:workers:{vm:22102:eb81}"
        skey, wkey = (encode(k("h", 1, "s")) for k in (server_info_key, workers_key))
        assert key_slot(skey) == key_slot(wkey)


class TestHeartbeatAsAsynqWritesIt:
    """Scenario 06's heartbeats, written through gpugate, leave Asynq's keys exactly."""

    def test_start_then_a_task_in_hand_then_shutdown(self, client: redis.Redis) -> None:
        info0, workers0 = captured_server("06-active-lease-heartbeat", 1)
        info1, workers1 = captured_server("06-active-lease-heartbeat", 2)
        assert (workers0, len(workers1)) == ([], 1)
        assert info0.start_time_ns is not None
        start_s = info0.start_time_ns / NS
        skey = server_info_key(info0.host, info0.pid, info0.server_id)
        wkey = workers_key(info0.host, info0.pid, info0.server_id)

        # Given the first heartbeat, at start, before any task was taken
        write_server_state(client, info0, workers0, now_s=start_s)
        # Then the keys are the capture's: the workers zset names a hash that does not exist
        st1 = step("06-active-lease-heartbeat", 1)
        assert registry(client) == captured_registry(st1)
        assert not client.exists(wkey)
        assert_ttl_about(client, skey, SERVER_STATE_TTL_S)
        assert client.pttl(ALL_SERVERS) == client.pttl(ALL_WORKERS) == -1

        # When the next heartbeat lists the task in hand
        beat_s = start_s + HEARTBEAT_INTERVAL_S
        write_server_state(client, info1, workers1, now_s=beat_s)
        # Then both per-server keys hold the capture's bytes and expire in about 10 s
        st2 = step("06-active-lease-heartbeat", 2)
        assert registry(client) == captured_registry(st2)
        for key in (skey, wkey):
            assert_ttl_about(client, key, SERVER_STATE_TTL_S)

        # When the server shuts down, nothing of it is left, as in the capture
        clear_server_state(client, info1.host, info1.pid, info1.server_id)
        assert registry(client) == captured_registry(step("06-active-lease-heartbeat", 3)) == {}

    @pytest.mark.parametrize("index", [1, 2])
    def test_the_score_is_the_expiry_in_whole_seconds(
        self, client: redis.Redis, index: int
    ) -> None:
        st_ = step("06-active-lease-heartbeat", index)
        info, workers = captured_server("06-active-lease-heartbeat", index)
        # Asynq's score is the heartbeat time + TTL, truncated: the dump follows
        # the heartbeat, so the score is at most TTL ahead of the dump's time.
        for zset in (ALL_SERVERS, ALL_WORKERS):
            (entry,) = st_["keys"][zset]["value"]
            assert float(entry["score"]).is_integer()
            assert 0 < entry["score"] - unix_s(st_) <= SERVER_STATE_TTL_S
        now_s = 1795413036.999
        write_server_state(client, info, workers, now_s=now_s)
        for zset, key in ((ALL_SERVERS, server_info_key), (ALL_WORKERS, workers_key)):
            score = client.zscore(zset, key(info.host, info.pid, info.server_id))
            assert score == math.floor(now_s + SERVER_STATE_TTL_S) == 1795413046

    def test_another_ttl_sets_both_the_expiry_and_the_score(self, client: redis.Redis) -> None:
        info = info_of("h", 1, "s")
        write_server_state(client, info, [worker_of(info, "t")], ttl_s=30, now_s=1000.5)
        assert client.zscore(ALL_SERVERS, server_info_key("h", 1, "s")) == 1030
        assert client.zscore(ALL_WORKERS, workers_key("h", 1, "s")) == 1030
        assert_ttl_about(client, server_info_key("h", 1, "s"), 30)
        assert_ttl_about(client, workers_key("h", 1, "s"), 30)

    def test_by_default_the_score_is_this_hosts_clock_plus_ttl(self, client: redis.Redis) -> None:
        before = time.time()
        write_server_state(client, info_of("h", 1, "s"), [])
        score = client.zscore(ALL_SERVERS, server_info_key("h", 1, "s"))
        assert score is not None
        assert math.floor(before + SERVER_STATE_TTL_S) <= score <= time.time() + 10

    def test_each_heartbeat_replaces_the_workers_hash_whole(self, client: redis.Redis) -> None:
        info = info_of("h", 1, "s")
        a, b = worker_of(info, "a", queue="q"), worker_of(info, "b", queue="q")
        write_server_state(client, info, [a, b], now_s=1000)
        write_server_state(client, info, [b], now_s=1005)
        assert client.hgetall(workers_key("h", 1, "s")) == {b"b": encode_worker_info(b)}
        # With no task in hand the hash is gone while the zset member stays
        write_server_state(client, info, [], now_s=1010)
        assert not client.exists(workers_key("h", 1, "s"))
        assert client.zscore(ALL_WORKERS, workers_key("h", 1, "s")) == 1020

    def test_clearing_leaves_other_servers_alone(self, client: redis.Redis) -> None:
        one, two = info_of("h", 1, "one"), info_of("h", 2, "two")
        for info in (one, two):
            write_server_state(client, info, [worker_of(info, "t")], now_s=1000)
        clear_server_state(client, "h", 1, "one")
        assert client.zrange(ALL_SERVERS, 0, -1) == [encode(server_info_key("h", 2, "two"))]
        assert client.zrange(ALL_WORKERS, 0, -1) == [encode(workers_key("h", 2, "two"))]
        assert client.exists(server_info_key("h", 2, "two"), workers_key("h", 2, "two")) == 2
        clear_server_state(client, "h", 1, "one")  # again: nothing to do

    def test_a_worker_of_another_server_is_refused(self, client: redis.Redis) -> None:
        info = info_of("h", 1, "s")
        with pytest.raises(UsageError, match="server_id"):
            write_server_state(client, info, [worker_of(info_of("h", 1, "other"), "t")])
        assert registry(client) == {}

    @pytest.mark.parametrize("ttl_s", [0, -1, 0.0004, math.inf, math.nan])
    def test_a_ttl_under_a_millisecond_is_refused(self, client: redis.Redis, ttl_s: float) -> None:
        with pytest.raises(ConfigError, match="at least 1ms"):
            write_server_state(client, info_of("h", 1, "s"), [], ttl_s=ttl_s)
        assert registry(client) == {}


# -- listing -----------------------------------------------------------------------


class TestListing:
    """The servers and workers Asynq's inspector would list, read back."""

    def test_a_server_with_a_task_in_hand_is_listed_with_its_worker(
        self, client: redis.Redis
    ) -> None:
        load(client, step("10-crash-lease-recovery", 1))
        info, workers = captured_server("10-crash-lease-recovery", 1)
        assert list_servers(client) == [info]
        assert list_workers(client) == workers
        assert workers[0].task_id == "crash-1"

    def test_a_strict_priority_server_is_listed_with_its_queues(self, client: redis.Redis) -> None:
        load(client, step("08-queue-registry", 3))
        (info,) = list_servers(client)
        assert info.strict_priority
        assert dict(info.queues) == {"critical": 6, "low": 1, "unused": 1}
        assert list_workers(client) == []

    def test_a_server_without_a_task_lists_no_worker(self, client: redis.Redis) -> None:
        load(client, step("06-active-lease-heartbeat", 1))
        info, _ = captured_server("06-active-lease-heartbeat", 1)
        assert list_servers(client) == [info]
        assert list_workers(client) == []

    def test_a_killed_server_whose_keys_expired_is_not_listed(self, client: redis.Redis) -> None:
        st3 = step("10-crash-lease-recovery", 3)
        load(client, st3)
        assert client.zcard(ALL_SERVERS) == client.zcard(ALL_WORKERS) == 1
        assert (list_servers(client), list_workers(client)) == ([], [])
        # Then a new server is listed beside the dead one's stale members
        client.flushdb()
        load(client, step("10-crash-lease-recovery", 4))
        assert client.zcard(ALL_SERVERS) == 2
        info, _ = captured_server("10-crash-lease-recovery", 4)
        assert list_servers(client) == [info]
        assert list_workers(client) == []

    def test_what_we_write_is_listed_and_cleared(self, client: redis.Redis) -> None:
        one = info_of("gpu-a", 41, "one", concurrency=2, queues={"ocr": 3, "default": 1})
        two = info_of("gpu-b", 42, "two", start_time_ns=1795413031_944175525)
        tasks = [
            worker_of(one, "t-2", task_type="ocr:page", queue="ocr", task_payload=b"\x00\xff"),
            worker_of(one, "t-1", task_type="ocr:page", queue="ocr", deadline_ns=7 * NS),
        ]
        write_server_state(client, one, tasks, now_s=time.time())
        write_server_state(client, two, [], now_s=time.time() + 1)
        assert list_servers(client) == [one, two]
        assert list_workers(client) == sorted(tasks, key=lambda w: w.task_id)
        clear_server_state(client, "gpu-a", 41, "one")
        assert (list_servers(client), list_workers(client)) == ([two], [])

    def test_a_value_that_is_not_a_message_is_skipped_as_asynq_skips_it(
        self, client: redis.Redis
    ) -> None:
        good = info_of("h", 1, "good")
        write_server_state(client, good, [worker_of(good, "ok")], now_s=time.time())
        write_server_state(client, info_of("h", 2, "bad"), [], now_s=time.time())
        client.set(server_info_key("h", 2, "bad"), b"\xff\xff", ex=10)
        client.hset(workers_key("h", 1, "good"), b"junk", b"\x00")
        assert list_servers(client) == [good]
        assert [w.task_id for w in list_workers(client)] == ["ok"]
        # A key of another type is skipped too
        client.delete(server_info_key("h", 2, "bad"))
        client.hset(server_info_key("h", 2, "bad"), "x", "y")
        assert list_servers(client) == [good]

    def test_nothing_listed_on_an_empty_database(self, client: redis.Redis) -> None:
        assert (list_servers(client), list_workers(client)) == ([], [])


class TestRedisErrors:
    """A Redis that fails, or keys of another type, raise BackendError."""

    def test_registries_of_another_type_raise(self, client: redis.Redis) -> None:
        client.set(ALL_SERVERS, "x")
        with pytest.raises(BackendError, match="asynq:servers"):
            write_server_state(client, info_of("h", 1, "s"), [])
        with pytest.raises(BackendError, match="asynq:servers"):
            list_servers(client)
        with pytest.raises(BackendError, match="cannot clear"):
            clear_server_state(client, "h", 1, "s")

    def test_an_unreachable_redis_raises(self) -> None:
        c = connect(UNREACHABLE, socket_timeout_s=0.5)
        try:
            with pytest.raises(BackendError, match="unreachable"):
                write_server_state(c, info_of("h", 1, "s"), [])
            with pytest.raises(BackendError, match="unreachable"):
                clear_server_state(c, "h", 1, "s")
            with pytest.raises(BackendError, match="unreachable"):
                list_servers(c)
            with pytest.raises(BackendError, match="unreachable"):
                list_workers(c)
        finally:
            c.close()


# -- Redis Cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[RedisCluster]:
    """A Redis Cluster of three masters (for this module), through gpugate's connect()."""
    candidates = redis_server_candidates()
    if not candidates:
        pytest.skip("no redis-server found to run a Redis Cluster")
    newest = max(candidates, key=lambda e: tuple(int(p) for p in server_version(e).split(".")))
    with LocalCluster(3, newest) as cluster:
        c = connect(cluster.url)
        assert isinstance(c, RedisCluster)
        try:
            yield c
        finally:
            c.close()


@pytest.mark.slow
class TestCluster:
    """The two zsets and each server's keys live in different slots; all still works."""

    def test_write_list_and_clear_across_slots(self, cluster_client: RedisCluster) -> None:
        c = cluster_client
        servers = [info_of(f"gpu-{i}", 100 + i, f"sid-{i}") for i in range(4)]
        slots = {key_slot(encode(server_info_key(s.host, s.pid, s.server_id))) for s in servers}
        slots |= {key_slot(ALL_SERVERS.encode()), key_slot(ALL_WORKERS.encode())}
        assert len(slots) > 2
        try:
            for info in servers:
                write_server_state(c, info, [worker_of(info, "t")], now_s=time.time())
            assert sorted(list_servers(c), key=lambda s: s.server_id) == servers
            assert len(list_workers(c)) == 4
            for info in servers[:2]:
                clear_server_state(c, info.host, info.pid, info.server_id)
            assert sorted(s.server_id for s in list_servers(c)) == ["sid-2", "sid-3"]
            assert {w.server_id for w in list_workers(c)} == {"sid-2", "sid-3"}
        finally:
            for info in servers:
                clear_server_state(c, info.host, info.pid, info.server_id)
            c.delete(ALL_SERVERS, ALL_WORKERS)
