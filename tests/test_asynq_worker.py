"""The GPU-gated Asynq worker, end to end against real Redis servers.

Tasks are enqueued exactly as Asynq's Go client enqueues them (``enqueue``
below, checked byte for byte against the captures of Asynq v0.26.0's client
in ``tests/fixtures/asynq/01-enqueue-pending.json``), the worker runs them
through a real :class:`~gpugate.Gate` on simulated GPUs, and the state left in
Redis is read the way Asynq's inspector reads it. No independent Python
Asynq client is faithful to the format (docs/asynq.md), so the enqueuing
peer is this fixture-checked writer. Crash and SIGTERM tests run the worker
in a process of its own (``tests/asynq_worker_main.py``).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.cluster import RedisCluster
from redis.crc import key_slot

from asynq_support import assert_state, at, captured, expected, load
from conftest import empty_database, frozen
from gpugate import (
    BackendError,
    ConfigError,
    Gate,
    NoGpuSampler,
    Policy,
    SimulatedSampler,
    UsageError,
)
from gpugate.asynq import (
    AsynqKeys,
    AsynqWorker,
    RetryLater,
    RevokeTask,
    SkipRetry,
    Task,
    TaskMessage,
    decode_task_message,
    encode_task_message,
    pause_queue,
    read_queue,
    unpause_queue,
)
from gpugate.asynq import _broker as broker
from gpugate.asynq._keys import ALL_QUEUES
from gpugate.asynq._servers import list_servers, list_workers
from gpugate.metrics import Metrics
from gpugate.state._connect import connect
from gpugate.state._keys import PoolKeys
from gpugate.state._scripts import Scripts
from gpugate.state._server import (
    LocalCluster,
    RedisProcess,
    redis_server_candidates,
    server_version,
)

FIXTURES = Path(__file__).parent / "fixtures" / "asynq"
WORKER_MAIN = Path(__file__).parent / "asynq_worker_main.py"
ASYNQ_DB = 12
LOGS = Path(os.environ.get("GPUGATE_TEST_LOGS", "/tmp")) / "gpugate-asynq-worker-logs"
LOGS.mkdir(parents=True, exist_ok=True)

POLICY = {
    "pool": {"lease_ttl": "30s"},
    "classes": {
        "interactive": {"priority": 100, "queues": ["ocr:realtime"]},
        "batch": {"priority": 10, "queues": ["ocr:bulk", "default"]},
    },
}
FAST = {
    "heartbeat_interval": 0.2,
    "forward_interval": 0.2,
    "recover_interval": 0.3,
    "janitor_interval": 0.3,
    "task_check_interval": 0.05,
    "shutdown_timeout": 2.0,
}


# -- Asynq's Go client, as a fixture-checked writer --------------------------------


def enqueue(
    c: redis.Redis,
    queue: str,
    task_type: str,
    payload: bytes,
    *,
    task_id: str | None = None,
    max_retry: int = 25,
    timeout: int | None = None,
    deadline: int | None = None,
    retention: int = 0,
    process_at: float | None = None,
) -> str:
    """What ``client.Enqueue(NewTask(type, payload), opts...)`` writes (asynq v0.26.0)."""
    tid = task_id or str(uuid.uuid4())
    if timeout is None and deadline is None:
        timeout = 1800  # the client's default when neither is given
    msg = TaskMessage(
        type=task_type,
        payload=payload,
        id=tid,
        queue=queue,
        retry=max_retry,
        timeout=timeout or 0,
        deadline=deadline or 0,
        retention=retention,
    )
    k = AsynqKeys(queue)
    c.sadd(ALL_QUEUES, queue)
    if process_at is None:
        c.hset(
            k.task(tid),
            mapping={
                "msg": encode_task_message(msg),
                "state": "pending",
                "pending_since": str(time.time_ns()),
            },
        )
        c.lpush(k.pending, tid)
    else:
        c.hset(k.task(tid), mapping={"msg": encode_task_message(msg), "state": "scheduled"})
        c.zadd(k.scheduled, {tid: int(process_at)})
    return tid


def _b(v: dict[str, str]) -> bytes:
    return base64.b64decode(v["b64"])


@pytest.mark.parametrize(
    ("index", "kwargs"),
    [
        (1, {"max_retry": 3, "timeout": 60}),
        (2, {"deadline": 4102444800}),
        (3, {"deadline": 4102444800, "timeout": 60}),
        (6, {"retention": 600}),
        (9, {}),
    ],
)
def test_the_test_enqueuer_writes_what_asynqs_go_client_wrote(
    asynq: redis.Redis, index: int, kwargs: dict[str, Any]
) -> None:
    with open(FIXTURES / "01-enqueue-pending.json", encoding="utf-8") as f:
        st = json.load(f)["steps"][index]
    tid = st["outcome"].rpartition("TaskInfo.ID = ")[2].strip()
    key = f"asynq:{{default}}:t:{tid}"
    captured = st["keys"][key]["value"]
    m = decode_task_message(_b(captured["msg"]))
    enqueue(asynq, "default", m.type, m.payload, task_id=tid, **kwargs)
    ours = asynq.hgetall(key)
    assert ours[b"msg"] == _b(captured["msg"])
    assert sorted(ours) == sorted(k.encode() for k in captured)
    assert ours[b"state"] == b"pending"
    assert asynq.lrange("asynq:{default}:pending", 0, -1) == [tid.encode()]


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def asynq_url(redis_server: RedisProcess) -> str:
    base, _, _db = redis_server.url.rpartition("/")
    return f"{base}/{ASYNQ_DB}"


@pytest.fixture
def asynq(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    with empty_database(redis_server, ASYNQ_DB) as c:
        yield c


@pytest.fixture
def sampler(pool_name: str) -> SimulatedSampler:
    return SimulatedSampler(["24GiB"], name=pool_name)


@pytest.fixture
def gate(redis_url: str, pool_name: str, sampler: SimulatedSampler) -> Iterator[Gate]:
    g = Gate(
        redis_url,
        pool=pool_name,
        policy=Policy.from_dict(POLICY),
        sampler=sampler,
        metrics=Metrics(CollectorRegistry()),
    )
    yield g
    g.close()


@contextmanager
def serving(worker: AsynqWorker) -> Iterator[AsynqWorker]:
    """``worker.run()`` in a thread for the block; stopped and joined after."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield worker
    finally:
        worker.stop()
        t.join(30)
        assert not t.is_alive(), "the worker did not shut down"
        assert not errors, errors


