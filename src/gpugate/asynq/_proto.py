"""Asynq's protobuf messages to and from bytes: TaskMessage, ServerInfo, WorkerInfo.

Asynq stores every task as a proto3 ``TaskMessage`` (``internal/proto/
asynq.proto`` in hibiken/asynq, ``package asynq``; v0.26.0 added ``headers``),
and each running server's heartbeat as a ``ServerInfo`` plus one
``WorkerInfo`` per task in hand (see :mod:`gpugate.asynq._servers`).
This module is a small hand-written proto3 wire codec for those messages,
not generated code: Asynq ships no generated Python, and the ``protobuf``
runtime would be a heavy dependency (a compiled extension, version skew with
other users of it in the same process) for a few dozen scalar fields.

TaskMessage fields, by number (times in Unix seconds, durations in seconds)::

    1 type (string)        6 retried (int32)       11 last_failed_at (int64)
    2 payload (bytes)      7 error_msg (string)    12 retention (int64)
    3 id (string)          8 timeout (int64)       13 completed_at (int64)
    4 queue (string)       9 deadline (int64)      14 group_key (string)
    5 retry (int32)       10 unique_key (string)   15 headers (map<string,string>)

The wire format is proto3's: a tag varint ``field_number << 3 | wire_type``,
then a varint (wire type 0) or a length-prefixed run of bytes (wire type 2).
Encoding writes what Go's ``proto.Marshal`` writes: fields in field-number
order, fields with their zero value omitted, negative ints as ten-byte
two's-complement varints, and each ``headers`` entry as one repeated field 15
holding a nested entry (key as field 1, value as field 2, both always
written). Go writes map entries in random order; this codec writes them in the
mapping's order, and decoding keeps the stored order, so re-encoding a decoded
message reproduces its bytes. Two encodings of one message may still differ in
map order, so compare messages decoded, never as bytes.

``ServerInfo`` and ``WorkerInfo`` (times in Unix nanoseconds; each
``google.protobuf.Timestamp`` is a nested message of ``seconds`` (int64,
field 1) and ``nanos`` (int32, field 2, 0 to 999,999,999), each left out when
zero, while the Timestamp itself is written whenever it is set; ``None``
here means the field is absent)::

    ServerInfo                            WorkerInfo
    1 host (string)                       1 host (string)
    2 pid (int32)                         2 pid (int32)
    3 server_id (string)                  3 server_id (string)
    4 concurrency (int32)                 4 task_id (string)
    5 queues (map<string,int32>)          5 task_type (string)
    6 strict_priority (bool)              6 task_payload (bytes)
    7 status (string)                     7 queue (string)
    8 start_time (Timestamp)              8 start_time (Timestamp)
    9 active_worker_count (int32)         9 deadline (Timestamp)

They follow the same rules as ``TaskMessage``: ``queues`` entries are
written like ``headers`` entries (the value a varint, always written), and
a Timestamp that occurs twice is merged field by field, as Go merges a
repeated message field.

Decoding follows Go's parser where a message is unusual but valid: unknown
fields (any wire type, groups included) and known fields sent with another
wire type are skipped, the last occurrence of a scalar field wins, a repeated
map key keeps its last value, and an int32 is the low 32 bits of its varint.
Bytes that are not a valid message (a truncated field, a varint longer than
ten bytes, field number 0, a string that is not UTF-8) raise
:class:`~gpugate.BackendError`, since they come from Redis.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .._exceptions import BackendError, UsageError

__all__ = [
    "ServerInfo",
    "TaskMessage",
    "WorkerInfo",
    "decode_server_info",
    "decode_task_message",
    "decode_worker_info",
    "encode_server_info",
    "encode_task_message",
    "encode_worker_info",
]

_VARINT = 0
_I64 = 1
_LEN = 2
_SGROUP = 3
_EGROUP = 4
_I32 = 5

_MAX_FIELD_NUMBER = (1 << 29) - 1
_U64 = 1 << 64
_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)

# (number, attribute, kind) in field-number order, which is the order Go
# writes them in; kind is how the value travels on the wire.
_FIELDS: tuple[tuple[int, str, str], ...] = (
    (1, "type", "string"),
    (2, "payload", "bytes"),
    (3, "id", "string"),
    (4, "queue", "string"),
    (5, "retry", "int32"),
    (6, "retried", "int32"),
    (7, "error_msg", "string"),
    (8, "timeout", "int64"),
    (9, "deadline", "int64"),
    (10, "unique_key", "string"),
    (11, "last_failed_at", "int64"),
    (12, "retention", "int64"),
    (13, "completed_at", "int64"),
    (14, "group_key", "string"),
)
_BY_NUMBER = {number: (name, kind) for number, name, kind in _FIELDS}
_HEADERS = 15
_NS_PER_S = 1_000_000_000

# Each message's name, and what its bytes should have been, for the errors.
_TASK = ("TaskMessage", "the task hash's msg field is not an Asynq TaskMessage")
_SERVER = ("ServerInfo", "the asynq:servers:{host:pid:sid} key does not hold an Asynq ServerInfo")
_WORKER = ("WorkerInfo", "the asynq:workers:{host:pid:sid} hash value is not an Asynq WorkerInfo")


@dataclass(frozen=True)
class TaskMessage:
    """One Asynq task as its ``msg`` field holds it; every field defaults to zero.

    ``retry`` is the maximum number of retries and ``retried`` the retries so
    far; ``timeout`` and ``retention`` are seconds, ``deadline``,
    ``last_failed_at`` and ``completed_at`` Unix seconds, and 0 means unset
    for each. ``headers`` is read-only; equality ignores its order.
    Raises :class:`~gpugate.UsageError` for a value the wire cannot carry
    (a wrong type, an int out of its int32/int64 range).
    """

    type: str = ""
    payload: bytes = b""
    id: str = ""
    queue: str = ""
    retry: int = 0
    retried: int = 0
    error_msg: str = ""
    timeout: int = 0
    deadline: int = 0
    unique_key: str = ""
    last_failed_at: int = 0
    retention: int = 0
    completed_at: int = 0
    group_key: str = ""
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for _, name, kind in _FIELDS:
            _check(name, kind, getattr(self, name))
        if not isinstance(self.headers, Mapping):
            raise UsageError(
                f"TaskMessage.headers must be a mapping of str to str, "
                f"not {type(self.headers).__name__}"
            )
        for key, value in self.headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise UsageError(f"TaskMessage.headers must map str to str; got {key!r}: {value!r}")
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))


def _check(name: str, kind: str, value: object, message: str = "TaskMessage") -> None:
    if kind == "string":
        ok = isinstance(value, str)
    elif kind == "bytes":
        ok = isinstance(value, bytes)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "timestamp":
        ok = value is None or (
            isinstance(value, int)
            and not isinstance(value, bool)
            and _INT64[0] <= value // _NS_PER_S <= _INT64[1]
        )
        kind = "Unix ns (an int whose seconds fit an int64) or None"
    else:
        low, high = _INT32 if kind == "int32" else _INT64
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        raise UsageError(f"{message}.{name} must be {kind}; got {value!r}")


def encode_task_message(message: TaskMessage) -> bytes:
    """Encode ``message`` as the bytes Asynq stores in a task hash's ``msg``.

    Fields in field-number order, zero values left out, as Go writes them;
    ``headers`` entries in the mapping's order.
    """
    out = bytearray()
    for number, name, kind in _FIELDS:
        value = getattr(message, name)
        if not value:
            continue
        if kind in ("int32", "int64"):
            _put_varint(out, number << 3 | _VARINT)
            _put_varint(out, value % _U64)
        else:
            _put_len(out, number, value.encode() if kind == "string" else value)
    for key, value in message.headers.items():
        entry = bytearray()
        _put_len(entry, 1, key.encode())
        _put_len(entry, 2, value.encode())
        _put_len(out, _HEADERS, bytes(entry))
    return bytes(out)


def decode_task_message(data: bytes) -> TaskMessage:
    """Decode the bytes of a task hash's ``msg`` field.

    Raises :class:`~gpugate.BackendError` ("corrupt TaskMessage ...") when
    ``data`` is not a valid proto3 message or a string field is not UTF-8.
    """
    values: dict[str, object] = {}
    headers: dict[str, str] = {}
    for number, wire_type, value in _iter_fields(data):
        if number == _HEADERS and wire_type == _LEN:
            assert isinstance(value, bytes)
            key, item = _decode_header(value)
            headers[key] = item
            continue
        known = _BY_NUMBER.get(number)
        if known is None:
            continue
        name, kind = known
        if kind in ("int32", "int64"):
            # Go treats a known field under another wire type as unknown.
            if wire_type != _VARINT:
                continue
            assert isinstance(value, int)
            values[name] = _signed(value, 32 if kind == "int32" else 64)
        elif wire_type == _LEN:
            assert isinstance(value, bytes)
            values[name] = _utf8(value, name) if kind == "string" else value
    return TaskMessage(**values, headers=headers)  # type: ignore[arg-type]


def _decode_header(entry: bytes) -> tuple[str, str]:
    key = value = ""
    for number, wire_type, raw in _iter_fields(entry):
        if wire_type != _LEN or number not in (1, 2):
            continue
        assert isinstance(raw, bytes)
        if number == 1:
            key = _utf8(raw, "headers key")
        else:
            value = _utf8(raw, "headers value")
    return key, value


# -- ServerInfo and WorkerInfo (a server's heartbeat) ------------------------------

# (number, attribute, kind) in field-number order, as for TaskMessage.
_SERVER_FIELDS: tuple[tuple[int, str, str], ...] = (
    (1, "host", "string"),
    (2, "pid", "int32"),
    (3, "server_id", "string"),
    (4, "concurrency", "int32"),
    (5, "queues", "map"),
    (6, "strict_priority", "bool"),
    (7, "status", "string"),
    (8, "start_time_ns", "timestamp"),
    (9, "active_worker_count", "int32"),
)
_WORKER_FIELDS: tuple[tuple[int, str, str], ...] = (
    (1, "host", "string"),
    (2, "pid", "int32"),
    (3, "server_id", "string"),
    (4, "task_id", "string"),
    (5, "task_type", "string"),
    (6, "task_payload", "bytes"),
    (7, "queue", "string"),
    (8, "start_time_ns", "timestamp"),
    (9, "deadline_ns", "timestamp"),
)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """One Asynq server as its heartbeat describes it; every field defaults to zero.

    ``queues`` maps each queue the server serves to its priority (read-only;
    equality ignores its order). ``status`` is the server's state as Asynq
    names it: ``"active"`` while it processes, ``"stopped"`` after
    ``Server.Stop`` (no new tasks), ``"new"`` and ``"closed"`` around that.
    ``start_time_ns`` is when it started, in Unix nanoseconds (``None``: not
    recorded); ``active_worker_count`` the tasks it has in hand.
    Raises :class:`~gpugate.UsageError` for a value the wire cannot carry.
    """

    host: str = ""
    pid: int = 0
    server_id: str = ""
    concurrency: int = 0
    queues: Mapping[str, int] = field(default_factory=dict, hash=False)
    strict_priority: bool = False
    status: str = ""
    start_time_ns: int | None = None
    active_worker_count: int = 0

    def __post_init__(self) -> None:
        for _, name, kind in _SERVER_FIELDS:
            if kind != "map":
                _check(name, kind, getattr(self, name), "ServerInfo")
        if not isinstance(self.queues, Mapping):
            raise UsageError(
                f"ServerInfo.queues must be a mapping of queue name to int32 priority, "
                f"not {type(self.queues).__name__}"
            )
        for queue, priority in self.queues.items():
            if not isinstance(queue, str):
                raise UsageError(f"ServerInfo.queues must map str to int; got key {queue!r}")
            _check(f"queues[{queue!r}]", "int32", priority, "ServerInfo")
        object.__setattr__(self, "queues", MappingProxyType(dict(self.queues)))


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One task an Asynq server has in hand; every field defaults to zero.

    ``host``, ``pid`` and ``server_id`` name the server; ``task_id``,
    ``task_type``, ``task_payload`` and ``queue`` the task. ``start_time_ns``
    is when processing began and ``deadline_ns`` when it must end (the
    task's timeout or deadline), both Unix nanoseconds (``None``: not
    recorded). Raises :class:`~gpugate.UsageError` for a value the wire
    cannot carry.
    """

    host: str = ""
    pid: int = 0
    server_id: str = ""
    task_id: str = ""
    task_type: str = ""
    task_payload: bytes = b""
    queue: str = ""
    start_time_ns: int | None = None
    deadline_ns: int | None = None

    def __post_init__(self) -> None:
        for _, name, kind in _WORKER_FIELDS:
            _check(name, kind, getattr(self, name), "WorkerInfo")


