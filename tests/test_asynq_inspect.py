"""Asynq queues read and paused the way Asynq's own tools do it.

The ground truth is ``tests/fixtures/asynq/*.json``: Redis states captured
step by step from Asynq v0.26.0's own Go client, server and inspector (see
the README there for what compares exactly and what only relative to the
capture's ``server_time``). Each test loads a captured state into a Redis
database of its own, reads or pauses through gpugate, and compares with what
Asynq wrote, or with what the state implies by Asynq's rules (computed here
straight from the JSON, independently of gpugate's script). Every test runs
on the newest Redis found and on Redis 6.2.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

import gpugate.asynq
from asynq_support import (
    all_steps,
    asynq_only,
    dump,
    expected,
    load,
    raw,
    server_ms,
    step,
)
from conftest import empty_database
from gpugate import ConfigError
from gpugate.asynq import (
    AsynqKeys,
    QueuePause,
    QueueStats,
    Throughput,
    eta_s,
    list_queues,
    pause_queue,
    queue_concerns,
    read_queue,
    read_queues,
    throughput,
    unpause_queue,
)
from gpugate.asynq._keys import encode, utc_day
from gpugate.state._connect import connect
from gpugate.state._scripts import LuaScript
from gpugate.state._server import (
    LocalCluster,
    RedisProcess,
    redis_server_candidates,
    server_version,
)

# Asynq's keys are global to a Redis database, so these tests keep to one
# database of the session Redis and flush it around each test.
ASYNQ_DB = 9
LUA = Path(__file__).parents[1] / "src" / "gpugate" / "lua"


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
def client(redis_both: RedisProcess) -> Iterator[redis.Redis]:
    """gpugate's client on an empty database of its own, on each Redis version."""
    with empty_database(redis_both, ASYNQ_DB) as c:
        yield c


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``condition`` until it holds (Redis ends TTLs on its own clock)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout_s}s")
        time.sleep(0.02)


# -- what a captured state implies, by Asynq's rules ------------------------------


def queues_in(st: dict[str, Any]) -> list[str]:
    """Every queue the state mentions: registered ones and those with keys."""
    names: set[str] = set()
    registry = st["keys"].get("asynq:queues")
    if registry:
        names |= {raw(v).decode() for v in registry["value"]}
    for key in st["keys"]:
        if key.startswith("asynq:{"):
            names.add(key[len("asynq:{") : key.index("}")])
    return sorted(names)


def implied(st: dict[str, Any], queue: str) -> dict[str, Any]:
    """Asynq's ``GetQueueInfo`` for ``queue``, worked out from the captured keys alone."""
    keys = st["keys"]
    p = f"asynq:{{{queue}}}:"
    now_ms = server_ms(st)
    day = time.strftime("%Y-%m-%d", time.gmtime(st["server_time"]["unix"]))

    def size(suffix: str) -> int:
        entry = keys.get(p + suffix)
        return len(entry["value"]) if entry else 0

    def count(suffix: str) -> int:
        entry = keys.get(p + suffix)
        return int(raw(entry["value"])) if entry else 0

    latency_ns = 0
    pending = keys.get(p + "pending")
    if pending and pending["value"]:
        oldest = raw(pending["value"][-1]).decode()  # the right end is dequeued first
        task = keys.get(p + "t:" + oldest)
        since = task["value"].get("pending_since") if task else None
        if since is not None:
            latency_ns = now_ms * 1_000_000 - int(raw(since))
    groups = [raw(v).decode() for v in keys.get(p + "groups", {"value": []})["value"]]
    registry = keys.get("asynq:queues", {"value": []})["value"]
    return {
        "registered": queue in {raw(v).decode() for v in registry},
        "pending": size("pending"),
        "active": size("active"),
        "scheduled": size("scheduled"),
        "retry": size("retry"),
        "archived": size("archived"),
        "completed": size("completed"),
        "aggregating": sum(size("g:" + g) for g in groups),
        "groups": len(groups),
        "processed_today": count("processed:" + day),
        "failed_today": count("failed:" + day),
        "processed_total": count("processed"),
        "failed_total": count("failed"),
        "latency_s": max(0, latency_ns) / 1e9,
        "paused": p + "paused" in keys,
    }


