"""A pool's Asynq queues in the operator surface: pause, resume, queues, status, metrics.

Each test loads Redis states captured from Asynq v0.26.0 (``tests/fixtures/asynq/``,
loaded as in ``test_asynq_inspect.py``) into a database of the session Redis
of its own, the "Asynq Redis"; the pool lives in database 0 as everywhere
else. The classes' ``queues`` in the policy say which queues feed which class.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from gpugate import Gate, Policy, SimulatedSampler
from gpugate.asynq import pause_queue, read_queue
from gpugate.cli import main
from gpugate.cli._common import clock
from gpugate.cli._status import run_status
from gpugate.metrics import Metrics, PoolCollector
from gpugate.state._connect import connect
from gpugate.state._inspect import read_pool
from gpugate.state._queues import read_pool_queues
from gpugate.state._server import RedisProcess
from gpugate.state._verdict import assess
from test_asynq_inspect import load, server_ms, step

# Not test_asynq_inspect's database: each module flushes its own.
ASYNQ_DB = 10
# A refused connection, no cluster probe: a read fails at once.
UNREACHABLE = "redis://127.0.0.1:1/0?cluster=0"

POLICY = {
    "classes": {
        "interactive": {"priority": 100, "queues": ["critical"]},
        "batch": {"priority": 10, "queues": ["default", "ocr:bulk"]},
    },
}


@pytest.fixture
def asynq_url(redis_server: RedisProcess) -> str:
    """The Asynq Redis: a database of the session Redis, emptied around each test."""
    base, _, _db = redis_server.url.rpartition("/")
    return f"{base}/{ASYNQ_DB}"


@pytest.fixture
def asynq(asynq_url: str) -> Iterator[redis.Redis]:
    """A client of the Asynq Redis on an empty database."""
    c = connect(asynq_url)
    assert isinstance(c, redis.Redis)
    c.flushdb()
    try:
        yield c
    finally:
        c.flushdb()
        c.close()


@pytest.fixture
def gate(redis_url: str, pool_name: str) -> Iterator[Gate]:
    """A gate on the pool with POLICY, after one admission (so the pool has a GPU sample)."""
    g = Gate(
        redis_url,
        pool=pool_name,
        policy=Policy.from_dict(POLICY),
        sampler=SimulatedSampler(["80GiB"], name=pool_name),
        metrics=Metrics(CollectorRegistry()),
    )
    d = g.try_admit("interactive", vram="1GiB")
    assert d.lease is not None
    d.lease.release()
    yield g
    g.close()


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def gpugate(
    redis_url: str, pool_name: str, asynq_url: str, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., Run]]:
    """Run ``gpugate --redis-url URL --pool POOL --asynq-redis-url ASYNQ ARGS...`` here."""
    saved = structlog.get_config()

    def run(*args: str, asynq: str | None = asynq_url, pool: bool = True) -> Run:
        capsys.readouterr()
        where = ["--redis-url", redis_url, "--pool", pool_name] if pool else []
        if asynq is not None:
            where += ["--asynq-redis-url", asynq]
        try:
            code = main([*where, *args])
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    yield run
    structlog.configure(**saved)


def line_of(text: str, start: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().startswith(start))


class TestPolicyQueues:
    """A class's queues reach the pool's stored policy unchanged."""

    def test_the_pools_policy_names_each_queues_class(self, gate: Gate) -> None:
        stored = gate.read_pool_policy()
        assert stored is not None
        assert stored.queue_classes() == {
            "critical": "interactive",
            "default": "batch",
            "ocr:bulk": "batch",
        }


class TestPauseAndResume:
    """A class pause pauses its queues the Asynq way; resume lifts only gpugate's own."""

    def test_pause_for_a_while_pauses_the_classs_queues_with_the_same_expiry(
        self, gate: Gate, gpugate: Callable[..., Run], asynq: redis.Redis
    ) -> None:
        # Given "default" paused by Asynq's inspector (PauseQueue), one task pending
        load(asynq, step("05-failure-retry-archive", 2))
        # When batch is paused for 30 minutes
        run = gpugate("pause", "batch", "--for", "30m", "--reason", "incident 42", "--who", "al")
        # Then its unpaused queue is paused as Asynq pauses, for 30 minutes, as gpugate's
        assert run.code == 0, run.err
        assert run.out.startswith("batch paused until ")
        assert "(in 30m" in line_of(run.out, "queue ocr:bulk paused until ")
        assert 1_790_000 < asynq.pttl("asynq:{ocr:bulk}:paused") <= 1_800_000
        ours = read_queue(asynq, "ocr:bulk").pause
        assert ours is not None
        assert (ours.who, ours.why, ours.cls, ours.pool) == (
            "al",
            "incident 42",
            "batch",
            gate.pool,
        )
        # and the queue someone else paused is left as it was
        assert line_of(run.out, "queue default").startswith(
            "queue default already paused by someone else (AsynqMon or asynq CLI)"
        )
        assert asynq.get("asynq:{default}:paused") == b"1795413025"
        assert asynq.pttl("asynq:{default}:paused") == -1

        # When batch is resumed
        run = gpugate("resume", "batch")
        # Then only gpugate's own pause is lifted
        assert run.code == 0, run.err
        assert run.out.splitlines()[0] == "batch resumed"
        assert line_of(run.out, "queue ocr:bulk").startswith("queue ocr:bulk resumed")
        assert line_of(run.out, "queue default").startswith(
            "queue default stays paused: not gpugate's pause"
        )
        assert not asynq.exists("asynq:{ocr:bulk}:paused")
        assert asynq.get("asynq:{default}:paused") == b"1795413025"

    def test_drain_pauses_lower_classes_queues_and_resume_finds_them_by_their_pause(
        self, gate: Gate, gpugate: Callable[..., Run], asynq: redis.Redis
    ) -> None:
        load(asynq, step("08-queue-registry", 2))  # critical, low, reports
        run = gpugate("drain")
        assert run.code == 0, run.err
        assert "until `gpugate resume batch` (no expiry)" in line_of(run.out, "queue default")
        assert read_queue(asynq, "default").paused_by == "gpugate"
        assert read_queue(asynq, "critical").paused_by is None  # the highest class runs on
        # A class resumed through the library leaves its queues paused...
        gate.resume("batch")
        assert read_queue(asynq, "ocr:bulk").paused_by == "gpugate"
        # ...and `gpugate resume` without a class still finds and lifts them.
        run = gpugate("resume")
        assert run.code == 0, run.err
        assert run.out.splitlines()[0] == "batch was not paused"
        assert line_of(run.out, "queue default").startswith("queue default resumed")
        assert not asynq.exists("asynq:{default}:paused", "asynq:{ocr:bulk}:paused")

    def test_an_unreachable_asynq_redis_is_one_line_per_queue_and_the_class_pause_stands(
        self, gate: Gate, gpugate: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("GPUGATE_ASYNQ_REDIS_URL", UNREACHABLE)
        run = gpugate("pause", "interactive", "--for", "1m", asynq=None)
        assert run.code == 2
        assert run.out.startswith("interactive paused until ")
        [line] = run.err.strip().splitlines()
        assert line.startswith("gpugate: error: queue critical of interactive not paused: ")
        assert gate.try_admit("interactive", vram="1GiB").reason == "paused"


class TestQueuesCommand:
    """gpugate queues: every queue in asynq:queues, with its class and who paused it."""

    def test_lists_every_queue_with_counts_latency_and_pause_as_text_and_json(
        self, gate: Gate, gpugate: Callable[..., Run], asynq: redis.Redis
    ) -> None:
        st = step("08-queue-registry", 2)
        load(asynq, st)
        pause_queue(asynq, "low", duration="1h", who="al", pool=gate.pool)
        asynq.set("asynq:{reports}:paused", "1795413000")  # as AsynqMon's pause button
        run = gpugate("queues")
        assert run.code == 0, run.err
        lines = run.out.splitlines()
        assert lines[0].split()[:4] == ["QUEUE", "CLASS", "PENDING", "ACTIVE"]
        assert line_of(run.out, "critical").split()[:4] == ["critical", "interactive", "1", "0"]
        assert "by gpugate (al) until" in line_of(run.out, "low")
        assert line_of(run.out, "low").split()[1] == "-"  # no class of the pool feeds on it
        assert "by someone else (AsynqMon or asynq CLI" in line_of(run.out, "reports")
        # The pool's queues nobody enqueued to yet are listed too.
        assert line_of(run.out, "ocr:bulk (unused)").split()[2] == "batch"

        doc = json.loads(gpugate("queues", "--json").out)
        by_name = {q["queue"]: q for q in doc["queues"]}
        assert list(by_name) == ["critical", "default", "low", "ocr:bulk", "reports"]
        assert by_name["reports"]["tasks"]["scheduled"] == 1
        assert by_name["reports"]["paused_by"] == "other"
        assert by_name["low"]["pause"]["who"] == "al"
        assert 3590 < by_name["low"]["pause"]["reverts_in_s"] <= 3600
        assert (by_name["default"]["class"], by_name["default"]["registered"]) == ("batch", False)

    def test_an_asynq_redis_alone_is_enough(
        self, gpugate: Callable[..., Run], asynq: redis.Redis
    ) -> None:
        load(asynq, step("08-queue-registry", 2))
        run = gpugate("queues", "--json", pool=False)
        assert run.code == 0, run.err
        doc = json.loads(run.out)
        assert [q["queue"] for q in doc["queues"]] == ["critical", "low", "reports"]
        assert {q["class"] for q in doc["queues"]} == {None}


def status(redis_url: str, pool: str, asynq: redis.Redis, **kw: Any) -> str:
    """What ``gpugate status`` prints (``run_status``'s keywords), without colours."""
    client = connect(redis_url)
    stream = io.StringIO()
    options: dict[str, Any] = {"as_json": False, "watch": None, **kw}
    try:
        code = run_status(
            client,
            pool,
            redis_url,
            embedded=False,
            color="never",
            stream=stream,
            asynq=asynq,
            **options,
        )
    finally:
        client.close()
    assert code == 0
    return stream.getvalue()


class Frames:
    """The clock of status's queue reads; each frame first loads the next captured state.

    So that, between two frames of ``status --watch``, Asynq worked as it did
    in the capture, and the frames are ``gap_s`` apart.
    """

    def __init__(self, client: redis.Redis, states: list[dict[str, Any]], gap_s: float) -> None:
        self.client, self.states, self.gap_s = client, states, gap_s
        self.shown = 0
        self.start = server_ms(states[0])

    def __call__(self) -> int:
        self.client.flushdb()
        load(self.client, self.states[self.shown])
        self.shown += 1
        return self.start + round((self.shown - 1) * self.gap_s * 1000)


class TestStatus:
    """status shows the classes' queues, and their concerns join the verdict."""

    def test_text_and_json_show_each_queue_and_its_concerns_in_the_verdict(
        self, gate: Gate, asynq: redis.Redis, asynq_url: str, redis_url: str, pool_name: str
    ) -> None:
        # Given batch's "default" with 9 tasks pending, the oldest enqueued 15 minutes ago,
        st = step("01-enqueue-pending", 10)
        load(asynq, st)
        now = server_ms(st) + 900_000
        # its "ocr:bulk" paused by gpugate for 30 minutes back then, interactive's
        # "critical" by AsynqMon
        then = server_ms(st)
        pause_queue(asynq, "ocr:bulk", duration="30m", who="al", pool=pool_name, now_ms=then)
        asynq.set("asynq:{critical}:paused", str(now // 1000))
        # When status reads them 15 minutes later, as text and as JSON
        text = status(redis_url, pool_name, asynq, asynq_url=asynq_url, asynq_now_ms=lambda: now)
        doc = json.loads(
            status(redis_url, pool_name, asynq, as_json=True, asynq_now_ms=lambda: now)
        )
        lines = text.splitlines()
        # Then the verdict names the queue waiting too long, with its backlog
        assert lines[1] == (
            "DEGRADED: queue default oldest task waits 15m, 9 to do, nothing processed today"
        )
        assert line_of(text, "QUEUES").endswith(
            f"(Asynq in {asynq_url}; backlog = pending + active)"
        )
        default = line_of(text, "default").split()
        assert default[:4] == ["default", "batch", "9", "0"]
        assert "15m" in default
        assert "no progress" in line_of(text, "default")
        assert line_of(text, "ocr:bulk").endswith(
            "by gpugate (al) until " + clock(then + 1_800_000) + " (in 15m)"
        )
        assert "by someone else" in line_of(text, "critical")

        assert doc["verdict"]["reasons"] == [lines[1].removeprefix("DEGRADED: ")]
        by_name = {q["queue"]: q for q in doc["queues"]}
        assert list(by_name) == ["critical", "default", "ocr:bulk"]
        assert by_name["default"]["tasks"]["pending"] == 9
        assert by_name["default"]["latency_s"] == pytest.approx(900.0, abs=1)
        assert by_name["default"]["rate_basis"] == "today"
        assert by_name["default"]["eta_s"] is None
        assert by_name["ocr:bulk"]["pause"]["reverts_in_s"] == 900
        assert by_name["critical"]["paused_by"] == "other"

    def test_watch_measures_the_rate_between_frames_and_gives_the_eta(
        self, gate: Gate, asynq: redis.Redis, redis_url: str, pool_name: str
    ) -> None:
        # Given Asynq processed 2 tasks in the minute between two frames, 1 still pending
        frames = Frames(
            asynq, [step("03-process-success", 1), step("03-process-success", 3)], gap_s=60
        )
        out = status(
            redis_url, pool_name, asynq, as_json=True, watch=0.001, frames=2, asynq_now_ms=frames
        )
        first, second = (json.loads(line) for line in out.splitlines())
        assert first["queues"][1]["rate_basis"] == "today"
        default = second["queues"][1]
        assert default["queue"] == "default"
        assert (default["rate_basis"], default["rate_per_s"]) == ("measured", pytest.approx(2 / 60))
        assert default["eta_s"] == pytest.approx(30.0)

    def test_a_pool_without_queues_reads_no_asynq_redis(
        self, redis_url: str, pool_name: str
    ) -> None:
        policy = Policy.from_dict({"classes": {"batch": {"priority": 1}}})
        unreachable = connect(UNREACHABLE)
        try:
            assert read_pool_queues(unreachable, policy).queues == ()
            assert read_pool_queues(unreachable, policy).error is None
        finally:
            unreachable.close()


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape: each sample's value by its name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


class TestCollector:
    """The queues' series, labelled pool and queue; their concerns in gpugate_pool_health."""

    def test_queue_series_are_exported_and_health_agrees_with_status(
        self, gate: Gate, asynq: redis.Redis, redis_url: str, pool_name: str
    ) -> None:
        # Given batch's "default" retried once and failed (05, step 2: paused by
        # Asynq's inspector, one task pending again), read a minute later
        st = step("05-failure-retry-archive", 2)
        load(asynq, st)
        now = server_ms(st) + 60_000
        client = connect(redis_url)
        verdicts: list[Any] = []
        registry = CollectorRegistry()
        registry.register(
            PoolCollector(
                client,
                pool_name,
                asynq_client=asynq,
                asynq_now_ms=lambda: now,
                on_read=lambda view, verdict: verdicts.append(verdict),
            )
        )
        try:
            samples = scrape(registry)

            def value(name: str, **labels: str) -> float | None:
                return samples.get((name, tuple(sorted({"pool": pool_name, **labels}.items()))))

            assert value("gpugate_queues_up") == 1
            assert value("gpugate_queue_tasks", queue="default", state="pending") == 1
            assert value("gpugate_queue_tasks", queue="default", state="archived") == 0
            assert value("gpugate_queue_tasks", queue="ocr:bulk", state="pending") == 0
            assert value("gpugate_queue_latency_seconds", queue="default") == pytest.approx(
                62.3, abs=0.1
            )
            assert value("gpugate_queue_paused", queue="default") == 1
            assert value("gpugate_queue_paused", queue="critical") == 0
            assert value("gpugate_queue_processed_total", queue="default") == 1
            assert value("gpugate_queue_failed_total", queue="default") == 1
            assert value("gpugate_queue_eta_seconds", queue="default") is None  # paused
            assert value("gpugate_queue_eta_seconds", queue="critical") == 0
            # The same verdict as status: the paused queue with work is a concern
            queues = read_pool_queues(asynq, gate.read_pool_policy(), now_ms=now)
            status = assess(read_pool(client, pool_name), extra=queues.concerns)
            assert status.level == "DEGRADED"
            assert value("gpugate_pool_health") == status.severity == 1
            assert verdicts[-1].reasons == status.reasons
        finally:
            client.close()

    @pytest.mark.parametrize(
        ("broken", "error"),
        [("unreachable", "Redis is unreachable"), ("registry", "WRONGTYPE")],
    )
    def test_a_failed_queue_read_is_logged_and_drops_only_the_queue_series(
        self,
        gate: Gate,
        redis_url: str,
        pool_name: str,
        asynq: redis.Redis,
        broken: str,
        error: str,
    ) -> None:
        if broken == "unreachable":
            reader = connect(UNREACHABLE, socket_timeout_s=0.5)
        else:
            reader = asynq
            asynq.set("asynq:queues", "not a set")
        client = connect(redis_url)
        registry = CollectorRegistry()
        registry.register(PoolCollector(client, pool_name, asynq_client=reader))
        try:
            with capture_logs() as logs:
                samples = scrape(registry)
        finally:
            client.close()
            if reader is not asynq:
                reader.close()
        names = {name for name, _ in samples}
        assert samples["gpugate_pool_up", (("pool", pool_name),)] == 1
        assert samples["gpugate_queues_up", (("pool", pool_name),)] == 0
        assert {n for n in names if n.startswith("gpugate_queue_")} == set()
        assert "gpugate_gpu_memory_total_bytes" in names
        assert samples["gpugate_pool_health", (("pool", pool_name),)] == 1  # DEGRADED
        [event] = [e for e in logs if e["event"] == "asynq_read_failed"]
        assert event["pool"] == pool_name
        assert error in event["error"]