def encode_server_info(info: ServerInfo) -> bytes:
    """Encode ``info`` as the bytes Asynq stores at ``asynq:servers:{host:pid:sid}``.

    Fields in field-number order, zero values left out, as Go writes them;
    ``queues`` entries in the mapping's order.
    """
    return _encode_fields(info, _SERVER_FIELDS)


def decode_server_info(data: bytes) -> ServerInfo:
    """Decode the bytes of an ``asynq:servers:{host:pid:sid}`` key.

    Raises :class:`~gpugate.BackendError` ("corrupt ServerInfo ...") when
    ``data`` is not a valid proto3 message or a string field is not UTF-8.
    """
    return ServerInfo(**_decode_fields(data, _SERVER_FIELDS, _SERVER))  # type: ignore[arg-type]


def encode_worker_info(info: WorkerInfo) -> bytes:
    """Encode ``info`` as the bytes Asynq stores in an ``asynq:workers:{host:pid:sid}`` hash.

    Fields in field-number order, zero values left out, as Go writes them.
    """
    return _encode_fields(info, _WORKER_FIELDS)


def decode_worker_info(data: bytes) -> WorkerInfo:
    """Decode one value of an ``asynq:workers:{host:pid:sid}`` hash.

    Raises :class:`~gpugate.BackendError` ("corrupt WorkerInfo ...") when
    ``data`` is not a valid proto3 message or a string field is not UTF-8.
    """
    return WorkerInfo(**_decode_fields(data, _WORKER_FIELDS, _WORKER))  # type: ignore[arg-type]