def reported(stats: QueueStats) -> dict[str, Any]:
    return {
        "registered": stats.registered,
        "pending": stats.pending,
        "active": stats.active,
        "scheduled": stats.scheduled,
        "retry": stats.retry,
        "archived": stats.archived,
        "completed": stats.completed,
        "aggregating": stats.aggregating,
        "groups": stats.groups,
        "processed_today": stats.processed_today,
        "failed_today": stats.failed_today,
        "processed_total": stats.processed_total,
        "failed_total": stats.failed_total,
        "latency_s": stats.latency_s,
        "paused": stats.paused,
    }


# -- tests ------------------------------------------------------------------------


class TestKeys:
    """Key names are Asynq's, and gpugate's marker lives in the queue's hash slot."""

    def test_queue_keys_are_the_ones_asynq_writes(self) -> None:
        k = AsynqKeys("default")
        names = set(step("05-failure-retry-archive", 4)["keys"]) | set(
            step("05-failure-retry-archive", 2)["keys"]
        )
        day = "2026-11-23"
        for name in (
            k.archived,
            k.failed_total,
            k.failed(day),
            k.paused,
            k.pending,
            k.processed_total,
            k.processed(day),
            k.task("fail-1"),
        ):
            assert name in names
        assert {k.active, k.lease} <= set(step("06-active-lease-heartbeat", 1)["keys"])
        assert k.scheduled in step("02-enqueue-scheduled", 0)["keys"]
        assert k.completed in step("04-process-success-retention", 1)["keys"]
        assert {k.groups, k.group("batch-a")} <= set(step("09-group-aggregating", 2)["keys"])
        assert k.retry in step("10-crash-lease-recovery", 4)["keys"]

    @pytest.mark.parametrize("queue", ["default", "ocr:bulk", "a}b", "ünï"])
    def test_the_pause_marker_shares_the_queues_slot(self, queue: str) -> None:
        k = AsynqKeys(queue)
        assert key_slot(encode(k.pause_marker)) == key_slot(encode(k.paused))
        assert key_slot(encode(k.pause_marker)) == key_slot(encode(k.pending))

    @pytest.mark.parametrize("name", ["", "   ", None, 3])
    def test_a_blank_queue_name_is_refused_as_asynq_does(self, name: Any) -> None:
        with pytest.raises(ConfigError, match="queue name"):
            AsynqKeys(name)

    def test_the_public_names_are_pinned(self) -> None:
        assert gpugate.asynq.__all__ == [
            "AsynqKeys",
            "AsynqWorker",
            "PauseResult",
            "QueuePause",
            "QueueStats",
            "RetryLater",
            "RevokeTask",
            "ServerInfo",
            "SkipRetry",
            "Task",
            "TaskMessage",
            "Throughput",
            "UnpauseResult",
            "WorkerInfo",
            "decode_task_message",
            "encode_task_message",
            "eta_s",
            "list_queues",
            "list_servers",
            "list_workers",
            "pause_queue",
            "queue_concerns",
            "read_queue",
            "read_queues",
            "throughput",
            "unpause_queue",
        ]

    def test_every_asynq_script_loads_with_the_sha_the_client_uses(
        self, client: redis.Redis
    ) -> None:
        names = sorted(p.stem for p in LUA.glob("asynq_*.lua"))
        assert names == [
            "asynq_archive",
            "asynq_claim",
            "asynq_complete",
            "asynq_delete_expired_completed",
            "asynq_done",
            "asynq_extend_lease",
            "asynq_forward",
            "asynq_lease_expired",
            "asynq_pause_queue",
            "asynq_peek",
            "asynq_read_queue",
            "asynq_requeue",
            "asynq_retry",
            "asynq_unpause_queue",
        ]
        for name in names:
            script = LuaScript(client, name)
            assert client.script_load(script.source) == script.sha


