"""A task's life through gpugate's broker leaves Redis exactly as Asynq's own server does.

The ground truth is ``tests/fixtures/asynq/*.json``: the keyspace after each
step of scenarios run by Asynq v0.26.0's Go client and server. Each test
loads the state *before* a step, does the same through
:mod:`gpugate.asynq._broker` (with the clock values the capture implies),
and compares with the state captured *after* it, by the README's rules:
key names and types, which keys have a TTL, list order, zset members and
scores, set members, hash fields, counters and every decoded TaskMessage
field (with its wire field numbers) exactly; ``pending_since`` and TTLs
relative to the clock. The servers' heartbeat keys are left out: a Go
server's heartbeat writes them, not these paths.

Captured states are moved forward by whole days to the real clock's
(:func:`asynq_support.shifted`), so that daily counters expire 90 days after
about now, as they did when captured. Every test runs on the newest Redis
found and on Redis 6.2.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from asynq_support import (
    assert_state,
    at,
    captured,
    dump,
    expected,
    load,
    raw,
)
from conftest import empty_database
from gpugate import BackendError
from gpugate.asynq import AsynqKeys, TaskMessage, decode_task_message, encode_task_message
from gpugate.asynq._broker import (
    ARCHIVE_MAX_AGE_S,
    ERR_LEASE_EXPIRED,
    LEASE_DURATION_S,
    PAUSED,
    Peek,
    archive,
    claim,
    default_retry_delay,
    delete_expired_completed,
    done,
    extend_leases,
    forward,
    lease_expired,
    mark_complete,
    peek,
    requeue,
    retry,
    write_result,
)
from gpugate.asynq._keys import utc_day
from gpugate.state._server import RedisProcess

# Asynq's keys are global to a Redis database: these tests keep to one
# database of the session Redis and flush it around each test.
ASYNQ_DB = 11
Q = "default"
K = AsynqKeys(Q)
STATS_TTL_S = 90 * 86_400
MAX_INT64 = (1 << 63) - 1


def message(st: dict[str, Any], task_id: str) -> TaskMessage:
    """The TaskMessage of ``task_id`` in captured state ``st``."""
    return decode_task_message(raw(st["keys"][K.task(task_id)]["value"]["msg"]))


def assert_counter_expiry(
    client: redis.Redis, after: dict[str, Any], key: str, *, now_s: float
) -> None:
    """Daily counter ``key`` expires 90 days after ``now_s``, as Asynq's did after its increment."""
    expire_at_s = math.floor(now_s) + STATS_TTL_S
    t = after["server_time"]
    captured_expire_at_s = t["unix"] + t["usec"] / 1e6 + after["keys"][key]["ttl_ms"] / 1000
    assert captured_expire_at_s == pytest.approx(expire_at_s, abs=3)
    assert client.pttl(key) / 1000 == pytest.approx(expire_at_s - time.time(), abs=5)


def take(client: redis.Redis, *, now_s: float) -> TaskMessage:
    """Peek and claim the oldest pending task, leased for Asynq's 30 s."""
    seen = peek(client, Q)
    assert isinstance(seen, Peek)
    msg = claim(client, Q, seen.task_id, lease_until_s=math.floor(now_s) + LEASE_DURATION_S)
    assert msg == seen.message
    return msg


def active_task(client: redis.Redis, msg: TaskMessage, *, lease_until_s: float) -> None:
    """Write ``msg`` as an active, leased task (as a dequeue leaves it)."""
    client.rpush(K.active, msg.id)
    client.zadd(K.lease, {msg.id: lease_until_s})
    client.hset(K.task(msg.id), mapping={"msg": encode_task_message(msg), "state": "active"})


@pytest.fixture
def client(redis_both: RedisProcess) -> Iterator[redis.Redis]:
    """gpugate's client on an empty database of its own, on each Redis version."""
    with empty_database(redis_both, ASYNQ_DB) as c:
        yield c