def _encode_fields(message: object, fields: tuple[tuple[int, str, str], ...]) -> bytes:
    out = bytearray()
    for number, name, kind in fields:
        value = getattr(message, name)
        if kind == "timestamp":
            # Set means written, even at the epoch: the Timestamp is a message.
            if value is not None:
                seconds, nanos = divmod(value, _NS_PER_S)
                stamp = bytearray()
                for inner, part in ((1, seconds), (2, nanos)):
                    if part:
                        _put_varint(stamp, inner << 3 | _VARINT)
                        _put_varint(stamp, part % _U64)
                _put_len(out, number, bytes(stamp))
        elif kind == "map":
            for key, item in value.items():
                entry = bytearray()
                _put_len(entry, 1, key.encode())
                _put_varint(entry, 2 << 3 | _VARINT)
                _put_varint(entry, item % _U64)
                _put_len(out, number, bytes(entry))
        elif not value:
            continue
        elif kind in ("int32", "bool"):
            _put_varint(out, number << 3 | _VARINT)
            _put_varint(out, int(value) % _U64)
        else:
            _put_len(out, number, value.encode() if kind == "string" else value)
    return bytes(out)


def _decode_fields(
    data: bytes, fields: tuple[tuple[int, str, str], ...], message: tuple[str, str]
) -> dict[str, object]:
    """The attributes of ``message`` that ``data`` sets, by Go's parsing rules."""
    by_number = {number: (name, kind) for number, name, kind in fields}
    values: dict[str, object] = {}
    stamps: dict[str, list[int]] = {}
    queues: dict[str, int] = {}
    for number, wire_type, value in _iter_fields(data, message):
        known = by_number.get(number)
        if known is None:
            continue
        name, kind = known
        if kind in ("int32", "bool"):
            # Go treats a known field under another wire type as unknown.
            if wire_type != _VARINT:
                continue
            assert isinstance(value, int)
            values[name] = bool(value) if kind == "bool" else _signed(value, 32)
            continue
        if wire_type != _LEN:
            continue
        assert isinstance(value, bytes)
        if kind == "string":
            values[name] = _utf8(value, name, message[0])
        elif kind == "bytes":
            values[name] = value
        elif kind == "timestamp":
            _merge_timestamp(stamps.setdefault(name, [0, 0]), value, message)
        else:
            key, priority = _decode_queue_entry(value, message)
            queues[key] = priority
    for name, (seconds, nanos) in stamps.items():
        values[name] = seconds * _NS_PER_S + nanos
    if queues:
        values["queues"] = queues
    return values


