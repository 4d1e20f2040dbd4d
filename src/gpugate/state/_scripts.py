"""The Lua scripts, loaded once per client.

Each operation is one ``.lua`` file under ``gpugate/lua``; ``_prelude.lua``
(helpers every script shares) is prepended to each. A script is loaded again
after a server restart or failover (NOSCRIPT).

How a script call reaches Redis: on a client of one Redis (not a Cluster),
the scripts of one :class:`Scripts` share a *lane*, one connection taken from
the client's pool and kept, on which a call is packed, sent and read
directly. redis-py's command path (pool checkout and return, retry wrapper,
observability hooks, about 140 Python calls in redis-py 8) costs as much as
the round trip itself: 68 against 29 µs for a no-op EVALSHA on the
benchmark machine (benchmarks/RESULTS.md §11). The lane is used by one
call at a time; a call that finds it busy (another thread's call, or one of
its own thread that a signal handler interrupted), and any call on a
Cluster, takes the client's own path. When the lane's connection fails (it
is then closed), the call is made again on the client's path, which reconnects and
retries as :func:`gpugate.state._connect.connect` configured it, as redis-py
would have retried the call anyway; a timeout is raised at once (neither
path retries one). With hiredis installed and the client's
default encoding (UTF-8, strict), the lane packs a call with
``hiredis.pack_command`` itself: the same bytes as redis-py's packer, in a
third of its time (redis-py checks and copies every argument first), and
then does the call's I/O itself: it writes the packed call to the
connection's socket and reads the reply with a ``hiredis.Reader`` of its
own, made as redis-py makes its own (the same reply, the same error classes;
a RESP3 push message, which nothing asks for on the lane, is skipped),
instead of redis-py's send and read wrappers, with kernel timeouts on the
socket in place of Python's (see ``_Lane._tune``): together 38.6 → 34.5 µs
per no-op call on the benchmark machine, where a bare socket loop takes 32
(RESULTS.md §13). It leaves to redis-py what redis-py does once per
connection: connecting, the handshake, and a due health check. Any failure
mid-call closes the connection, as redis-py's own I/O does, so no reply is
ever read by the wrong call.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import _process
from .._speedups import text_args

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency
    _hiredis_pack = None

_READ_SIZE = 65536
# What _Lane.call answers when the client's path is to make the call.
OFF_LANE: Any = object()
# A lane call that fails with one of these is made again on the client's
# path: NOSCRIPT (the client's path loads the script), or a failed connection
# (closed by then; the client's path reconnects and retries). A timeout is
# not: the server is hung or cut off, and the caller hears of it now, as the
# client's path does not retry timeouts either.
_LANE_RETRY = (RedisConnectionError, OSError, NoScriptError)
_KERNEL_TIMEOUTS = hasattr(socket, "SO_RCVTIMEO") and hasattr(socket, "SO_SNDTIMEO")
# hiredis answers "no whole reply yet" with this (False is a RESP3 value).
_MORE = object()
# A RESP3 push message (hiredis 3.2+): never asked for on the lane, skipped if one comes.
_PUSH: Any = getattr(hiredis, "PushNotification", None) if _hiredis_pack is not None else None

SCRIPT_NAMES = (
    "admit_job",
    "publish_policy",
    "read_clock",
    "release_lease",
    "remove_worker",
    "renew_leases",
    "set_override",
)


@cache
def script_source(name: str) -> str:
    """The full text of script ``name`` as sent to Redis (prelude included;
    the ``asynq_`` scripts also get ``_asynq.lua``)."""
    lua = resources.files("gpugate") / "lua"
    parts = ["_prelude.lua"]
    if name.startswith("asynq_"):
        parts.append("_asynq.lua")  # helpers of the Asynq lifecycle scripts
    parts.append(f"{name}.lua")
    return "\n".join((lua / part).read_text(encoding="utf-8") for part in parts)


class _Lane:
    """One connection of a client's pool, kept for script calls (see the module
    docstring). Fork-safe: a child process takes a connection of its own."""

    __slots__ = (
        "_buf", "_busy", "_conn", "_detached", "_direct", "_pack", "_parse_error", "_pid",
        "_pool", "_reader", "_tuned", "_tuned_timeout", "lock",
    )  # fmt: skip

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None
        self._pid = _process.pid
        # Re-entrant for close() alone: a signal handler that closes the gate
        # runs in the thread whose call it interrupted, which holds the lock
        # (see close). A call never re-enters: _busy sends it off the lane.
        self.lock = threading.RLock()
        self._busy = False  # a call is under way (in the thread holding lock)
        # The connection close() took from a call under way, given back to
        # the pool by that call once it is done with it.
        self._detached: Any = None
        encoder = client.get_encoder()
        utf8 = codecs.lookup(encoder.encoding).name == "utf-8"
        self._pack = _hiredis_pack if utf8 and encoder.encoding_errors == "strict" else None
        # Replies as bytes, over RESP2, are what the direct I/O reads as redis-py would.
        self._direct = self._pack is not None and not encoder.decode_responses
        self._reader: Any = None
        self._parse_error: Callable[[str], Exception] = redis.ResponseError
        self._buf = bytearray(_READ_SIZE)
        # The socket the lane has made its own (see _tune), and redis-py's
        # timeout to give back to it (None: nothing was changed).
        self._tuned: socket.socket | None = None
        self._tuned_timeout: float | None = None

    def _take(self) -> Any:
        """The lane's connection (taken from the pool in this process)."""
        conn = self._conn
        if conn is None or self._pid != _process.pid:
            # The pool counts it in use until close() or the client's own close.
            conn = self._conn = self._pool.get_connection()
            self._pid = _process.pid
            self._tuned = None  # a parent's socket is left as it is (its mode is shared)
            parser: Any = getattr(conn, "_parser", None)
            resp2 = getattr(conn, "protocol", None) in (2, "2")
            if (
                self._direct
                and hasattr(conn, "_sock")
                and hasattr(parser, "parse_error")
                and (resp2 or _PUSH is not None)
            ):
                self._parse_error = parser.parse_error
                self._reader = _new_reader(self._parse_error)
            else:
                self._reader = None
        return conn

    def call(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA on the lane, or :data:`OFF_LANE` when the client's path is to
        make the call: the lane is busy (another thread holds it), or the call
        failed with NOSCRIPT or on a connection that failed mid-call (closed by
        then). Raises when the lane cannot connect."""
        lock = self.lock
        if not lock.acquire(False):
            return OFF_LANE
        if self._busy:
            # This thread's own call, interrupted by a signal handler that
            # calls again: the connection is in the middle of that call.
            lock.release()
            return OFF_LANE
        self._busy = True
        try:
            # A failure to connect is raised, not left to the client's path:
            # redis-py retried it already, and that path would retry it all
            # over again (twice the wait for a caller while Redis is down).
            conn = self._conn
            if conn is None or self._pid != _process.pid:
                conn = self._take()
            elif getattr(conn, "_sock", False) is None:
                conn.connect()
        except BaseException:
            self._end_call()
            raise
        try:
            command = ("EVALSHA", sha, len(keys), *keys, *args)
            packed = None
            if self._pack is not None:
                # try/except, not contextlib.suppress: no context manager per call.
                try:  # noqa: SIM105
                    # Numbers as text: hiredis-py 3.5's pack_command crashes
                    # the interpreter (SIGSEGV) now and then when a signal
                    # interrupts it turning them into text itself (14 of 40
                    # SIGINTs in a packing loop; none of 40 with text only).
                    packed = self._pack(text_args(command))
                except TypeError:
                    pass  # an argument hiredis does not take: redis-py's packer says why
            sock = conn._sock
            # Connecting and a due health check are redis-py's to do.
            if (
                packed is None
                or self._reader is None
                or sock is None
                or (conn.health_check_interval and time.monotonic() >= conn.next_health_check)
            ):
                return self._through_redis_py(conn, command, packed)
            if sock is not self._tuned:
                self._tune(sock)
            return self._round_trip(conn, sock, packed)
        except _LANE_RETRY:
            return OFF_LANE
        finally:
            self._end_call()

    def _end_call(self) -> None:
        """A call is over (answered, failed or cut short): the lane is free
        again, and a connection close() took from it meanwhile goes back to
        the pool (see close)."""
        self._busy = False
        if self._detached is not None:
            self._give_back_detached()
        self.lock.release()

    def _through_redis_py(self, conn: Any, command: tuple[Any, ...], packed: bytes | None) -> Any:
        """The call through redis-py's own send and read, on the lane's connection
        (``packed``: the lane's packing, else redis-py packs it)."""
        self._untune()
        # One buffer, as redis-py's packer gives.
        conn.send_packed_command([packed] if packed is not None else conn.pack_command(*command))
        return conn.read_response()

    def _tune(self, sock: socket.socket) -> None:
        """Make ``sock`` the lane's, with kernel timeouts (SO_RCVTIMEO,
        SO_SNDTIMEO) in place of Python's where it can: a socket with a Python
        timeout polls before every send and every receive, two system calls
        more per call (2 µs on the benchmark machine). The same bound applies
        to each send and each receive. Where the platform, the timeout or the
        kind of socket rules that out, the socket keeps its Python timeout."""
        self._untune()
        timeout = sock.gettimeout()
        restore = None
        # Only a plain socket: TLS reads past a kernel timeout as "want read",
        # and a cooperative library's socket (gevent) waits in its own loop.
        tunable = _KERNEL_TIMEOUTS and type(sock) is socket.socket
        if timeout is not None and timeout >= 0.001 and tunable:
            whole = int(timeout)
            tv = struct.pack("ll", whole, int((timeout - whole) * 1_000_000))
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
                sock.settimeout(None)
                restore = timeout
            except OSError:
                sock.settimeout(timeout)  # as it was: Python's timeout bounds the call
        self._tuned, self._tuned_timeout = sock, restore

    def _untune(self) -> None:
        """Hand the lane's socket back to redis-py as redis-py set it."""
        sock, self._tuned = self._tuned, None
        if sock is not None and self._tuned_timeout is not None:
            with contextlib.suppress(OSError):  # closed: redis-py reconnects
                sock.settimeout(self._tuned_timeout)

    def _round_trip(self, conn: Any, sock: socket.socket, packed: bytes) -> Any:
        """Send one packed call on the socket and read its reply."""
        reader, buf = self._reader, self._buf
        try:
            sock.sendall(packed)
            reply = _MORE
            while reply is _MORE:
                n = sock.recv_into(buf)
                if not n:
                    raise RedisConnectionError("Connection closed by server.")
                reader.feed(buf, 0, n)
                reply = reader.gets()
                while _PUSH is not None and isinstance(reply, _PUSH):
                    reply = reader.gets()
        except BaseException as exc:
            # Whatever was sent or read of this call is lost with the connection.
            self._tuned = None
            conn.disconnect()
            self._reader = _new_reader(self._parse_error)
            # A kernel timeout surfaces as EAGAIN (BlockingIOError).
            if isinstance(exc, (socket.timeout, BlockingIOError)):
                raise RedisTimeoutError(f"Timeout on the script lane: {exc}") from exc
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"Error on the script lane: {exc}") from exc
            raise
        if conn.health_check_interval:
            conn.next_health_check = time.monotonic() + conn.health_check_interval
        # An error reply: redis-py's parser maps some outside ResponseError
        # (LOADING is BusyLoadingError, a ConnectionError: the client's path
        # retries it).
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        """Give the connection back to the pool, once no call is using it.

        From another thread than a call under way, it waits for that call. From
        the call's own thread (a signal handler that interrupted it: the usual
        SIGTERM handler closes the gate) it cannot wait, as the call goes on
        only once the handler returns: the lane lets go of the connection at
        once, so no later call uses it, and the interrupted call gives it back
        to the pool once done with it (answered, failed, or cut short by the
        handler's ``sys.exit``)."""
        with self.lock:  # re-entrant: no wait in the thread of the call under way
            conn, self._conn = self._conn, None
            if conn is None or self._pid != _process.pid:
                return
            if self._busy:
                self._detached = conn
            else:
                self._untune()
                self._pool.release(conn)

    def _give_back_detached(self) -> None:
        """Give back to the pool the connection close() took from the call
        that has just ended (the caller holds lock; see close)."""
        conn, self._detached = self._detached, None
        if self._tuned is not None and self._tuned is getattr(conn, "_sock", None):
            self._untune()
        self._pool.release(conn)


def _new_reader(parse_error: Callable[[str], Exception]) -> Any:
    """A reply reader made as redis-py's hiredis parser makes its own (replies as bytes)."""
    return hiredis.Reader(
        protocolError=InvalidResponse, replyError=parse_error, notEnoughData=_MORE
    )


class LuaScript:
    """One script on one client: ``script(keys=[...], args=[...])`` runs it."""

    __slots__ = ("_client", "_lane", "name", "sha", "source")

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, name: str, lane: _Lane | None = None
    ) -> None:
        self._client = client
        self._lane = lane
        self.name = name
        self.source = script_source(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        lane = self._lane
        if lane is not None:
            reply = lane.call(self.sha, keys, args)
            if reply is not OFF_LANE:
                return reply
        try:
            return self._client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self._client.script_load(self.source)
            return self._client.evalsha(self.sha, len(keys), *keys, *args)


class Scripts:
    """Every gpugate script on one client, sharing one lane on a plain Redis."""

    __slots__ = ("_lane", *SCRIPT_NAMES)

    admit_job: LuaScript
    publish_policy: LuaScript
    read_clock: LuaScript
    release_lease: LuaScript
    remove_worker: LuaScript
    renew_leases: LuaScript
    set_override: LuaScript

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self._lane = _Lane(client) if isinstance(client, redis.Redis) else None
        for name in SCRIPT_NAMES:
            setattr(self, name, LuaScript(client, name, self._lane))

    def close(self) -> None:
        """Give the lane's connection back to the client's pool."""
        if self._lane is not None:
            self._lane.close()
