"""The scripts' lane: one kept connection, and the client's own path whenever it cannot serve.

Against the session's real redis-server: a script call on the lane gives what
the client's path gives; a busy lane, a failed connection, a flushed script
cache, a forked child and a closed lane all still get the answer.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from gpugate.state import _connect, _scripts
from gpugate.state._connect import connect
from gpugate.state._scripts import Scripts, _Lane

KEYS = ["gpugate:{lane}:state", "gpugate:{lane}:exp", "gpugate:{lane}:buckets"]


@pytest.fixture
def scripts(redis_url: str) -> Iterator[tuple[redis.Redis, Scripts]]:
    client = connect(redis_url)
    assert isinstance(client, redis.Redis)
    client.delete(*KEYS)
    found = Scripts(client)
    yield client, found
    found.close()
    client.delete(*KEYS)
    client.close()


def _unknown_release(s: Scripts) -> object:
    # release_lease.lua on a lease that does not exist: a harmless call with a known answer.
    return s.release_lease(keys=KEYS, args=["gpugate:{lane}:", 0, "nodev", "1", "ok", 0])


def _client_ids(client: redis.Redis) -> set[int]:
    return {c["id"] for c in client.client_list()}


@contextmanager
def _busy(lane: _Lane | None) -> Iterator[None]:
    """The lane held by another thread's call while the block runs."""
    assert lane is not None
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lane.lock:
            held.set()
            done.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        yield
    finally:
        done.set()
        holder.join()


def test_lane_answers_as_the_client_path_does(scripts: tuple[redis.Redis, Scripts]) -> None:
    _client, s = scripts
    on_lane = _unknown_release(s)
    with _busy(s._lane):  # a busy lane: the call takes the client's path
        off_lane = _unknown_release(s)
    assert on_lane == off_lane


def test_lane_keeps_one_connection(scripts: tuple[redis.Redis, Scripts]) -> None:
    client, s = scripts
    _unknown_release(s)
    before = _client_ids(client)
    for _ in range(20):
        _unknown_release(s)
    assert _client_ids(client) == before


def test_a_killed_lane_connection_falls_back_and_reconnects(
    scripts: tuple[redis.Redis, Scripts],
) -> None:
    client, s = scripts
    expected = _unknown_release(s)
    lane_conn = s._lane._conn  # type: ignore[union-attr]
    assert lane_conn is not None
    # The server closes every other client's connection, the lane's included.
    mine = client.client_id()
    for c in client.client_list():
        if c["id"] != mine:
            client.client_kill_filter(_id=c["id"])
    assert _unknown_release(s) == expected  # served by the client's path after the failure
    assert _unknown_release(s) == expected  # and the lane reconnects


def test_noscript_after_a_flush(scripts: tuple[redis.Redis, Scripts]) -> None:
    client, s = scripts
    expected = _unknown_release(s)
    client.script_flush()
    assert _unknown_release(s) == expected


def test_concurrent_callers_all_get_answers(scripts: tuple[redis.Redis, Scripts]) -> None:
    _client, s = scripts
    expected = _unknown_release(s)
    answers: list[object] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(50):
            got = _unknown_release(s)
            with lock:
                answers.append(got)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [expected] * 300


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_takes_a_connection_of_its_own(
    scripts: tuple[redis.Redis, Scripts],
) -> None:
    _client, s = scripts
    expected = _unknown_release(s)
    parent_conn = s._lane._conn  # type: ignore[union-attr]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ok = _unknown_release(s) == expected and s._lane._conn is not parent_conn  # type: ignore[union-attr]
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"1"
    # The parent's lane still works on its own connection.
    assert _unknown_release(s) == expected
    assert s._lane._conn is parent_conn  # type: ignore[union-attr]


def test_close_gives_the_connection_back(scripts: tuple[redis.Redis, Scripts]) -> None:
    client, s = scripts
    expected = _unknown_release(s)
    pool = client.connection_pool
    conn = s._lane._conn  # type: ignore[union-attr]
    assert conn._sock.gettimeout() is None  # kernel timeouts while on the lane
    s.close()
    assert conn._sock.gettimeout() == 2.0  # handed back with redis-py's own timeout
    # Back in the pool: the next connection the pool hands out (it hands out
    # the one given back last).
    again = pool.get_connection()
    assert again is conn
    pool.release(again)
    assert _unknown_release(s) == expected  # a closed lane takes a connection again


# Arguments of every type gpugate sends: text (not only ASCII), bytes, ints of any size, floats.
_ODD_ARGS = ["gpugate:{lane}:", "é ✓", b"\xff\x00", 0, -3, 2**70, 1.5, 0.1, 1e20, ""]