def _merge_timestamp(stamp: list[int], raw: bytes, message: tuple[str, str]) -> None:
    """Set ``stamp``'s ``[seconds, nanos]`` from the fields ``raw`` holds."""
    for number, wire_type, value in _iter_fields(raw, message):
        if wire_type != _VARINT or number not in (1, 2):
            continue
        assert isinstance(value, int)
        stamp[number - 1] = _signed(value, 64 if number == 1 else 32)


def _decode_queue_entry(entry: bytes, message: tuple[str, str]) -> tuple[str, int]:
    key, priority = "", 0
    for number, wire_type, raw in _iter_fields(entry, message):
        if number == 1 and wire_type == _LEN:
            assert isinstance(raw, bytes)
            key = _utf8(raw, "queues key", message[0])
        elif number == 2 and wire_type == _VARINT:
            assert isinstance(raw, int)
            priority = _signed(raw, 32)
    return key, priority


def _iter_fields(
    data: bytes, message: tuple[str, str] = _TASK
) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field number, wire type, value)`` for each top-level field.

    The value is the varint as an unsigned int, the bytes of a
    length-delimited field, or the raw bytes of a fixed-width one; groups are
    skipped whole. ``message`` (its name, and what the bytes should have
    been) words the BackendError raised for bytes that are no message.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UsageError(f"a {message[0]} decodes from bytes, not {type(data).__name__}")
    data = bytes(data)
    pos = 0
    end = len(data)
    while pos < end:
        try:
            number, wire_type, pos = _read_tag(data, pos)
            if wire_type == _EGROUP:
                raise _corrupt(f"end-group tag for field {number} without a start", pos)
            value, pos = _read_value(data, pos, number, wire_type)
        except _Malformed as exc:
            raise BackendError(
                f"corrupt {message[0]}: {exc.what} (at byte {exc.pos}); {message[1]}"
            ) from None
        if wire_type != _SGROUP:
            yield number, wire_type, value