class TestTakingATask:
    """peek and claim are Asynq's dequeue, split; extend_leases is its heartbeat."""

    def test_claim_moves_the_oldest_pending_task_to_active_with_a_lease(
        self, client: redis.Redis
    ) -> None:
        # Given busy-1 pending, when a worker peeks and claims it
        load(client, captured("06-active-lease-heartbeat", 0))
        after = captured("06-active-lease-heartbeat", 1)
        seen = peek(client, Q)
        assert isinstance(seen, Peek)
        assert (seen.queue, seen.task_id) == (Q, "busy-1")
        lease_until_s = int(at(1795413061))
        msg = claim(client, Q, "busy-1", lease_until_s=lease_until_s)
        # then Redis is as after Asynq's dequeue: active, leased, no pending_since
        assert msg == seen.message == message(after, "busy-1")
        assert_state(client, expected(after))

    def test_a_heartbeat_extends_the_lease(self, client: redis.Redis) -> None:
        load(client, captured("06-active-lease-heartbeat", 1))
        extended = extend_leases(client, Q, ["busy-1"], lease_until_s=int(at(1795413066)))
        assert extended == ["busy-1"]
        assert_state(client, expected(captured("06-active-lease-heartbeat", 2)))

    def test_a_lease_that_is_gone_is_not_extended_nor_added(self, client: redis.Redis) -> None:
        before = captured("06-active-lease-heartbeat", 1)
        load(client, before)
        got = extend_leases(client, Q, ["lost-1", "busy-1", "lost-2"], lease_until_s=100)
        assert got == ["busy-1"]
        assert client.zrange(K.lease, 0, -1, withscores=True) == [(b"busy-1", 100.0)]
        assert extend_leases(client, Q, [], lease_until_s=100) == []

    def test_peek_tells_paused_empty_and_the_oldest_task(self, client: redis.Redis) -> None:
        assert peek(client, Q) is None
        load(client, captured("03-process-success", 1))
        seen = peek(client, Q)
        assert isinstance(seen, Peek)
        assert seen.task_id == "ok-1"  # the tail: enqueued first
        assert seen.message == message(captured("03-process-success", 1), "ok-1")
        client.set(K.paused, "1795413025")
        assert peek(client, Q) == PAUSED
        # Peeking writes nothing.
        client.delete(K.paused)
        assert dump(client) == expected(captured("03-process-success", 1))

    def test_peek_of_a_pending_id_without_its_task_is_a_backend_error(
        self, client: redis.Redis
    ) -> None:
        client.lpush(K.pending, "ghost-1")
        with pytest.raises(BackendError, match=r"ghost-1.*LREM"):
            peek(client, Q)

    def test_claim_takes_nothing_while_the_queue_is_paused(self, client: redis.Redis) -> None:
        before = captured("03-process-success", 1)
        load(client, before)
        client.set(K.paused, "1795413025")
        assert claim(client, Q, "ok-1", lease_until_s=100) is None
        client.delete(K.paused)
        assert dump(client) == expected(before)

    def test_claim_takes_nothing_once_another_worker_took_the_task(
        self, client: redis.Redis
    ) -> None:
        before = captured("03-process-success", 1)
        load(client, before)
        # ok-2 is pending but not the oldest; ok-1 was claimed meanwhile.
        assert claim(client, Q, "ok-2", lease_until_s=100) is None
        assert dump(client) == expected(before)
        assert claim(client, Q, "ok-1", lease_until_s=100) is not None
        assert claim(client, Q, "ok-1", lease_until_s=100) is None
        client.flushdb()
        assert claim(client, Q, "ok-1", lease_until_s=100) is None
        assert dump(client) == {}