class _SpySocket:
    """The lane connection's socket, recording what is sent on it."""

    def __init__(self, sock: object) -> None:
        self._sock = sock
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))
        self._sock.sendall(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_the_lane_sends_the_bytes_redis_py_would(
    scripts: tuple[redis.Redis, Scripts], monkeypatch: pytest.MonkeyPatch
) -> None:
    _client, s = scripts
    lane = s._lane
    assert lane is not None
    assert lane._pack is not None  # hiredis and the default encoding: the lane packs itself
    _unknown_release(s)
    conn = lane._conn
    assert lane._reader is not None  # and does the I/O itself
    spy = _SpySocket(conn._sock)
    monkeypatch.setattr(conn, "_sock", spy)
    with pytest.raises(redis.ResponseError):  # the script itself cannot make sense of them
        s.release_lease(keys=KEYS, args=_ODD_ARGS)
    sha = s.release_lease.sha
    assert spy.sent == [b"".join(conn.pack_command("EVALSHA", sha, len(KEYS), *KEYS, *_ODD_ARGS))]


def test_an_error_reply_raises_what_the_client_path_raises(
    scripts: tuple[redis.Redis, Scripts],
) -> None:
    _client, s = scripts
    lane = s._lane
    assert lane is not None

    def error() -> Exception:
        try:
            s.release_lease(keys=KEYS, args=_ODD_ARGS)
        except redis.RedisError as exc:
            return exc
        raise AssertionError("the script accepted arguments it cannot use")

    on_lane = error()
    with _busy(lane):  # a busy lane: the client's path
        off_lane = error()
    assert (type(on_lane), str(on_lane)) == (type(off_lane), str(off_lane))
    assert _unknown_release(s) == _unknown_release(s)  # the lane is still in step


def test_a_due_health_check_is_left_to_redis_py(
    scripts: tuple[redis.Redis, Scripts], monkeypatch: pytest.MonkeyPatch
) -> None:
    _client, s = scripts
    expected = _unknown_release(s)
    lane = s._lane
    assert lane is not None
    conn = lane._conn
    assert conn.health_check_interval  # gpugate's clients check idle connections
    pings: list[bool] = []
    real_ping = conn._send_ping

    def ping() -> None:
        pings.append(True)
        real_ping()

    monkeypatch.setattr(conn, "_send_ping", ping)
    conn.next_health_check = 0  # due
    timeouts: list[float | None] = []
    real_check = conn.check_health

    def check() -> None:
        timeouts.append(conn._sock.gettimeout())
        real_check()

    monkeypatch.setattr(conn, "check_health", check)
    assert _unknown_release(s) == expected
    assert pings == [True]  # redis-py checked the connection first
    assert timeouts == [2.0]  # on the socket as redis-py set it up
    assert _unknown_release(s) == expected
    assert pings == [True]  # and the next call is the lane's own again


def test_a_push_message_on_the_lane_is_skipped(scripts: tuple[redis.Redis, Scripts]) -> None:
    """A RESP3 push (here a client-tracking invalidation) is not a call's reply."""
    client, s = scripts
    expected = _unknown_release(s)
    lane = s._lane
    assert lane is not None
    conn = lane._conn
    if conn.protocol not in (3, "3") or _scripts._PUSH is None:
        pytest.skip("needs a RESP3 connection and hiredis 3.2+ (push messages)")
    key = "gpugate:{lane}:tracked"
    conn.send_command("CLIENT", "TRACKING", "ON")
    assert conn.read_response() in (b"OK", "OK")
    conn.send_command("GET", key)  # tracked from now on
    conn.read_response()
    client.set(key, "changed")  # the server pushes an invalidation to the lane's connection
    deadline = time.monotonic() + 5
    while not conn._sock.recv(1, socket.MSG_PEEK):  # wait until the push is there
        assert time.monotonic() < deadline
    assert _unknown_release(s) == expected
    assert _unknown_release(s) == expected
    client.delete(key)


_SLOW_LUA = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
  local n = redis.call('TIME')
until n[1] * 1000000 + n[2] - start > tonumber(ARGV[1])
return 'slow'
"""


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-timeouts", "python-timeouts"])
def test_a_timed_out_call_never_hands_its_reply_to_the_next(
    redis_url: str, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that comes after its call gave up is dropped with the connection,
    whether the kernel (SO_RCVTIMEO) or Python bounds the wait."""
    monkeypatch.setattr(_scripts, "_KERNEL_TIMEOUTS", kernel)
    client = connect(redis_url, socket_timeout_s=0.2)
    assert isinstance(client, redis.Redis)
    slow = client.script_load(_SLOW_LUA)
    fast = client.script_load("return ARGV[1]")
    lane = _Lane(client)
    try:
        assert lane.call(fast, [], ["warm"]) == b"warm"
        assert lane._reader is not None
        assert lane._tuned is lane._conn._sock
        assert lane._conn._sock.gettimeout() == (None if kernel else 0.2)
        # 0.6 s of work against a 0.2 s timeout: the lane gives up and says so
        # (a timeout is not tried again on the client's path).
        with pytest.raises(redis.TimeoutError):
            lane.call(slow, [], [600_000])
        assert lane._conn._sock is None  # closed
        time.sleep(1.0)  # the server is done with it and has sent 'slow' to a closed socket
        assert lane.call(fast, [], ["next"]) == b"next"
        assert lane.call(fast, [], ["again"]) == b"again"
    finally:
        lane.close()
        client.close()


def test_close_in_a_signal_handler_of_the_calling_thread_does_not_wait_for_the_call(
    redis_url: str,
) -> None:
    """The usual SIGTERM handler closes the gate in the thread whose lane call
    it interrupted: close() cannot wait for that call, which goes on only once
    the handler returns. The lane lets go of the connection at once, and the
    call, done, gives it back to the pool."""
    client = connect(redis_url)
    assert isinstance(client, redis.Redis)
    pool = client.connection_pool
    slow = client.script_load(_SLOW_LUA)
    lane = _Lane(client)
    seen: dict[str, object] = {}

    def on_alarm(signum: int, frame: object) -> None:
        if seen:  # the alarm again, 5 s on: the first handler still waits in close()
            raise AssertionError("close() waited for the call its signal handler interrupted")
        seen["again"] = lane.call(slow, [], [0])  # the lane is mid-call: the client's path
        lane.close()
        seen["kept"] = lane._conn
        other = pool.get_connection()  # not the lane's, still in use by the call
        seen["handed_out"] = other
        pool.release(other)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        assert lane.call(slow, [], [0]) == b"slow"  # the lane has its connection
        conn = lane._conn
        signal.setitimer(signal.ITIMER_REAL, 0.1, 5.0)
        assert lane.call(slow, [], [500_000]) == b"slow"  # the alarm lands mid-call
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert seen["again"] is _scripts.OFF_LANE
        assert seen["kept"] is None
        assert seen["handed_out"] is not conn
        again = pool.get_connection()  # back in the pool now (handed out last-in first)
        assert again is conn
        pool.release(again)
        assert lane.call(slow, [], [0]) == b"slow"  # a closed lane takes a connection again
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        lane.close()
        client.close()


def test_an_argument_redis_cannot_take_is_refused_as_redis_py_refuses_it(
    scripts: tuple[redis.Redis, Scripts],
) -> None:
    _client, s = scripts
    expected = _unknown_release(s)
    with pytest.raises(redis.DataError):
        s.release_lease(keys=KEYS, args=["gpugate:{lane}:", 0, "nodev", "1", "ok", True])
    assert _unknown_release(s) == expected  # nothing was sent: the lane is still in step


def test_another_encoding_is_packed_by_redis_py(
    scripts: tuple[redis.Redis, Scripts], redis_url: str
) -> None:
    _client, default = scripts
    client = redis.Redis.from_url(redis_url, encoding="latin-1")
    s = Scripts(client)
    try:
        assert s._lane is not None
        assert s._lane._pack is None
        assert _unknown_release(s) == _unknown_release(default)
    finally:
        s.close()
        client.close()


class _HangUp:
    """A TCP server that accepts every connection and closes it at once, counting them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # so that close() need not wait for a connection
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_a_connection_that_cannot_be_made_is_tried_as_often_as_the_clients_path_tries_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connecting is retried by redis-py; the lane does not hand a failed
    connect to the client's path to be retried all over again (twice the wait
    for every decision while Redis is down)."""
    monkeypatch.setattr(_connect, "RETRY_BASE_S", 0.001)  # the same tries, less waiting
    monkeypatch.setattr(_connect, "RETRY_CAP_S", 0.004)
    server = _HangUp()
    client = connect(f"redis://127.0.0.1:{server.port}/0?cluster=0")
    s = Scripts(client)
    try:
        with pytest.raises(redis.ConnectionError):
            client.evalsha(s.release_lease.sha, 0)
        tries = server.accepted  # what one call on the client's own path makes
        assert tries >= 1
        for attempt in (1, 2):  # the lane's first connection, then a reconnection
            before = server.accepted
            with pytest.raises(redis.ConnectionError):
                _unknown_release(s)
            assert server.accepted - before == tries, attempt
    finally:
        s.close()
        client.close()
        server.close()


_PACK_UNTIL_INTERRUPTED = r"""
import signal, sys
import hiredis
from gpugate._speedups import text_args as _as_text
signal.signal(signal.SIGINT, signal.default_int_handler)
command = ("EVALSHA", "a" * 40, 3, "gpugate:{x}:state", "k", 0, "batch", 1073741824,
           "w", "o", "", 1, "SIM-sim-0", 85899345920, 0, 1.5, 0)
print("ready", flush=True)
try:
    while True:
        hiredis.pack_command(_as_text(command))
except KeyboardInterrupt:
    pass
"""


def test_a_signal_while_the_lane_packs_does_not_crash_the_interpreter() -> None:
    # hiredis-py's pack_command crashed (SIGSEGV) in about a third of the
    # SIGINTs that landed while it turned numbers into text; the lane gives
    # it text only.
    import random
    import signal
    import subprocess
    import sys

    codes = []
    for _ in range(12):
        with subprocess.Popen(
            [sys.executable, "-c", _PACK_UNTIL_INTERRUPTED],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        ) as child:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(random.uniform(0.02, 0.1))
            child.send_signal(signal.SIGINT)
            codes.append(child.wait(30))
    assert codes == [0] * 12