def wait_until(condition: Callable[[], Any], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout_s}s")
        time.sleep(0.02)


def make_worker(gate: Gate, asynq_url: str, **kw: Any) -> AsynqWorker:
    return AsynqWorker(gate, asynq_redis=asynq_url, **{**FAST, **kw})


def task_state(c: redis.Redis, queue: str, tid: str) -> dict[str, Any]:
    raw = c.hgetall(AsynqKeys(queue).task(tid))
    out: dict[str, Any] = {k.decode(): v for k, v in raw.items()}
    if "msg" in out:
        out["msg"] = decode_task_message(out["msg"])
    return out


def today(c: redis.Redis, what: str, queue: str) -> int:
    day = time.strftime("%Y-%m-%d", time.gmtime())
    return int(c.get(f"asynq:{{{queue}}}:{what}:{day}") or 0)


# -- success, failure, archive ---------------------------------------------------------


class TestLifecycle:
    def test_a_worker_that_cannot_read_its_pools_queues_says_so(self) -> None:
        # Nothing listens there: the gate cannot read the pool's policy, so
        # the worker cannot know which queues it serves (not "belongs to no class").
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
        gate = Gate(url, pool="nowhere", sampler=SimulatedSampler(["80GiB"]), socket_timeout_s=0.3)
        try:
            for queues in (None, ["ocr:bulk"]):
                with pytest.raises(BackendError, match="cannot read pool 'nowhere'"):
                    AsynqWorker(gate, queues=queues, asynq_redis=url, **FAST)
        finally:
            gate.close()

    def test_tasks_run_and_leave_the_state_asynqs_server_leaves(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        ran: list[str] = []
        worker = make_worker(gate, asynq_url)

        @worker.handle("ocr:page", vram="2GiB")
        def page(task: Task) -> None:
            assert task.ticket is not None
            assert task.ticket.device_uuid is not None
            ran.append(task.id)

        ids = [enqueue(asynq, "ocr:bulk", "ocr:page", b'{"n":%d}' % i) for i in range(3)]
        with serving(worker):
            wait_until(lambda: int(asynq.get("asynq:{ocr:bulk}:processed") or 0) == 3)
            wait_until(lambda: worker.stats["done"] == 3)
        assert ran == ids  # oldest first, as Asynq dequeues
        for tid in ids:
            assert not asynq.exists(AsynqKeys("ocr:bulk").task(tid))
        q = read_queue(asynq, "ocr:bulk")
        assert (q.pending, q.active, q.retry, q.archived) == (0, 0, 0, 0)
        assert (q.processed_today, q.failed_today, q.failed_total) == (3, 0, 0)
        assert asynq.zcard("asynq:{ocr:bulk}:lease") == 0
        assert (
            asynq.ttl(f"asynq:{{ocr:bulk}}:processed:{time.strftime('%Y-%m-%d', time.gmtime())}")
            > 80 * 86400
        )
        # Registration is gone after a clean shutdown, as Asynq's ClearServerState.
        assert list_servers(asynq) == []
        assert gate.leases_held() == []

    def test_a_failure_goes_to_retry_with_asynqs_backoff_and_counts(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            raise ValueError("page 3 is blank")

        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"x", max_retry=5)
        before = time.time()
        with serving(worker):
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:retry") == 1)
        after = time.time()
        st = task_state(asynq, "ocr:bulk", tid)
        assert st["state"] == b"retry"
        assert "pending_since" not in st
        m = st["msg"]
        assert (m.retried, m.error_msg) == (1, "page 3 is blank")
        assert before - 1 <= m.last_failed_at <= after + 1
        # Asynq's default delay for the first retry: 0^4 + 15 + rand(30) * 1 seconds.
        score = asynq.zscore("asynq:{ocr:bulk}:retry", tid)
        assert score is not None
        assert before + 15 - 1 <= score <= after + 45 + 1
        q = read_queue(asynq, "ocr:bulk")
        assert (q.processed_total, q.failed_total, q.processed_today, q.failed_today) == (
            1,
            1,
            1,
            1,
        )
        assert gate.leases_held() == []

    def test_exhausted_retries_archive_the_task(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        attempts: list[int] = []
        worker = make_worker(gate, asynq_url, retry_delay=lambda n, e, t: 0)

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            attempts.append(task.retried)
            raise RuntimeError("still failing")

        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"x", max_retry=2)
        with serving(worker):
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:archived") == 1)
        assert attempts == [0, 1, 2]
        st = task_state(asynq, "ocr:bulk", tid)
        assert st["state"] == b"archived"
        assert (st["msg"].retried, st["msg"].error_msg) == (2, "still failing")
        q = read_queue(asynq, "ocr:bulk")
        assert (q.processed_total, q.failed_total, q.retry, q.pending) == (3, 3, 0, 0)

    def test_skip_retry_archives_and_revoke_drops_as_done(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)

        @worker.handle("skip", vram="1GiB")
        def skip(task: Task) -> None:
            raise SkipRetry("corrupt input")

        @worker.handle("revoke", vram="1GiB")
        def revoke(task: Task) -> None:
            raise RevokeTask()

        a = enqueue(asynq, "ocr:bulk", "skip", b"")
        b = enqueue(asynq, "ocr:bulk", "revoke", b"")
        kept = enqueue(asynq, "ocr:bulk", "revoke", b"", retention=600)
        with serving(worker):
            wait_until(lambda: worker.stats["archived"] == 1 and worker.stats["done"] == 2)
        assert task_state(asynq, "ocr:bulk", a)["msg"].error_msg == "corrupt input"
        assert not asynq.exists(AsynqKeys("ocr:bulk").task(b))
        # As Asynq's RevokeTask: deleted whatever its retention, not kept completed.
        assert not asynq.exists(AsynqKeys("ocr:bulk").task(kept))
        assert asynq.zcard("asynq:{ocr:bulk}:completed") == 0

    def test_retry_later_keeps_the_retry_count_and_counts_nothing(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            raise RetryLater("10m", "upstream API quota")

        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"")
        before = time.time()
        with serving(worker):
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:retry") == 1)
        m = task_state(asynq, "ocr:bulk", tid)["msg"]
        assert (m.retried, m.error_msg) == (0, "upstream API quota")
        score = asynq.zscore("asynq:{ocr:bulk}:retry", tid)
        assert score is not None
        assert before + 590 <= score <= time.time() + 601
        q = read_queue(asynq, "ocr:bulk")
        assert (q.processed_total, q.failed_total) == (0, 0)

    def test_retry_later_with_no_retries_left_archives_as_asynq(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        # Asynq checks retried >= max retry before it asks whether the error is a failure.
        worker = make_worker(gate, asynq_url)

        @worker.handle("later", vram="1GiB")
        def later(task: Task) -> None:
            raise RetryLater("1s")

        tid = enqueue(asynq, "ocr:bulk", "later", b"", max_retry=0)
        with serving(worker):
            wait_until(lambda: worker.stats["archived"] == 1)
        assert task_state(asynq, "ocr:bulk", tid)["state"] == b"archived"
        assert asynq.zcard("asynq:{ocr:bulk}:retry") == 0

    def test_is_failure_is_asked_of_the_workers_own_failures_too(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        seen: list[str] = []

        def is_failure(exc: BaseException) -> bool:
            seen.append(str(exc))
            return False

        worker = make_worker(gate, asynq_url, is_failure=is_failure)
        worker.handle("slow", lambda task: task.wait_cancelled(30), vram="1GiB")
        tid = enqueue(asynq, "ocr:bulk", "slow", b"", timeout=1)
        with serving(worker):
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:retry") == 1)
        assert seen == ["context deadline exceeded"]
        m = task_state(asynq, "ocr:bulk", tid)["msg"]
        assert (m.retried, m.error_msg) == (0, "context deadline exceeded")  # not a failure
        assert read_queue(asynq, "ocr:bulk").failed_total == 0

    def test_retention_keeps_the_task_completed_with_its_result(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            assert task.write_result(b"text of the page") == 16

        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"", retention=3600)
        with serving(worker):
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:completed") == 1)
        st = task_state(asynq, "ocr:bulk", tid)
        assert (st["state"], st["result"]) == (b"completed", b"text of the page")
        assert abs(st["msg"].completed_at - time.time()) < 60
        score = asynq.zscore("asynq:{ocr:bulk}:completed", tid)
        assert score is not None
        assert abs(score - (st["msg"].completed_at + 3600)) <= 1

    def test_async_handlers_run_on_the_workers_event_loop(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        import asyncio

        seen: list[str] = []
        worker = make_worker(gate, asynq_url, concurrency=3)

        @worker.handle("embed", vram="1GiB")
        async def embed(task: Task) -> None:
            await asyncio.sleep(0.05)
            seen.append(task.payload.decode())

        for i in range(6):
            enqueue(asynq, "ocr:bulk", "embed", str(i).encode())
        with serving(worker):
            wait_until(lambda: len(seen) == 6)
            wait_until(lambda: worker.stats["done"] == 6)
        assert sorted(seen) == [str(i) for i in range(6)]

    def test_a_task_past_its_timeout_fails_as_asynqs_deadline(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)
        stopped = threading.Event()

        @worker.handle("slow", vram="1GiB")
        def slow(task: Task) -> None:
            task.wait_cancelled(30)
            stopped.set()

        tid = enqueue(asynq, "ocr:bulk", "slow", b"", timeout=1)
        with serving(worker):
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:retry") == 1)
            wait_until(stopped.is_set)
        m = task_state(asynq, "ocr:bulk", tid)["msg"]
        assert (m.retried, m.error_msg) == (1, "context deadline exceeded")

    def test_an_unknown_task_type_fails_as_in_asynq(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)
        worker.handle("known", lambda task: None, vram="1GiB")
        tid = enqueue(asynq, "ocr:bulk", "unknown:type", b"")
        with serving(worker):
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:retry") == 1)
        m = task_state(asynq, "ocr:bulk", tid)["msg"]
        assert m.error_msg == 'handler not found for task "unknown:type"'


# -- the same states as Asynq's own server -------------------------------------------


class TestAsynqServerParity:
    """The worker, replaying what Asynq v0.26.0's server did in the captures.

    Each test loads the captured state before a Go server ran, runs our worker
    on it with its clock at the capture's time, stops it, and compares the
    whole keyspace with what the Go server left (asynq_support.assert_state:
    keys, types, TTL presence, lists, zset members and scores, hash fields,
    counters and decoded messages exactly). The servers' heartbeat keys are
    left out of the captures; ours are gone after a clean stop.
    """

    def test_processing_two_tasks(self, gate: Gate, asynq: redis.Redis, asynq_url: str) -> None:
        load(asynq, captured("03-process-success", 1))
        worker = make_worker(
            gate, asynq_url, queues={"default": "batch"}, clock=lambda: at(1795413017.9)
        )
        worker.handle("email:send", lambda task: None, vram="1GiB")
        with serving(worker):
            wait_until(lambda: worker.stats["done"] == 2)
        assert_state(asynq, expected(captured("03-process-success", 2)))

    def test_a_unique_task_releases_its_lock(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        load(asynq, captured("03-process-success", 3))
        worker = make_worker(
            gate, asynq_url, queues={"default": "batch"}, clock=lambda: at(1795413020.5)
        )
        worker.handle("email:send", lambda task: None, vram="1GiB")
        with serving(worker):
            wait_until(lambda: worker.stats["done"] == 1)
        assert_state(asynq, expected(captured("03-process-success", 4)))

    def test_retention_and_a_result(self, gate: Gate, asynq: redis.Redis, asynq_url: str) -> None:
        load(asynq, captured("04-process-success-retention", 0))
        worker = make_worker(
            gate, asynq_url, queues={"default": "batch"}, clock=lambda: at(1795413020.9)
        )

        @worker.handle("report:gen", vram="1GiB")
        def report(task: Task) -> None:
            task.write_result(b"done:" + task.id.encode())

        with serving(worker):
            wait_until(lambda: worker.stats["done"] == 1)
        assert_state(asynq, expected(captured("04-process-success-retention", 1)))

    def test_a_failure_waits_in_retry(self, gate: Gate, asynq: redis.Redis, asynq_url: str) -> None:
        load(asynq, captured("05-failure-retry-archive", 0))
        worker = make_worker(
            gate,
            asynq_url,
            queues={"default": "batch"},
            clock=lambda: at(1795413021.9),
            retry_delay=lambda retried, exc, task: 2,
        )

        @worker.handle("email:send", vram="1GiB")
        def fail(task: Task) -> None:
            raise RuntimeError("payload asked to fail")

        with serving(worker):
            wait_until(lambda: worker.stats["retried"] == 1)
        assert_state(asynq, expected(captured("05-failure-retry-archive", 1)))

    def test_a_scheduled_task_is_forwarded_and_run(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        load(asynq, captured("02-enqueue-scheduled", 2))
        worker = make_worker(
            gate, asynq_url, queues={"default": "batch"}, clock=lambda: at(1795413016.6)
        )
        worker.handle("email:send", lambda task: None, vram="1GiB")
        with serving(worker):
            wait_until(lambda: worker.stats["done"] == 1)
        assert_state(asynq, expected(captured("02-enqueue-scheduled", 3)))

    def test_shutdown_requeues_a_running_task(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        load(asynq, captured("06-active-lease-heartbeat", 0))
        started = threading.Event()
        worker = make_worker(gate, asynq_url, queues={"default": "batch"}, shutdown_timeout=0.2)

        @worker.handle("video:encode", vram="1GiB")
        def block(task: Task) -> None:
            started.set()
            task.wait_cancelled(30)

        with serving(worker):
            wait_until(started.is_set)
        assert worker.stats["requeued"] == 1
        assert_state(asynq, expected(captured("06-active-lease-heartbeat", 3)))

    def test_the_recoverer_takes_back_a_dead_servers_task(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        load(asynq, captured("10-crash-lease-recovery", 3))
        worker = make_worker(
            gate,
            asynq_url,
            queues={"default": "batch"},
            clock=lambda: at(1795413112.5),
            recover_grace=30,
            retry_delay=lambda retried, exc, task: 3600,
        )
        worker.handle("video:encode", lambda task: None, vram="1GiB")
        with serving(worker):
            wait_until(lambda: worker.stats["retried"] == 1)
        assert worker.stats["done"] == 0
        assert_state(asynq, expected(captured("10-crash-lease-recovery", 4)))


class TestCancellation:
    @staticmethod
    def worker_waiting_to_be_cancelled(
        gate: Gate, asynq_url: str
    ) -> tuple[AsynqWorker, threading.Event, threading.Event]:
        """A worker whose "slow" handler waits until cancelled: (worker, started, stopped)."""
        started, stopped = threading.Event(), threading.Event()
        worker = make_worker(gate, asynq_url)

        @worker.handle("slow", vram="1GiB")
        def slow(task: Task) -> None:
            started.set()
            if task.wait_cancelled(30):
                stopped.set()

        return worker, started, stopped

    def test_a_cancel_from_asynqmon_stops_the_handler_and_retries_the_task(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker, started, stopped = self.worker_waiting_to_be_cancelled(gate, asynq_url)
        tid = enqueue(asynq, "ocr:bulk", "slow", b"")
        with serving(worker):
            wait_until(started.is_set)
            # What AsynqMon's "cancel" and Inspector.CancelProcessing publish.
            wait_until(lambda: asynq.publish("asynq:cancel", tid) >= 1 and stopped.wait(0.5))
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:retry") == 1)
        m = task_state(asynq, "ocr:bulk", tid)["msg"]
        assert (m.retried, m.error_msg) == (1, "context canceled")

    def test_a_lost_gpu_lease_stops_the_handler_and_retries_the_task(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker, started, stopped = self.worker_waiting_to_be_cancelled(gate, asynq_url)
        tid = enqueue(asynq, "ocr:bulk", "slow", b"")
        with serving(worker):
            wait_until(started.is_set)
            (lease,) = gate.leases_held()
            # What `gpugate leases --expire ID` does: the GPU may be another job's now.
            keys = PoolKeys(gate.pool)
            Scripts(gate.client).release_lease(
                keys=[keys.state, keys.exp, keys.buckets],
                args=[keys.prefix, 0, lease.device_uuid, lease.id, "expired_by_operator", "0"],
            )
            gate.beat_now()  # the heartbeat finds it gone and tells the holder
            wait_until(stopped.is_set)
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:retry") == 1)
        assert (lease.lost, lease.lost_reason) == (True, "expired")
        m = task_state(asynq, "ocr:bulk", tid)["msg"]
        assert (m.retried, m.error_msg) == (1, "context canceled")

    def test_a_lease_taken_back_by_another_server_cancels_and_writes_nothing(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker, started, stopped = self.worker_waiting_to_be_cancelled(gate, asynq_url)
        tid = enqueue(asynq, "ocr:bulk", "slow", b"")
        with serving(worker):
            wait_until(started.is_set)
            # Another server's recoverer took it: the lease entry is gone.
            asynq.zrem("asynq:{ocr:bulk}:lease", tid)
            wait_until(stopped.is_set)
            wait_until(lambda: not worker._running)
        # Our attempt's end is not written: the task is as the recoverer left it.
        assert asynq.lrange("asynq:{ocr:bulk}:active", 0, -1) == [tid.encode()]
        assert task_state(asynq, "ocr:bulk", tid)["state"] == b"active"
        assert worker.stats["done"] == worker.stats["retried"] == 0
        assert gate.leases_held() == []


# -- faults: Redis lost at the end, shutdown, a handler past its deadline --------------


class TestFaults:
    def test_an_end_redis_did_not_take_is_written_at_a_later_heartbeat(
        self, redis_server: RedisProcess, pool_name: str
    ) -> None:
        # Redis hangs just as the handler returns: the done is written once it
        # answers, while the lease lasts (Asynq's syncer), not lost to a retry.
        server = RedisProcess(redis_server.executable).start()
        gate = Gate(
            server.url,
            pool=pool_name,
            policy=Policy.from_dict(POLICY),
            sampler=SimulatedSampler(["24GiB"]),
            socket_timeout_s=0.3,
            metrics=Metrics(CollectorRegistry()),
        )
        client = redis.Redis.from_url(server.url)
        started, finish = threading.Event(), threading.Event()
        runs: list[str] = []
        try:
            worker = AsynqWorker(gate, asynq_redis=gate.client, **{**FAST, "lease_duration": 20.0})

            @worker.handle("ocr:page", vram="1GiB")
            def page(task: Task) -> None:
                runs.append(task.id)
                started.set()
                finish.wait(30)

            tid = enqueue(client, "ocr:bulk", "ocr:page", b"")
            with serving(worker):
                wait_until(started.is_set)
                with frozen(server):
                    finish.set()
                    wait_until(lambda: worker._unwritten)  # the done timed out
                wait_until(lambda: worker.stats["done"] == 1, timeout_s=10)
            assert runs == [tid]
            assert not client.exists(AsynqKeys("ocr:bulk").task(tid))
            q = read_queue(client, "ocr:bulk")
            assert (q.active, q.retry, q.processed_total, q.failed_total) == (0, 0, 1, 0)
        finally:
            client.close()
            gate.close()
            server.stop()

    def test_an_end_written_again_leaves_a_later_attempt_alone(self, asynq: redis.Redis) -> None:
        # Attempt 1's retry timed out on the client but ran in Redis after all;
        # the task was retried and taken again (attempt 2). Attempt 1 writing
        # its end again must not end attempt 2 (two runs at once).
        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"", max_retry=5)
        now = time.time()
        first = broker.claim(asynq, "ocr:bulk", tid, lease_until_s=int(now) + 30)
        assert first is not None

        def retry_first(attempt_leases: str = "") -> bool:
            return broker.retry(
                asynq,
                first,
                retry_at_s=now,
                error="boom",
                is_failure=True,
                now_s=now,
                attempt_leases=attempt_leases,
            )

        assert retry_first()  # the try that "timed out"
        broker.forward(asynq, "ocr:bulk", now_s=now + 1)
        second = broker.claim(asynq, "ocr:bulk", tid, lease_until_s=int(now) + 45)
        assert second is not None
        assert second.retried == 1
        again = f"{int(now) + 30} 0"  # attempt 1's lease: confirmed, none tried
        assert not retry_first(attempt_leases=again)
        assert not broker.done(asynq, first, now_s=now, attempt_leases=again)
        assert not broker.archive(asynq, first, error="boom", now_s=now, attempt_leases=again)
        st = task_state(asynq, "ocr:bulk", tid)
        assert (st["state"], st["msg"].retried) == (b"active", 1)  # attempt 2's, untouched
        assert asynq.zscore("asynq:{ocr:bulk}:lease", tid) == int(now) + 45
        # Attempt 2 writing again with its own lease (one it tried to set) goes through.
        assert broker.done(asynq, second, now_s=now, attempt_leases=f"0 {int(now) + 45}")
        assert not asynq.exists(AsynqKeys("ocr:bulk").task(tid))

    def test_running_tasks_keep_their_lease_through_shutdown(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        # Asynq stops its heartbeater last: a task finishing within the
        # shutdown timeout keeps its lease, so no recoverer takes it meanwhile.
        started, finish = threading.Event(), threading.Event()
        worker = make_worker(
            gate, asynq_url, lease_duration=2.0, recover_grace=0.0, shutdown_timeout=20.0
        )

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            started.set()
            finish.wait(30)

        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"")
        with serving(worker):
            wait_until(started.is_set)
            worker.stop()
            time.sleep(3.0)  # longer than the lease: only extensions keep it ahead
            score = asynq.zscore("asynq:{ocr:bulk}:lease", tid)
            assert score is not None
            assert score > time.time()
            assert [s.status for s in list_servers(asynq)] == ["closed"]
            finish.set()
        assert worker.stats["done"] == 1
        assert worker.stats["requeued"] == 0
        assert read_queue(asynq, "ocr:bulk").processed_total == 1
        assert list_servers(asynq) == []

    def test_a_policy_dropping_a_served_class_does_not_stop_the_heartbeat(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str, redis_url: str
    ) -> None:
        started, finish = threading.Event(), threading.Event()
        worker = make_worker(gate, asynq_url, lease_duration=2.0, recover_grace=0.0)

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            started.set()
            finish.wait(30)

        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"")
        with serving(worker):
            wait_until(started.is_set)
            only = {"classes": {"interactive": POLICY["classes"]["interactive"]}}
            with Gate(
                redis_url, pool=gate.pool, policy=Policy.from_dict(only), register=False
            ) as operator:
                operator.sync_policy(force=True)  # `gpugate policy apply` without batch
            gate.beat_now()  # the worker's gate reads the new policy
            assert "batch" not in gate.effective_policy.classes
            waiting = enqueue(asynq, "ocr:bulk", "ocr:page", b"")  # its class unknown now
            time.sleep(3.0)  # longer than the lease: only extensions keep it
            score = asynq.zscore("asynq:{ocr:bulk}:lease", tid)
            assert score is not None
            assert score > time.time()
            finish.set()
            wait_until(lambda: worker.stats["done"] == 1)
        # The task of the dropped class waits; the worker ran on and stopped cleanly.
        assert asynq.lrange("asynq:{ocr:bulk}:pending", 0, -1) == [waiting.encode()]

    def test_a_handler_past_its_deadline_does_not_drop_the_next_attempt(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        # A plain handler keeps running past its attempt's end (here a cancel it
        # ignores); the retried task is taken again by this worker meanwhile.
        # When the first attempt returns, the second keeps its lease.
        second_started, first_may_return, second_may_return = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )
        attempts: list[int] = []
        worker = make_worker(
            gate,
            asynq_url,
            concurrency=2,
            lease_duration=2.0,
            recover_grace=0.0,
            retry_delay=lambda retried, exc, task: 0.0,
        )

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            attempts.append(task.retried)
            if len(attempts) == 1:
                first_may_return.wait(30)  # ignores the cancel
            else:
                second_started.set()
                second_may_return.wait(30)

        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"")
        with serving(worker):
            wait_until(lambda: attempts)
            wait_until(lambda: asynq.publish("asynq:cancel", tid) >= 1 and second_started.wait(0.5))
            first_may_return.set()
            time.sleep(2.5)  # longer than the lease: only extensions keep it
            score = asynq.zscore("asynq:{ocr:bulk}:lease", tid)
            assert score is not None
            assert score > time.time()
            assert [w.task_id for w in list_workers(asynq)] == [tid]
            second_may_return.set()
            wait_until(lambda: worker.stats["done"] == 1)
        assert attempts == [0, 1]
        q = read_queue(asynq, "ocr:bulk")
        assert (q.processed_total, q.failed_total, q.active, q.retry) == (2, 1, 0, 0)


# -- admission before dequeue ----------------------------------------------------------


class TestAdmission:
    def test_a_deferred_task_stays_pending_untouched_until_memory_frees(
        self, gate: Gate, sampler: SimulatedSampler, asynq: redis.Redis, asynq_url: str
    ) -> None:
        sampler.set_used(0, "20GiB")  # 4 GiB free: an 8 GiB task must wait
        worker = make_worker(gate, asynq_url)
        worker.handle("big", lambda task: None, vram="8GiB")
        tid = enqueue(asynq, "ocr:bulk", "big", b"")
        since = asynq.hget(AsynqKeys("ocr:bulk").task(tid), "pending_since")
        with serving(worker):
            wait_until(lambda: worker.stats["deferred"] >= 5)
            st = task_state(asynq, "ocr:bulk", tid)
            assert (st["state"], st["pending_since"], st["msg"].retried) == (b"pending", since, 0)
            assert asynq.lrange("asynq:{ocr:bulk}:pending", 0, -1) == [tid.encode()]
            q = read_queue(asynq, "ocr:bulk")
            assert (q.active, q.retry, q.processed_total, q.failed_total) == (0, 0, 0, 0)
            assert q.latency_s > 0
            sampler.set_used(0, "2GiB")
            wait_until(lambda: worker.stats["done"] == 1)
        assert read_queue(asynq, "ocr:bulk").processed_total == 1

    def test_the_higher_class_queue_is_served_first(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        order: list[str] = []
        worker = make_worker(gate, asynq_url, concurrency=1)

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            order.append(task.queue)

        for _ in range(3):
            enqueue(asynq, "ocr:bulk", "ocr:page", b"")
        for _ in range(3):
            enqueue(asynq, "ocr:realtime", "ocr:page", b"")
        assert list(worker.queues) == ["ocr:realtime", "ocr:bulk", "default"]
        with serving(worker):
            wait_until(lambda: len(order) == 6)
        assert order == ["ocr:realtime"] * 3 + ["ocr:bulk"] * 3

    def test_a_class_this_host_cannot_run_leaves_its_tasks_pending(
        self, redis_url: str, pool_name: str, asynq: redis.Redis, asynq_url: str
    ) -> None:
        # no_gpu = "reject" and no GPU here: the pool does not refuse the task,
        # this host cannot run it; another host may.
        pol = Policy.from_dict(
            {
                "pool": {"lease_ttl": "30s"},
                "classes": {"batch": {"priority": 10, "queues": ["ocr:bulk"], "no_gpu": "reject"}},
            }
        )
        gate = Gate(redis_url, pool=pool_name, policy=pol, sampler=NoGpuSampler())
        try:
            worker = make_worker(gate, asynq_url)
            worker.handle("ocr:page", lambda task: None, vram="1GiB")
            tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"")
            with serving(worker):
                wait_until(lambda: worker.stats["deferred"] >= 3)
            assert asynq.lrange("asynq:{ocr:bulk}:pending", 0, -1) == [tid.encode()]
            assert task_state(asynq, "ocr:bulk", tid)["state"] == b"pending"
            assert worker.stats["archived"] == 0
        finally:
            gate.close()

    def test_a_task_that_can_never_fit_is_archived_with_the_gates_reason(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)
        worker.handle("huge", lambda task: None, vram="100GiB")
        tid = enqueue(asynq, "ocr:bulk", "huge", b"")
        with serving(worker):
            wait_until(lambda: asynq.zcard("asynq:{ocr:bulk}:archived") == 1)
        m = task_state(asynq, "ocr:bulk", tid)["msg"]
        assert m.error_msg.startswith("gpugate: pool ")
        assert "too_large" in m.error_msg

    def test_a_class_cap_holds_across_worker_threads(
        self, redis_url: str, pool_name: str, asynq: redis.Redis, asynq_url: str
    ) -> None:
        policy = {"classes": {"batch": {"priority": 10, "max_concurrent": 2, "queues": ["q"]}}}
        gate = Gate(
            redis_url,
            pool=pool_name,
            policy=Policy.from_dict(policy),
            sampler=SimulatedSampler(["80GiB"], name=pool_name),
            metrics=Metrics(CollectorRegistry()),
        )
        lock = threading.Lock()
        now = [0]
        peak = [0]
        worker = make_worker(gate, asynq_url, concurrency=6)

        @worker.handle("t", vram="1GiB")
        def t(task: Task) -> None:
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            time.sleep(0.05)
            with lock:
                now[0] -= 1

        for _ in range(12):
            enqueue(asynq, "q", "t", b"")
        try:
            with serving(worker):
                wait_until(lambda: worker.stats["done"] == 12)
        finally:
            gate.close()
        assert peak[0] == 2


# -- pause, registration, configuration -----------------------------------------------


class TestOperations:
    def test_a_paused_queue_is_not_dequeued_and_runs_after_resume(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)
        worker.handle("ocr:page", lambda task: None, vram="1GiB")
        pause_queue(asynq, "ocr:bulk", duration="10m", who="test", reason="incident")
        tid = enqueue(asynq, "ocr:bulk", "ocr:page", b"")
        with serving(worker):
            time.sleep(1.0)  # many dispatch rounds at 0.05 s
            assert asynq.exists("asynq:{ocr:bulk}:paused")
            assert asynq.lrange("asynq:{ocr:bulk}:pending", 0, -1) == [tid.encode()]
            assert worker.stats["done"] == 0
            unpause_queue(asynq, "ocr:bulk")
            wait_until(lambda: worker.stats["done"] == 1)

    def test_the_worker_is_listed_where_asynqmon_lists_servers_and_workers(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        release = threading.Event()
        worker = make_worker(gate, asynq_url, concurrency=2)

        @worker.handle("ocr:page", vram="1GiB")
        def page(task: Task) -> None:
            release.wait(20)

        tid = enqueue(asynq, "ocr:realtime", "ocr:page", b'{"p":1}')
        with serving(worker):
            wait_until(lambda: any(w.task_id == tid for w in list_workers(asynq)))
            (server,) = list_servers(asynq)
            assert (server.host, server.pid, server.server_id) == (
                worker.host,
                os.getpid(),
                worker.server_id,
            )
            assert server.concurrency == 2
            assert server.status == "active"
            assert dict(server.queues) == {"ocr:realtime": 100, "ocr:bulk": 10, "default": 10}
            (w,) = list_workers(asynq)
            assert (w.task_type, w.task_payload, w.queue) == (
                "ocr:page",
                b'{"p":1}',
                "ocr:realtime",
            )
            assert w.deadline_ns is not None
            assert w.start_time_ns is not None
            assert w.deadline_ns - w.start_time_ns == pytest.approx(1800e9, rel=0.01)
            # The Asynq lease is extended by the heartbeat: now + 30 s.
            wait_until(
                lambda: (asynq.zscore("asynq:{ocr:realtime}:lease", tid) or 0) >= time.time() + 29
            )
            release.set()
        assert list_servers(asynq) == []
        assert list_workers(asynq) == []

    def test_scheduled_tasks_are_forwarded_when_due(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)
        worker.handle("ocr:page", lambda task: None, vram="1GiB")
        enqueue(asynq, "ocr:bulk", "ocr:page", b"", process_at=time.time() - 1)
        later = enqueue(asynq, "ocr:bulk", "ocr:page", b"", process_at=time.time() + 3600)
        with serving(worker):
            wait_until(lambda: worker.stats["done"] == 1)
        assert asynq.zrange("asynq:{ocr:bulk}:scheduled", 0, -1) == [later.encode()]

    def test_a_queue_whose_oldest_task_is_unreadable_does_not_stop_the_others(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str
    ) -> None:
        worker = make_worker(gate, asynq_url)
        worker.handle("ocr:page", lambda task: None, vram="1GiB")
        asynq.lpush("asynq:{ocr:realtime}:pending", "no-such-task")  # an id without its hash
        enqueue(asynq, "ocr:bulk", "ocr:page", b"")
        with serving(worker):
            wait_until(lambda: worker.stats["done"] == 1)
        assert asynq.lrange("asynq:{ocr:realtime}:pending", 0, -1) == [b"no-such-task"]

    def test_the_fix_for_an_unmapped_queue_names_a_class_the_policy_has(
        self, redis_url: str, pool_name: str, asynq_url: str
    ) -> None:
        # Given a policy without a class "batch", and no queues of its classes
        policy = Policy.from_dict(
            {"classes": {"gold": {"priority": 10}, "bronze": {"priority": 1}}}
        )
        with Gate(redis_url, pool=pool_name, policy=policy, register=False) as gate:
            # When a worker is given a queue no class has, or none at all
            with pytest.raises(ConfigError) as unmapped:
                AsynqWorker(gate, queues=["nosuch"], asynq_redis=asynq_url)
            with pytest.raises(ConfigError) as unnamed:
                AsynqWorker(gate, asynq_redis=asynq_url)
        # Then each fix maps it to a class of the policy (its lowest), not "batch"
        assert "queues={'nosuch': 'bronze'}" in str(unmapped.value)
        assert "queues={'ocr:bulk': 'bronze'}" in str(unnamed.value)

    def test_bad_configuration_is_refused_with_the_fix(self, gate: Gate, asynq_url: str) -> None:
        with pytest.raises(ConfigError, match="belongs to no class"):
            AsynqWorker(gate, queues=["nope"], asynq_redis=asynq_url)
        with pytest.raises(UsageError, match="unknown class"):
            AsynqWorker(gate, queues={"x": "gold"}, asynq_redis=asynq_url)
        with pytest.raises(ConfigError, match="concurrency"):
            AsynqWorker(gate, concurrency=0, asynq_redis=asynq_url)
        with pytest.raises(ConfigError, match="shorter than"):
            AsynqWorker(gate, heartbeat_interval="40s", asynq_redis=asynq_url)
        with pytest.raises(UsageError, match="no handler"):
            AsynqWorker(gate, asynq_redis=asynq_url).run()


# -- other processes: SIGTERM, SIGKILL, many workers -------------------------------------


def spawn(
    redis_url: str,
    asynq_url: str,
    pool: str,
    mode: str,
    extra: dict[str, Any] | None = None,
    **worker: Any,
) -> subprocess.Popen[str]:
    config = {
        **(extra or {}),
        "redis_url": redis_url,
        "asynq_url": asynq_url,
        "pool": pool,
        "queue": "video",
        "cls": "batch",
        "type": "video:encode",
        "mode": mode,
        "worker": {**FAST, **worker},
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # The child keeps its own descriptor of the log; ours is closed at once.
    with open(LOGS / f"worker-{uuid.uuid4().hex[:8]}.log", "w") as log:
        p = subprocess.Popen(
            [sys.executable, str(WORKER_MAIN), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    p.stdout.close()
    assert line == "ready", f"the worker did not start; see {log.name}"
    return p


def ran(asynq: redis.Redis) -> list[tuple[int, str]]:
    """(pid, task id) of every handler call, oldest first."""
    out = []
    for item in reversed(asynq.lrange("test:ran", 0, -1)):
        pid, _, tid = item.decode().partition(":")
        out.append((int(pid), tid))
    return out


class TestProcesses:
    def test_sigterm_puts_an_unfinished_task_back_at_the_head_as_asynq(
        self, redis_url: str, pool_name: str, asynq: redis.Redis, asynq_url: str
    ) -> None:
        tid = enqueue(asynq, "video", "video:encode", b'{"v":1}')
        enqueue(asynq, "video", "video:encode", b'{"v":2}')
        p = spawn(redis_url, asynq_url, pool_name, "block", shutdown_timeout=0.5)
        try:
            wait_until(lambda: len(ran(asynq)) == 1)
            assert asynq.lrange("asynq:{video}:active", 0, -1) == [tid.encode()]
            p.send_signal(signal.SIGTERM)
            assert p.wait(20) == 0
        finally:
            p.kill()
        # Requeued at the dequeue end (RPUSH), state pending, no pending_since, as Asynq.
        assert asynq.lrange("asynq:{video}:pending", -1, -1) == [tid.encode()]
        st = task_state(asynq, "video", tid)
        assert st["state"] == b"pending"
        assert "pending_since" not in st
        assert st["msg"].retried == 0
        assert asynq.llen("asynq:{video}:active") == 0
        assert asynq.zcard("asynq:{video}:lease") == 0
        assert list_servers(asynq) == []
        assert not asynq.keys("asynq:workers*")

    def test_a_task_of_a_killed_worker_is_recovered_and_run_again(
        self, redis_url: str, pool_name: str, asynq: redis.Redis, asynq_url: str
    ) -> None:
        tid = enqueue(asynq, "video", "video:encode", b'{"v":2}', max_retry=3)
        short = {"lease_duration": 2.0, "heartbeat_interval": 0.5}
        victim = spawn(redis_url, asynq_url, pool_name, "block", **short)
        try:
            wait_until(lambda: len(ran(asynq)) == 1)
        finally:
            victim.kill()  # SIGKILL: no shutdown code runs
            victim.wait(10)
        assert asynq.lrange("asynq:{video}:active", 0, -1) == [tid.encode()]
        rescuer = spawn(
            redis_url, asynq_url, pool_name, "ok", {"retry_delay_s": 0}, recover_grace=0.5, **short
        )
        try:
            wait_until(lambda: int(asynq.get("asynq:{video}:processed") or 0) == 2, 30)
        finally:
            rescuer.send_signal(signal.SIGTERM)
            rescuer.wait(20)
        calls = ran(asynq)
        assert [t for _, t in calls] == [tid, tid]
        assert calls[0][0] == victim.pid
        assert calls[1][0] == rescuer.pid
        # The crash cost one failed attempt (Asynq #1015), and the task is done.
        q = read_queue(asynq, "video")
        assert (q.processed_total, q.failed_total, q.pending, q.active, q.retry) == (2, 1, 0, 0, 0)
        assert not asynq.exists(AsynqKeys("video").task(tid))

    def test_many_worker_processes_run_each_task_once_within_the_class_cap(
        self, redis_url: str, pool_name: str, asynq: redis.Redis, asynq_url: str
    ) -> None:
        # Two tasks at a time per process, three in the pool: no process can hold
        # the whole cap, so the tasks are shared whichever process is quickest
        # to claim (and 4 x 2 slots would exceed the cap without the gate).
        procs = [
            spawn(redis_url, asynq_url, pool_name, "count", {"max_concurrent": 3}, concurrency=2)
            for _ in range(4)
        ]
        ids = {enqueue(asynq, "video", "video:encode", b"%d" % i) for i in range(60)}
        try:
            wait_until(lambda: int(asynq.get("asynq:{video}:processed") or 0) == 60, 60)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(20)
        calls = ran(asynq)
        assert sorted(t for _, t in calls) == sorted(ids)  # each exactly once
        assert len({pid for pid, _ in calls}) > 1  # shared between processes
        assert 1 <= int(asynq.get("test:peak") or 0) <= 3
        q = read_queue(asynq, "video")
        assert (q.pending, q.active, q.failed_total, q.retry) == (0, 0, 0, 0)


# -- Redis Cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    """A Redis Cluster of three masters for this module."""
    candidates = redis_server_candidates()
    if not candidates:
        pytest.skip("no redis-server found to run a Redis Cluster")
    newest = max(candidates, key=lambda e: tuple(int(p) for p in server_version(e).split(".")))
    with LocalCluster(3, newest) as cluster:
        yield cluster.url


@pytest.mark.slow
def test_the_worker_runs_on_redis_cluster(cluster_url: str, pool_name: str) -> None:
    """Pool keys, each queue's keys and the server registry live in different slots."""
    c = connect(cluster_url)
    assert isinstance(c, RedisCluster)
    queues = {"ocr:realtime": "interactive", "ocr:bulk": "batch"}
    slots = {key_slot(AsynqKeys(q).pending.encode()) for q in queues}
    slots.add(key_slot(f"gpugate:{{{pool_name}}}:state".encode()))
    assert len(slots) == 3
    gate = Gate(
        cluster_url,
        pool=pool_name,
        policy=Policy.from_dict(POLICY),
        sampler=SimulatedSampler(["24GiB"], name=pool_name),
        metrics=Metrics(CollectorRegistry()),
    )
    ran: list[str] = []
    worker = AsynqWorker(gate, queues=queues, **FAST)

    @worker.handle("ocr:page", vram="2GiB")
    def page(task: Task) -> None:
        ran.append(task.queue)
        if task.payload == b"fail":
            raise RuntimeError("bad page")

    try:
        for q in queues:
            for _ in range(3):
                enqueue(c, q, "ocr:page", b"ok")  # type: ignore[arg-type]
        failing = enqueue(c, "ocr:bulk", "ocr:page", b"fail", max_retry=0)  # type: ignore[arg-type]
        with serving(worker):
            wait_until(lambda: len(ran) == 7 and worker.stats["archived"] == 1)
            wait_until(lambda: len(list_servers(c)) == 1)
        assert ran[:3] == ["ocr:realtime"] * 3
        for q in queues:
            stats = read_queue(c, q)
            assert (stats.pending, stats.active, stats.processed_total) == (
                0,
                0,
                3 if q == "ocr:realtime" else 4,
            )
        assert c.zscore("asynq:{ocr:bulk}:archived", failing) is not None
        assert list_servers(c) == []
    finally:
        gate.close()
        for q in queues:
            for key in c.scan_iter(match=f"asynq:{{{q}}}:*"):
                c.delete(key)
        c.delete("asynq:queues")
        c.close()