class TestEndingAnAttempt:
    """done, mark_complete, retry, archive and requeue write what Asynq's processor writes."""

    def test_done_deletes_the_task_and_counts_it_processed(self, client: redis.Redis) -> None:
        # Given ok-1 and ok-2 pending, when a worker runs both successfully
        load(client, captured("03-process-success", 1))
        after = captured("03-process-success", 2)
        now_s = at(1795413017.9)
        for task_id in ("ok-1", "ok-2"):
            msg = take(client, now_s=now_s)
            assert msg.id == task_id
            assert done(client, msg, now_s=now_s) is True
        # then both hashes are gone and processed counts 2, today's for 90 days
        assert_state(client, expected(after))
        assert_counter_expiry(client, after, K.processed(utc_day(now_s)), now_s=now_s)

    def test_done_releases_the_tasks_uniqueness_lock(self, client: redis.Redis) -> None:
        load(client, captured("03-process-success", 3))
        now_s = at(1795413020.5)
        msg = take(client, now_s=now_s)
        assert msg.unique_key == K.unique(msg.type, msg.payload)
        assert client.exists(msg.unique_key)
        assert done(client, msg, now_s=now_s) is True
        assert_state(client, expected(captured("03-process-success", 4)))

    def test_done_keeps_a_lock_another_task_holds_now(self, client: redis.Redis) -> None:
        load(client, captured("03-process-success", 3))
        now_s = at(1795413020.5)
        msg = take(client, now_s=now_s)
        client.set(msg.unique_key, "someone-else", ex=300)
        assert done(client, msg, now_s=now_s) is True
        assert client.get(msg.unique_key) == b"someone-else"

    def test_mark_complete_keeps_the_task_with_its_result(self, client: redis.Redis) -> None:
        # Given keep-1 (Retention 3600 s) pending, when its handler writes a result
        load(client, captured("04-process-success-retention", 0))
        after = captured("04-process-success-retention", 1)
        now_s = at(1795413020.9)
        msg = take(client, now_s=now_s)
        assert write_result(client, Q, msg.id, b"done:keep-1") == len(b"done:keep-1")
        assert mark_complete(client, msg, now_s=now_s) is True
        # then it is completed until completed_at + retention, with its result
        assert message(after, "keep-1").completed_at == math.floor(now_s)
        assert_state(client, expected(after))
        assert_counter_expiry(client, after, K.processed(utc_day(now_s)), now_s=now_s)

    def test_a_failure_goes_to_retry_and_counts(self, client: redis.Redis) -> None:
        # Given fail-1 (MaxRetry 2) pending, when its first attempt fails
        load(client, captured("05-failure-retry-archive", 0))
        after = captured("05-failure-retry-archive", 1)
        now_s = at(1795413021.9)
        msg = take(client, now_s=now_s)
        assert msg.retried < msg.retry
        ok = retry(
            client,
            msg,
            retry_at_s=now_s + 2,
            error="payload asked to fail",
            is_failure=True,
            now_s=now_s,
        )
        # then it waits in retry with retried 1, error_msg, last_failed_at, and counts
        assert ok is True
        assert_state(client, expected(after))
        day = utc_day(now_s)
        for key in (K.processed(day), K.failed(day)):
            assert_counter_expiry(client, after, key, now_s=now_s)

    def test_a_retry_that_is_no_failure_changes_neither_retried_nor_counters(
        self, client: redis.Redis
    ) -> None:
        load(client, captured("05-failure-retry-archive", 0))
        after = captured("05-failure-retry-archive", 1)
        now_s = at(1795413021.9)
        msg = take(client, now_s=now_s)
        ok = retry(
            client,
            msg,
            retry_at_s=now_s + 2,
            error="payload asked to fail",
            is_failure=False,
            now_s=now_s,
        )
        assert ok is True
        # Asynq's state after a failure, but with retried 0 and no counter at all.
        want = {k: v for k, v in expected(after).items() if ":processed" not in k}
        want = {k: v for k, v in want.items() if ":failed" not in k}
        kind, has_ttl, fields = want[K.task("fail-1")]
        not_retried = dataclasses.replace(message(after, "fail-1"), retried=0)
        assert not_retried.error_msg == "payload asked to fail"
        want[K.task("fail-1")] = (
            kind,
            has_ttl,
            {**fields, b"msg": encode_task_message(not_retried)},
        )
        assert_state(client, want)

    def test_an_exhausted_task_is_archived(self, client: redis.Redis) -> None:
        # Given fail-1 pending after one failure (retried 1 of 2), when two more
        # attempts fail as in Asynq's run: retry in 1 s, forward, then archive
        load(client, captured("05-failure-retry-archive", 3))
        error = "payload asked to fail"
        now_s = at(1795413029.2)
        msg = take(client, now_s=now_s)
        assert msg.retried < msg.retry
        assert retry(client, msg, retry_at_s=now_s + 1, error=error, is_failure=True, now_s=now_s)
        assert forward(client, Q, now_s=at(1795413030.3)) == 1
        now_s = at(1795413030.6)
        msg = take(client, now_s=now_s)
        assert msg.retried >= msg.retry
        assert archive(client, msg, error=error, now_s=now_s) is True
        # then it is archived with retried 2, and processed and failed count 3
        assert_state(client, expected(captured("05-failure-retry-archive", 4)))

    def test_shutdown_requeues_the_task_at_the_head_without_pending_since(
        self, client: redis.Redis
    ) -> None:
        before = captured("06-active-lease-heartbeat", 2)
        load(client, before)
        assert requeue(client, message(before, "busy-1")) is True
        assert_state(client, expected(captured("06-active-lease-heartbeat", 3)))

    def test_a_requeued_task_is_taken_before_older_pending_ones(self, client: redis.Redis) -> None:
        load(client, captured("03-process-success", 1))
        msg = take(client, now_s=at(1795413018))
        assert requeue(client, msg) is True
        assert client.lrange(K.pending, 0, -1) == [b"ok-2", b"ok-1"]

    def test_endings_of_a_task_a_recoverer_took_change_nothing(self, client: redis.Redis) -> None:
        # Given crash-1 moved to retry by a recoverer after its lease expired,
        # when the worker that held it ends its attempt after all
        after = captured("10-crash-lease-recovery", 4)
        load(client, after)
        held = message(captured("10-crash-lease-recovery", 3), "crash-1")
        now_s = at(1795413120)
        # then every ending answers False and Redis is untouched
        assert done(client, held, now_s=now_s) is False
        assert mark_complete(client, held, now_s=now_s) is False
        assert (
            retry(client, held, retry_at_s=now_s, error="x", is_failure=True, now_s=now_s) is False
        )
        assert archive(client, held, error="x", now_s=now_s) is False
        assert requeue(client, held) is False
        assert_state(client, expected(after))

    def test_the_totals_start_again_at_1_after_max_int64(self, client: redis.Redis) -> None:
        load(client, captured("03-process-success", 3))
        client.set(K.processed_total, MAX_INT64)
        now_s = at(1795413020.5)
        assert done(client, take(client, now_s=now_s), now_s=now_s)
        assert client.get(K.processed_total) == b"1"
        client.flushdb()
        load(client, captured("05-failure-retry-archive", 0))
        client.set(K.processed_total, MAX_INT64)
        client.set(K.failed_total, 5)
        msg = take(client, now_s=now_s)
        assert retry(client, msg, retry_at_s=now_s, error="x", is_failure=True, now_s=now_s)
        assert (client.get(K.processed_total), client.get(K.failed_total)) == (b"1", b"1")