def _read_tag(data: bytes, pos: int) -> tuple[int, int, int]:
    tag, pos = _read_varint(data, pos)
    number, wire_type = tag >> 3, tag & 7
    if number == 0 or number > _MAX_FIELD_NUMBER:
        raise _corrupt(f"invalid field number {number}", pos)
    return number, wire_type, pos


def _read_value(data: bytes, pos: int, number: int, wire_type: int) -> tuple[int | bytes, int]:
    if wire_type == _VARINT:
        return _read_varint(data, pos)
    if wire_type == _LEN:
        size, pos = _read_varint(data, pos)
        return _take(data, pos, size, number)
    if wire_type == _I64:
        return _take(data, pos, 8, number)
    if wire_type == _I32:
        return _take(data, pos, 4, number)
    if wire_type == _SGROUP:
        while True:
            if pos >= len(data):
                raise _corrupt(f"group field {number} is not closed", pos)
            inner, inner_type, pos = _read_tag(data, pos)
            if inner_type == _EGROUP:
                if inner != number:
                    raise _corrupt(f"group field {number} closed as field {inner}", pos)
                return b"", pos
            _, pos = _read_value(data, pos, inner, inner_type)
    raise _corrupt(f"field {number} has unknown wire type {wire_type}", pos)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise _corrupt("truncated varint", pos)
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if shift == 63 and byte > 1:
                raise _corrupt("varint overflows 64 bits", pos)
            return result, pos
    raise _corrupt("varint longer than 10 bytes", pos)


def _take(data: bytes, pos: int, size: int, number: int) -> tuple[bytes, int]:
    if pos + size > len(data):
        raise _corrupt(f"field {number} needs {size} bytes but {len(data) - pos} remain", pos)
    return data[pos : pos + size], pos + size


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _utf8(raw: bytes, name: str, message: str = "TaskMessage") -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise BackendError(
            f"corrupt {message}: {name} is not valid UTF-8 ({exc.reason} at byte "
            f"{exc.start} of {raw!r}); proto3 strings must be UTF-8"
        ) from exc


class _Malformed(Exception):
    """Bytes that break the wire format; :func:`_iter_fields` names the message."""

    def __init__(self, what: str, pos: int) -> None:
        super().__init__(what, pos)
        self.what = what
        self.pos = pos


def _corrupt(what: str, pos: int) -> _Malformed:
    return _Malformed(what, pos)


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _put_len(out: bytearray, number: int, raw: bytes) -> None:
    _put_varint(out, number << 3 | _LEN)
    _put_varint(out, len(raw))
    out += raw
