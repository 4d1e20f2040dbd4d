"""Asynq's TaskMessage decoded and encoded as Asynq's own Go code writes it.

The ground truth is every task hash's ``msg`` in ``tests/fixtures/asynq/*.json``
(captured from Asynq v0.26.0) beside its ``decoded`` form, which was made with
Asynq's ``asynq.proto`` and a standard protobuf library, not with gpugate.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpugate import BackendError, UsageError
from gpugate.asynq import TaskMessage, decode_task_message, encode_task_message
from gpugate.asynq._proto import _iter_fields

FIXTURES = Path(__file__).parent / "fixtures" / "asynq"
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _bytes(obj: dict[str, str]) -> bytes:
    return base64.b64decode(obj["b64"])


def _captured() -> Iterator[Any]:
    """Every stored TaskMessage: (id, raw bytes, the fixture's decoded entry)."""
    for path in sorted(FIXTURES.glob("*.json")):
        steps = json.loads(path.read_text())["steps"]
        for index, step in enumerate(steps):
            for key, decoded in step["decoded"].items():
                if ":t:" not in key:
                    continue
                raw = _bytes(step["keys"][key]["value"]["msg"])
                yield pytest.param(raw, decoded["msg"], id=f"{path.stem}[{index}]{key}")


CAPTURED = list(_captured())


def _field_numbers(raw: bytes) -> list[int]:
    return [number for number, _, _ in _iter_fields(raw)]


def task_messages() -> st.SearchStrategy[TaskMessage]:
    """Any TaskMessage the wire can carry, zero values and negatives included."""
    text = st.text(max_size=40)
    return st.builds(
        TaskMessage,
        type=text,
        payload=st.binary(max_size=64),
        id=text,
        queue=text,
        retry=INT32,
        retried=INT32,
        error_msg=text,
        timeout=INT64,
        deadline=INT64,
        unique_key=text,
        last_failed_at=INT64,
        retention=INT64,
        completed_at=INT64,
        group_key=text,
        headers=st.dictionaries(text, text, max_size=4),
    )


class TestCapturedMessages:
    """Every TaskMessage Asynq stored in the fixtures decodes and re-encodes as Go's."""

    def test_the_fixtures_hold_task_messages(self) -> None:
        assert len(CAPTURED) >= 100
        assert any(p.values[1]["value"]["headers"] for p in CAPTURED)

    @pytest.mark.parametrize(("raw", "decoded"), CAPTURED)
    def test_decoding_gives_every_field_the_fixture_shows(
        self, raw: bytes, decoded: dict[str, Any]
    ) -> None:
        message = decode_task_message(raw)
        expected = decoded["value"]
        assert decoded["message"] == "asynq.TaskMessage"
        assert set(expected) == set(TaskMessage.__dataclass_fields__)
        for name, value in expected.items():
            if name == "payload":
                value = _bytes(value)
            assert getattr(message, name) == value, name

    @pytest.mark.parametrize(("raw", "decoded"), CAPTURED)
    def test_encoding_writes_the_fields_go_writes_in_its_order(
        self, raw: bytes, decoded: dict[str, Any]
    ) -> None:
        message = decode_task_message(raw)
        encoded = encode_task_message(message)
        assert _field_numbers(encoded) == decoded["wire_field_numbers"]
        if decoded["reencodes_identically"]:
            assert encoded == raw
        else:
            assert decode_task_message(encoded) == message


class TestRoundTrip:
    """Encoding then decoding gives the same message back."""

    @given(task_messages())
    def test_any_message_survives_a_round_trip(self, message: TaskMessage) -> None:
        encoded = encode_task_message(message)
        assert decode_task_message(encoded) == message
        assert encode_task_message(decode_task_message(encoded)) == encoded

    def test_the_empty_message_is_zero_bytes(self) -> None:
        assert encode_task_message(TaskMessage()) == b""
        assert decode_task_message(b"") == TaskMessage()

    def test_negative_ints_take_ten_bytes_as_in_go(self) -> None:
        assert encode_task_message(TaskMessage(retry=-1)) == b"\x28" + b"\xff" * 9 + b"\x01"
        assert decode_task_message(b"\x28" + b"\xff" * 9 + b"\x01").retry == -1

    def test_headers_compare_regardless_of_order(self) -> None:
        a = TaskMessage(headers={"x": "1", "y": "2"})
        b = TaskMessage(headers={"y": "2", "x": "1"})
        assert a == b
        assert hash(a) == hash(b)
        assert encode_task_message(a) != encode_task_message(b)


class TestUnusualButValid:
    """Valid messages Go would accept are read the way Go reads them."""

    def test_unknown_fields_of_every_wire_type_are_skipped(self) -> None:
        known = encode_task_message(TaskMessage(type="t", retry=3))
        unknown = (
            b"\x80\x01\x05"  # field 16 varint
            + b"\x89\x01\x00\x00\x00\x00\x00\x00\x00\x00"  # field 17 fixed64
            + b"\x92\x01\x02hi"  # field 18 bytes
            + b"\x9b\x01\x08\x01\x9c\x01"  # field 19 group holding a varint
            + b"\xa5\x01\x00\x00\x00\x00"  # field 20 fixed32
        )
        assert decode_task_message(unknown + known) == TaskMessage(type="t", retry=3)

    def test_a_known_field_with_another_wire_type_is_skipped(self) -> None:
        assert decode_task_message(b"\x2a\x01x") == TaskMessage()  # retry as bytes

    def test_the_last_occurrence_of_a_field_wins(self) -> None:
        raw = encode_task_message(TaskMessage(queue="a")) + encode_task_message(
            TaskMessage(queue="b")
        )
        assert decode_task_message(raw).queue == "b"

    def test_a_repeated_header_key_keeps_its_last_value(self) -> None:
        raw = encode_task_message(TaskMessage(headers={"k": "1"})) + encode_task_message(
            TaskMessage(headers={"k": "2"})
        )
        assert dict(decode_task_message(raw).headers) == {"k": "2"}

    def test_a_header_entry_may_leave_out_key_or_value(self) -> None:
        assert dict(decode_task_message(b"\x7a\x03\x12\x01v").headers) == {"": "v"}
        assert dict(decode_task_message(b"\x7a\x00").headers) == {"": ""}


class TestMalformed:
    """Bytes that are not a TaskMessage raise BackendError naming the fault."""

    @pytest.mark.parametrize(
        ("raw", "fault"),
        [
            pytest.param(b"\x0a\x05abc", "needs 5 bytes but 3 remain", id="short-string"),
            pytest.param(b"\x28", "truncated varint", id="truncated-varint"),
            pytest.param(b"\x28" + b"\xff" * 10 + b"\x01", "longer than 10", id="long-varint"),
            pytest.param(b"\x28" + b"\xff" * 9 + b"\x02", "overflows 64 bits", id="overflow"),
            pytest.param(b"\x00\x00", "invalid field number 0", id="field-zero"),
            pytest.param(b"\x2e", "unknown wire type 6", id="wire-type-6"),
            pytest.param(b"\x2c", "without a start", id="stray-end-group"),
            pytest.param(b"\x9b\x01\x08\x01", "not closed", id="open-group"),
            pytest.param(b"\x0a\x02\xff\xfe", "type is not valid UTF-8", id="bad-utf8"),
            pytest.param(b"\x7a\x04\x0a\x02\xc3\x28", "headers key", id="bad-header-key"),
            pytest.param(b"\x7a\x02\x0a\x05", "needs 5 bytes", id="bad-header-entry"),
        ],
    )
    def test_malformed_bytes_raise(self, raw: bytes, fault: str) -> None:
        with pytest.raises(BackendError, match="corrupt TaskMessage") as info:
            decode_task_message(raw)
        assert fault in str(info.value)

    @given(st.binary(max_size=64))
    def test_arbitrary_bytes_decode_or_raise_backend_error(self, raw: bytes) -> None:
        try:
            message = decode_task_message(raw)
        except BackendError:
            return
        assert decode_task_message(encode_task_message(message)) == message


class TestInvalidValues:
    """A TaskMessage the wire cannot carry is refused when it is built."""

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"retry": 2**31},
            {"retried": -(2**31) - 1},
            {"timeout": 2**63},
            {"deadline": True},
            {"type": b"bytes"},
            {"payload": "text"},
            {"headers": {"k": 1}},
            {"headers": [("k", "v")]},
        ],
        ids=repr,
    )
    def test_out_of_range_or_mistyped_values_raise(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(UsageError, match="TaskMessage"):
            TaskMessage(**kwargs)

    def test_headers_are_read_only(self) -> None:
        message = TaskMessage(headers={"k": "v"})
        with pytest.raises(TypeError):
            message.headers["k"] = "w"  # type: ignore[index]