class TestHousekeeping:
    """forward, lease_expired, delete_expired_completed and the archive trim are Asynq's."""

    def test_forward_moves_a_due_scheduled_task_to_pending(self, client: redis.Redis) -> None:
        # Given three scheduled tasks, one due at ...016, when the forwarder runs
        load(client, captured("02-enqueue-scheduled", 2))
        forwarded_s = at(1795413016.4)
        assert forward(client, Q, now_s=forwarded_s) == 1
        # then only that one is pending, since then, and a worker runs it
        assert client.lrange(K.pending, 0, -1) == [b"sched-soon"]
        since_ns = int(client.hget(K.task("sched-soon"), "pending_since"))  # type: ignore[arg-type]
        assert since_ns / 1e9 == pytest.approx(forwarded_s, abs=1e-3)
        assert client.hget(K.task("sched-soon"), "state") == b"pending"
        now_s = at(1795413016.6)
        assert done(client, take(client, now_s=now_s), now_s=now_s)
        assert_state(client, expected(captured("02-enqueue-scheduled", 3)))

    def test_forward_moves_a_due_retry_into_a_paused_queue(self, client: redis.Redis) -> None:
        # Given fail-1 in retry and the queue paused, when the retry is due
        load(client, captured("05-failure-retry-archive", 1))
        after = captured("05-failure-retry-archive", 2)
        paused = after["keys"][K.paused]
        load(client, {"keys": {K.paused: paused}})
        assert peek(client, Q) == PAUSED
        forwarded_s = int(raw(after["keys"][K.task("fail-1")]["value"]["pending_since"])) / 1e9
        assert forward(client, Q, now_s=forwarded_s) == 1
        # then it is pending again (nothing takes it while paused)
        assert_state(client, expected(after))
        assert peek(client, Q) == PAUSED
        assert claim(client, Q, "fail-1", lease_until_s=100) is None

    def test_forward_leaves_what_is_not_due(self, client: redis.Redis) -> None:
        before = captured("02-enqueue-scheduled", 2)
        load(client, before)
        assert forward(client, Q, now_s=at(1795413015.99)) == 0
        assert dump(client) == expected(before)

    def test_forward_sends_a_grouped_task_to_its_group(self, client: redis.Redis) -> None:
        msg = TaskMessage(type="t", id="g-1", queue=Q, retry=25, group_key="batch-a")
        client.zadd(K.scheduled, {"g-1": 1000})
        client.hset(
            K.task("g-1"),
            mapping={"msg": encode_task_message(msg), "state": "scheduled", "group": "batch-a"},
        )
        assert forward(client, Q, now_s=1000.7) == 1
        assert client.zrange(K.group("batch-a"), 0, -1, withscores=True) == [(b"g-1", 1000.0)]
        assert client.hgetall(K.task("g-1")) == {
            b"msg": encode_task_message(msg),
            b"state": b"aggregating",
            b"group": b"batch-a",
        }
        assert not client.exists(K.scheduled, K.pending)

    def test_forward_moves_every_due_task_in_batches_in_asynqs_order(
        self, client: redis.Redis
    ) -> None:
        scheduled = [f"s{i:03d}" for i in range(250)]
        retried = [f"r{i}" for i in range(3)]
        client.zadd(K.scheduled, {task_id: 1000 + i for i, task_id in enumerate(scheduled)})
        client.zadd(K.scheduled, {"later": 5000})
        client.zadd(K.retry, {task_id: 900 + i for i, task_id in enumerate(retried)})
        for task_id in [*scheduled, *retried, "later"]:
            client.hset(K.task(task_id), "state", "scheduled")
        assert forward(client, Q, now_s=2000) == 253
        # Scheduled first, then retry, each by due time, every one LPUSHed.
        order = [*scheduled, *retried]
        assert client.lrange(K.pending, 0, -1) == [t.encode() for t in reversed(order)]
        assert client.zrange(K.scheduled, 0, -1) == [b"later"]
        assert client.hget(K.task("later"), "state") == b"scheduled"

    def test_the_recoverer_retries_a_task_whose_lease_expired(self, client: redis.Redis) -> None:
        # Given crash-1 active with its lease run out (its server was killed)
        load(client, captured("10-crash-lease-recovery", 3))
        after = captured("10-crash-lease-recovery", 4)
        now_s = at(1795413112.5)
        # when a recoverer runs, as Asynq's does
        assert lease_expired(client, Q, cutoff_s=at(1795413081) - 1) == []
        expired = lease_expired(client, Q, cutoff_s=now_s - LEASE_DURATION_S)
        assert [m.id for m in expired] == ["crash-1"]
        for msg in expired:
            assert msg.retried < msg.retry
            ok = retry(
                client,
                msg,
                retry_at_s=now_s + 3600,
                error=ERR_LEASE_EXPIRED,
                is_failure=True,
                now_s=now_s,
            )
            assert ok is True
        # then it waits in retry with Asynq's error, retried 1, counted as failed
        assert_state(client, expected(after))

    def test_the_recoverer_archives_a_task_out_of_retries(self, client: redis.Redis) -> None:
        before = captured("10-crash-lease-recovery", 3)
        load(client, before)
        spent = dataclasses.replace(message(before, "crash-1"), retried=3)
        client.hset(K.task("crash-1"), "msg", encode_task_message(spent))
        now_s = at(1795413112.5)
        (msg,) = lease_expired(client, Q, cutoff_s=now_s - LEASE_DURATION_S)
        assert msg.retried >= msg.retry
        assert archive(client, msg, error=ERR_LEASE_EXPIRED, now_s=now_s) is True
        assert client.zrange(K.archived, 0, -1, withscores=True) == [
            (b"crash-1", float(math.floor(now_s)))
        ]
        stored = decode_task_message(client.hget(K.task("crash-1"), "msg"))  # type: ignore[arg-type]
        assert stored == dataclasses.replace(
            spent, error_msg=ERR_LEASE_EXPIRED, last_failed_at=math.floor(now_s)
        )
        assert not client.exists(K.active, K.lease)

    def test_lease_expired_skips_an_id_without_its_task(self, client: redis.Redis) -> None:
        client.zadd(K.lease, {"ghost": 10})
        assert lease_expired(client, Q, cutoff_s=20) == []

    def test_the_janitor_deletes_completed_tasks_past_their_retention(
        self, client: redis.Redis
    ) -> None:
        before = captured("04-process-success-retention", 1)
        load(client, before)
        expiry = at(1795416620)  # completed_at + retention
        assert delete_expired_completed(client, Q, now_s=expiry - 0.1) == 0
        assert dump(client) == expected(before)
        assert delete_expired_completed(client, Q, now_s=expiry) == 1
        want = {
            k: v for k, v in expected(before).items() if k not in (K.completed, K.task("keep-1"))
        }
        assert dump(client) == want

    def test_the_janitor_deletes_in_batches(self, client: redis.Redis) -> None:
        ids = [f"c{i}" for i in range(250)]
        client.zadd(K.completed, {task_id: 1000 + i for i, task_id in enumerate(ids)})
        client.zadd(K.completed, {"kept": 3000})
        for task_id in [*ids, "kept"]:
            client.hset(K.task(task_id), "state", "completed")
        assert delete_expired_completed(client, Q, now_s=2000, batch=100) == 250
        assert client.zrange(K.completed, 0, -1) == [b"kept"]
        assert sorted(client.keys()) == sorted([K.completed.encode(), K.task("kept").encode()])

    def test_archive_drops_tasks_archived_90_days_ago_or_more(self, client: redis.Redis) -> None:
        now_s = 1_800_000_000.5
        cutoff = math.floor(now_s) - ARCHIVE_MAX_AGE_S
        old = {"older": cutoff - 5, "exactly-90-days": cutoff, "younger": cutoff + 1}
        client.zadd(K.archived, old)
        for task_id in old:
            client.hset(K.task(task_id), "state", "archived")
        msg = TaskMessage(type="t", id="dead-1", queue=Q)
        active_task(client, msg, lease_until_s=now_s + 30)
        assert archive(client, msg, error="boom", now_s=now_s) is True
        assert client.zrange(K.archived, 0, -1) == [b"younger", b"dead-1"]
        assert not client.exists(K.task("older"), K.task("exactly-90-days"))
        assert client.hget(K.task("younger"), "state") == b"archived"

    def test_archive_trims_more_old_tasks_than_lua_unpacks_at_once(
        self, client: redis.Redis
    ) -> None:
        now_s = 1_800_000_000.0
        client.zadd(K.archived, {f"old-{i}": 1000 + i for i in range(9000)})
        msg = TaskMessage(type="t", id="dead-1", queue=Q)
        active_task(client, msg, lease_until_s=now_s + 30)
        assert archive(client, msg, error="boom", now_s=now_s) is True
        assert client.zrange(K.archived, 0, -1) == [b"dead-1"]

    @pytest.mark.parametrize(("already", "dropped"), [(9998, 0), (9999, 1), (10_000, 2)])
    def test_archive_keeps_at_most_9999_tasks_as_asynq_does(
        self, client: redis.Redis, already: int, dropped: int
    ) -> None:
        now_s = 1_800_000_000.0
        ids = [f"a{i:05d}" for i in range(already)]
        client.zadd(K.archived, {task_id: now_s - 50_000 + i for i, task_id in enumerate(ids)})
        for task_id in ids[:3]:
            client.hset(K.task(task_id), "state", "archived")
        msg = TaskMessage(type="t", id="dead-1", queue=Q)
        active_task(client, msg, lease_until_s=now_s + 30)
        assert archive(client, msg, error="boom", now_s=now_s) is True
        # Asynq's ZRANGE 0 -10000 leaves 9999 once the archive reaches 10000.
        assert client.zcard(K.archived) == min(already + 1, 9999)
        assert client.zscore(K.archived, "dead-1") == math.floor(now_s)
        for task_id in ids[:dropped]:
            assert client.zscore(K.archived, task_id) is None
            assert not client.exists(K.task(task_id))
        for task_id in ids[dropped:3]:
            assert client.exists(K.task(task_id))