class TestReadQueue:
    """Sizes, latency, counters and pause read as Asynq's inspector reports them."""

    @pytest.mark.parametrize(("name", "index"), all_steps())
    def test_every_captured_state_reads_as_its_keys_imply(
        self, client: redis.Redis, name: str, index: int
    ) -> None:
        st = step(name, index)
        load(client, st)
        got = read_queues(client, queues_in(st), now_ms=server_ms(st))
        for queue, stats in got.items():
            want = implied(st, queue)
            have = reported(stats)
            # The scripts' clock is whole ms; pending_since is ns.
            assert have.pop("latency_s") == pytest.approx(want.pop("latency_s"), abs=1e-3)
            assert have == want, queue
            assert stats.day == "2026-11-23"

    def test_the_oldest_pending_task_gives_the_latency(self, client: redis.Redis) -> None:
        # Given nine tasks enqueued one after another (two enqueues were refused),
        # the first (default options, a UUID id) the oldest
        st = step("01-enqueue-pending", 10)
        load(client, st)
        # When read 90 s after the capture
        stats = read_queue(client, "default", now_ms=server_ms(st) + 90_000)
        # Then the latency is the first task's age, the size every task
        assert stats.pending == stats.size == 9
        first = st["keys"]["asynq:{default}:t:be8b28d8-d4f5-4535-a8ec-fdfd874dbea4"]
        since_ns = int(raw(first["value"]["pending_since"]))
        assert stats.oldest_pending_since_ns == since_ns
        assert stats.latency_s == pytest.approx(
            (server_ms(st) + 90_000) / 1000 - since_ns / 1e9, abs=1e-3
        )
        assert 90 < stats.latency_s < 91

    def test_a_task_requeued_at_shutdown_has_latency_zero_as_in_asynq(
        self, client: redis.Redis
    ) -> None:
        # Asynq's shutdown requeue does not restore pending_since.
        st = step("06-active-lease-heartbeat", 3)
        load(client, st)
        stats = read_queue(client, "default", now_ms=server_ms(st) + 600_000)
        assert stats.pending == 1
        assert stats.oldest_pending_since_ns == 0
        assert stats.latency_s == 0

    def test_failures_retries_and_archive_are_counted(self, client: redis.Redis) -> None:
        load(client, step("05-failure-retry-archive", 1))
        first = read_queue(client, "default", now_ms=server_ms(step("05-failure-retry-archive", 1)))
        assert (first.retry, first.processed_today, first.failed_today) == (1, 1, 1)
        assert first.succeeded_today == 0
        client.flushdb()
        last_step = step("05-failure-retry-archive", 4)
        load(client, last_step)
        last = read_queue(client, "default", now_ms=server_ms(last_step))
        assert (last.archived, last.size, last.pending, last.retry) == (1, 1, 0, 0)
        assert (last.processed_today, last.failed_today) == (3, 3)
        assert (last.processed_total, last.failed_total) == (3, 3)

    def test_a_pause_set_by_asynq_reads_as_someone_elses(self, client: redis.Redis) -> None:
        # Given the state after inspector.PauseQueue and a forward to pending
        st = step("05-failure-retry-archive", 2)
        load(client, st)
        stats = read_queue(client, "default", now_ms=server_ms(st))
        assert stats.paused_by == "other"
        assert stats.pause is None
        assert stats.paused_at_s == 1795413025
        assert stats.paused_ttl_ms is None
        # The forwarder wrote a fresh pending_since at 1795413026.489628350.
        since_s = 1795413026.489628350
        assert stats.latency_s == pytest.approx(server_ms(st) / 1000 - since_s, abs=1e-3)

    def test_grouped_tasks_count_as_aggregating_and_in_the_size(self, client: redis.Redis) -> None:
        st = step("09-group-aggregating", 2)
        load(client, st)
        stats = read_queue(client, "default", now_ms=server_ms(st))
        assert (stats.aggregating, stats.groups, stats.size, stats.pending) == (3, 2, 3, 0)

    def test_counters_of_an_earlier_day_are_not_todays(self, client: redis.Redis) -> None:
        st = step("03-process-success", 4)
        load(client, st)
        next_day = (st["server_time"]["unix"] // 86_400 + 1) * 86_400 * 1000 + 5_000
        stats = read_queue(client, "default", now_ms=next_day)
        assert stats.day == "2026-11-24"
        assert stats.processed_today == 0
        assert (stats.processed_yesterday, stats.processed_total) == (3, 3)

    @pytest.mark.parametrize(
        "unix_s",
        [
            0,
            86_399,
            951_782_400,  # 2000-02-29
            951_868_799,  # 2000-02-29 23:59:59
            1_709_251_199,  # 2024-02-29 23:59:59
            2_147_483_647,  # 2038-01-19
            4_107_542_400,  # 2100-03-01 (2100 is no leap year)
            253_402_300_799,  # 9999-12-31 23:59:59
        ],
    )
    def test_the_utc_day_is_the_calendars(self, client: redis.Redis, unix_s: int) -> None:
        stats = read_queue(client, "q", now_ms=unix_s * 1000 + 999)
        assert stats.day == utc_day(unix_s)

    def test_a_queue_nobody_used_reads_empty_and_unregistered(self, client: redis.Redis) -> None:
        load(client, step("08-queue-registry", 4))
        assert list_queues(client) == ["critical", "low", "reports"]
        got = read_queues(client, ["reports", "unused"])
        assert got["reports"].registered
        assert got["reports"].scheduled == 1
        unused = got["unused"]
        assert not unused.registered
        assert not unused.paused
        assert (unused.size, unused.processed_total, unused.latency_s) == (0, 0, 0)
        # Without names, every registered queue, in order.
        assert list(read_queues(client)) == ["critical", "low", "reports"]

    def test_a_queue_name_that_is_not_utf8_names_its_own_keys(self, client: redis.Redis) -> None:
        # Go strings are bytes: a client may enqueue to a queue named so.
        name = b"q\xff"
        client.sadd("asynq:queues", name)
        client.lpush(b"asynq:{q\xff}:pending", b"t1", b"t2")
        client.set(b"asynq:{q\xff}:processed", b"7")
        [(queue, got)] = read_queues(client).items()
        assert encode(queue) == name
        assert (got.registered, got.pending, got.processed_total) == (True, 2, 7)
        pause_queue(client, queue)
        assert client.exists(b"asynq:{q\xff}:paused")

    def test_redis_time_is_the_default_clock(self, client: redis.Redis) -> None:
        before = client.time()
        stats = read_queue(client, "default")
        after = client.time()
        assert before[0] * 1000 + before[1] // 1000 <= stats.now_ms
        assert stats.now_ms <= after[0] * 1000 + after[1] // 1000


class TestPause:
    """Pause and unpause write exactly Asynq's keys; expiry and ownership as decision 7."""

    def test_pause_writes_exactly_the_key_asynqs_pause_wrote(self, client: redis.Redis) -> None:
        # Given one pending task (07, step 0)
        load(client, step("07-pause-unpause", 0))
        after = step("07-pause-unpause", 1)
        # When gpugate pauses "default" at the capture's time of PauseQueue
        result = pause_queue(client, "default", who="ops", reason="drill", now_ms=server_ms(after))
        # Then Asynq's keys are exactly those PauseQueue left (value, no TTL)
        state = dump(client)
        assert asynq_only(state) == expected(after)
        assert (result.outcome, result.paused_at_s) == ("paused", 1795413040)
        assert result.until_ms == 0
        # and the only other key is gpugate's marker, without TTL either
        assert set(state) - set(expected(after)) == {"gpugate:asynq:{default}:pause"}
        assert state["gpugate:asynq:{default}:pause"][1] is False

    def test_pause_on_redis_time_writes_the_current_second(self, client: redis.Redis) -> None:
        load(client, step("07-pause-unpause", 0))
        before = int(client.time()[0])
        result = pause_queue(client, "default")
        after = int(client.time()[0])
        value = int(client.get("asynq:{default}:paused") or b"0")
        assert before <= value == result.paused_at_s <= after
        assert client.pttl("asynq:{default}:paused") == -1

    def test_pausing_again_changes_no_asynq_key(self, client: redis.Redis) -> None:
        load(client, step("07-pause-unpause", 0))
        pause_queue(client, "default", now_ms=server_ms(step("07-pause-unpause", 1)))
        again = pause_queue(client, "default", now_ms=server_ms(step("07-pause-unpause", 3)))
        assert (again.outcome, again.paused_at_s) == ("extended", 1795413040)
        assert asynq_only(dump(client)) == expected(step("07-pause-unpause", 3))

    def test_unpause_leaves_exactly_what_asynqs_unpause_left(self, client: redis.Redis) -> None:
        load(client, step("07-pause-unpause", 0))
        pause_queue(client, "default", now_ms=server_ms(step("07-pause-unpause", 1)))
        result = unpause_queue(client, "default")
        assert (result.outcome, result.was_gpugates) == ("unpaused", True)
        # The whole keyspace: gpugate's marker went with the pause.
        assert dump(client) == expected(step("07-pause-unpause", 4))

    def test_a_queue_never_used_pauses_without_being_registered(self, client: redis.Redis) -> None:
        load(client, step("07-pause-unpause", 4))
        paused_step = step("07-pause-unpause", 5)
        pause_queue(client, "ghost", now_ms=server_ms(paused_step))
        assert asynq_only(dump(client)) == expected(paused_step)
        assert read_queue(client, "ghost").paused_by == "gpugate"
        assert unpause_queue(client, "ghost").outcome == "unpaused"
        assert dump(client) == expected(step("07-pause-unpause", 6))

    def test_unpausing_a_queue_not_paused_says_so(self, client: redis.Redis) -> None:
        load(client, step("07-pause-unpause", 0))
        assert unpause_queue(client, "default").outcome == "not_paused"
        assert dump(client) == expected(step("07-pause-unpause", 0))

    def test_gpugates_pause_reads_with_who_why_and_expiry(self, client: redis.Redis) -> None:
        load(client, step("07-pause-unpause", 0))
        result = pause_queue(
            client, "default", duration="30m", who="alice@h1", reason="incident 42",
            pool="p1", cls="batch",
        )  # fmt: skip
        stats = read_queue(client, "default")
        assert stats.paused_by == "gpugate"
        assert stats.pause == QueuePause(
            queue="default",
            until_ms=result.now_ms + 1_800_000,
            who="alice@h1",
            why="incident 42",
            at_ms=result.now_ms,
            pool="p1",
            cls="batch",
            paused_at_s=result.paused_at_s,
        )
        assert stats.pause.remaining_s(result.now_ms) == 1800
        assert stats.paused_ttl_ms is not None
        assert 1_790_000 < stats.paused_ttl_ms <= 1_800_000

    def test_a_timed_pause_ends_by_itself_with_no_gpugate_running(
        self, client: redis.Redis
    ) -> None:
        # Given gpugate paused "default" for 150 ms
        load(client, step("07-pause-unpause", 0))
        pause_queue(client, "default", duration="150ms")
        assert 0 < client.pttl("asynq:{default}:paused") <= 150
        # When the time is up (Redis ends the TTL; nothing of gpugate runs)
        wait_until(lambda: not client.exists("asynq:{default}:paused"))
        # Then the keyspace is as before the pause, marker included
        assert dump(client) == expected(step("07-pause-unpause", 0))

    def test_a_pause_lifted_and_set_again_by_asynqmon_is_never_ended_by_gpugate(
        self, client: redis.Redis
    ) -> None:
        # Given gpugate's timed pause
        load(client, step("07-pause-unpause", 0))
        mine = pause_queue(client, "default", duration="300ms")
        # When an operator unpauses and pauses again in AsynqMon within the same
        # second (DEL, then SETNX with the same value and no TTL)
        client.delete("asynq:{default}:paused")
        client.set("asynq:{default}:paused", str(mine.paused_at_s), nx=True)
        # Then the pause is not gpugate's, though the stale marker is still there
        assert client.exists("gpugate:asynq:{default}:pause")
        assert read_queue(client, "default").paused_by == "other"
        # and gpugate's expiry passes without unpausing it
        wait_until(lambda: not client.exists("gpugate:asynq:{default}:pause"))
        assert client.get("asynq:{default}:paused") == str(mine.paused_at_s).encode()
        assert client.pttl("asynq:{default}:paused") == -1
        # nor does `gpugate resume` (own pauses only)
        assert unpause_queue(client, "default", only_own=True).outcome == "not_ours"
        assert client.exists("asynq:{default}:paused")

    def test_gpugate_never_puts_an_expiry_on_someone_elses_pause(self, client: redis.Redis) -> None:
        # Given the state right after Asynq's own PauseQueue (no marker)
        load(client, step("07-pause-unpause", 1))
        # When gpugate pauses the queue for an hour (a class pause, say)
        result = pause_queue(client, "default", duration="1h", cls="batch")
        # Then nothing changed: the pause stays Asynq's, without expiry
        assert (result.outcome, result.owned, result.until_ms) == ("already_paused", False, 0)
        assert dump(client) == expected(step("07-pause-unpause", 1))
        assert unpause_queue(client, "default", only_own=True).outcome == "not_ours"
        assert dump(client) == expected(step("07-pause-unpause", 1))

    def test_pausing_gpugates_pause_again_replaces_its_expiry(self, client: redis.Redis) -> None:
        load(client, step("07-pause-unpause", 0))
        first = pause_queue(client, "default", duration="1h", who="a")
        untimed = pause_queue(client, "default", who="b")
        assert (untimed.outcome, untimed.until_ms) == ("extended", 0)
        assert untimed.paused_at_s == first.paused_at_s
        assert client.pttl("asynq:{default}:paused") == -1
        assert client.pttl("gpugate:asynq:{default}:pause") == -1
        timed = pause_queue(client, "default", duration="30m", who="c")
        assert timed.outcome == "extended"
        assert 1_790_000 < client.pttl("asynq:{default}:paused") <= 1_800_000
        pause = read_queue(client, "default").pause
        assert pause is not None
        assert pause.who == "c"

    def test_asynqs_unpause_semantics_lift_anyones_pause(self, client: redis.Redis) -> None:
        load(client, step("07-pause-unpause", 1))
        result = unpause_queue(client, "default")
        assert (result.outcome, result.was_gpugates) == ("unpaused", False)
        assert dump(client) == expected(step("07-pause-unpause", 4))

    def test_a_pause_set_again_in_another_second_is_someone_elses(
        self, client: redis.Redis
    ) -> None:
        # Given gpugate's pause without expiry, lifted and set again in AsynqMon later
        load(client, step("07-pause-unpause", 0))
        mine = pause_queue(client, "default")
        client.delete("asynq:{default}:paused")
        assert read_queue(client, "default").paused_by is None
        client.set("asynq:{default}:paused", str(mine.paused_at_s + 5))
        # Then it is not gpugate's; an own-only unpause leaves it and drops the marker
        assert read_queue(client, "default").paused_by == "other"
        assert unpause_queue(client, "default", only_own=True).outcome == "not_ours"
        assert client.exists("asynq:{default}:paused")
        assert not client.exists("gpugate:asynq:{default}:pause")

    def test_a_zero_pause_is_refused(self, client: redis.Redis) -> None:
        # 0 ms is the scripts' "no expiry": a pause "for 0s" must not last forever.
        for zero in (0, "0s", "0ms"):
            with pytest.raises(ConfigError, match="is zero"):
                pause_queue(client, "default", duration=zero)
        assert not client.exists("asynq:{default}:paused")

    def test_a_pause_shorter_than_a_millisecond_lasts_one(self, client: redis.Redis) -> None:
        result = pause_queue(client, "default", duration=0.0004)
        assert (result.outcome, result.until_ms - result.now_ms) == ("paused", 1)


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
    """Each script touches one queue's slot, so reading and pausing work on Redis Cluster."""

    # Their slots fall on each of the three masters (slots split in thirds).
    QUEUES = ("default", "critical", "low", "ocr:bulk", "reports")

    def test_queues_on_every_node_read_pause_and_unpause(
        self, cluster_client: RedisCluster
    ) -> None:
        c = cluster_client
        thirds = {key_slot(encode(AsynqKeys(q).pending)) * 3 // 16384 for q in self.QUEUES}
        assert thirds == {0, 1, 2}
        try:
            for q in self.QUEUES:
                k = AsynqKeys(q)
                c.sadd("asynq:queues", q)
                c.lpush(k.pending, "t-1")
                c.hset(k.task("t-1"), mapping={"state": "pending", "pending_since": "1000000000"})
                c.set(k.processed_total, 4)
            got = read_queues(c, now_ms=2_000_000)
            assert list(got) == sorted(self.QUEUES)
            for q, stats in got.items():
                assert (stats.pending, stats.processed_total, stats.latency_s) == (1, 4, 1999.0), q
                assert pause_queue(c, q, duration="1h", cls="batch").outcome == "paused"
                assert read_queue(c, q).paused_by == "gpugate"
                assert unpause_queue(c, q, only_own=True).outcome == "unpaused"
        finally:
            for q in self.QUEUES:
                k = AsynqKeys(q)
                c.delete(k.pending, k.task("t-1"), k.processed_total, k.paused, k.pause_marker)
            c.delete("asynq:queues")


def stats(**fields: Any) -> QueueStats:
    """A reading with everything 0 except ``fields``."""
    base: dict[str, Any] = {f.name: 0 for f in dataclasses.fields(QueueStats)}
    base.update(
        queue="q", registered=True, day="2026-11-23", paused=False, paused_ttl_ms=None, pause=None
    )
    base.update(fields)
    return QueueStats(**base)


NOON_MS = 1795435200_000  # 2026-11-23 12:00:00 UTC


class TestThroughputAndEta:
    """The drain time from the backlog and the recent rate."""

    def test_a_rate_is_measured_between_two_readings(self) -> None:
        before = stats(now_ms=NOON_MS, processed_total=100)
        after = stats(now_ms=NOON_MS + 60_000, processed_total=160, pending=110, active=10)
        rate = throughput(after, before)
        assert rate == Throughput(1.0, "measured", 60.0)
        assert eta_s(after, rate) == 120
        assert rate.describe() == "60/min over 1m"

    def test_without_an_earlier_reading_todays_average_is_used(self) -> None:
        reading = stats(now_ms=NOON_MS, processed_today=43_200, processed_yesterday=1)
        rate = throughput(reading)
        assert rate == Throughput(1.0, "today", 43_200.0)
        assert rate.describe() == "60/min (today's average)"

    def test_early_in_the_day_yesterday_counts_too(self) -> None:
        midnight = NOON_MS - 43_200_000
        reading = stats(now_ms=midnight + 1_800_000, processed_today=0, processed_yesterday=88_200)
        rate = throughput(reading)
        assert rate is not None
        assert rate.per_s == pytest.approx(1.0)

    def test_a_counter_that_went_back_is_not_a_measurement(self) -> None:
        before = stats(now_ms=NOON_MS, processed_total=10**6)
        after = stats(now_ms=NOON_MS + 60_000, processed_total=5, processed_today=0)
        rate = throughput(after, before)
        assert rate is not None
        assert rate.basis == "today"

    def test_a_paused_or_stuck_queue_has_no_eta_and_an_empty_one_zero(self) -> None:
        rate = Throughput(2.0, "measured", 30.0)
        assert eta_s(stats(pending=5, paused=True), rate) is None
        assert eta_s(stats(pending=5), Throughput(0.0, "measured", 30.0)) is None
        assert eta_s(stats(pending=5), None) is None
        assert eta_s(stats(), rate) == 0

    def test_a_backlog_waiting_too_long_is_a_concern_with_its_eta(self) -> None:
        reading = stats(
            queue="ocr:bulk",
            now_ms=NOON_MS,
            pending=340,
            active=20,
            oldest_pending_since_ns=(NOON_MS - 720_000) * 1_000_000,
        )
        rate = Throughput(0.2, "measured", 60.0)
        assert queue_concerns(reading, rate) == [
            "queue ocr:bulk oldest task waits 12m, 360 to do, ETA 30m at 12/min over 1m"
        ]
        assert queue_concerns(reading, Throughput(0.0, "today", 10.0)) == [
            "queue ocr:bulk oldest task waits 12m, 360 to do, nothing processed today"
        ]
        assert queue_concerns(reading, rate, latency_limit_s=800) == []

    def test_a_paused_queue_with_work_is_a_concern_naming_who_paused_it(self) -> None:
        pause = QueuePause("q", NOON_MS + 600_000, "alice@h1", "", NOON_MS, "p1", "batch", 1)
        assert queue_concerns(stats(now_ms=NOON_MS, pending=3, paused=True, pause=pause), None) == [
            "queue q paused by alice@h1 (reverts in 10m): 3 pending"
        ]
        assert queue_concerns(stats(now_ms=NOON_MS, pending=3, paused=True), None) == [
            "queue q paused outside gpugate (AsynqMon or asynq CLI; no expiry): 3 pending"
        ]
        assert queue_concerns(stats(now_ms=NOON_MS, paused=True), None) == []