class TestAsynqsConstants:
    """The error text, retry delay and lock names are Asynq's."""

    def test_the_lease_expired_error_is_the_one_asynq_writes(self) -> None:
        recovered = message(captured("10-crash-lease-recovery", 4), "crash-1")
        assert recovered.error_msg == ERR_LEASE_EXPIRED == "asynq: task lease expired"

    @pytest.mark.parametrize("retried", [0, 1, 2, 5, 24])
    def test_the_default_retry_delay_is_sidekiqs_formula(self, retried: int) -> None:
        rng = random.Random(retried)
        delays = {default_retry_delay(retried, RuntimeError("x"), rng=rng) for _ in range(300)}
        base = retried**4 + 15
        assert delays == {float(base + k * (retried + 1)) for k in range(30)}
        assert base <= default_retry_delay(retried) <= base + 29 * (retried + 1)

    def test_the_uniqueness_lock_is_named_as_asynq_names_it(self) -> None:
        msg = message(captured("02-enqueue-scheduled", 1), "sched-unique")
        assert K.unique(msg.type, msg.payload) == msg.unique_key
        assert K.unique("email:send", None) == "asynq:{default}:unique:email:send:"


class TestErrors:
    """Redis failures raise BackendError naming what could not be done."""

    def test_a_key_of_the_wrong_type_is_a_backend_error(self, client: redis.Redis) -> None:
        client.set(K.pending, "not a list")
        with pytest.raises(BackendError, match=r"oldest pending task of Asynq queue 'default'"):
            peek(client, Q)
        client.set(K.task("t1"), "not a hash")
        with pytest.raises(BackendError, match=r"result of asynq:\{default\}:t:t1"):
            write_result(client, Q, "t1", b"x")

    def test_an_unreachable_redis_is_a_backend_error(self) -> None:
        dead = redis.Redis(port=1, socket_connect_timeout=0.5)
        with pytest.raises(BackendError, match="unreachable"):
            forward(dead, Q, now_s=1000)
        with pytest.raises(BackendError, match="unreachable"):
            requeue(dead, TaskMessage(type="t", id="x", queue=Q))
