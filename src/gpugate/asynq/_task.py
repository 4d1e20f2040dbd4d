"""What a handler of the GPU-gated Asynq worker receives, and what it may raise."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .._units import parse_duration
from ._proto import TaskMessage

if TYPE_CHECKING:
    from ..admission import Ticket

__all__ = ["RetryLater", "RevokeTask", "SkipRetry", "Task"]


class SkipRetry(Exception):
    """Raise from a handler to archive the task now, retries left or not (Asynq's ``SkipRetry``)."""


class RevokeTask(Exception):
    """Raise from a handler to end the task as done, without retry or archive.

    Asynq's ``RevokeTask``.
    """


class RetryLater(Exception):
    """Raise from a handler to put the task back for later without counting a failure.

    Asynq's rate-limit recipe (an error for which ``IsFailure`` is false): the
    task goes to the retry set due in ``after`` (seconds or ``"30s"``), its
    ``retried`` count and the queue's failed/processed counters stay as they
    were. A task the gate defers never needs this: it is not taken at all.
    """

    def __init__(self, after: float | str, reason: str = "") -> None:
        self.after = parse_duration(after, key="after")
        super().__init__(reason or f"retry in {self.after:g}s")


class Task:
    """One Asynq task, as its handler sees it.

    ``type``, ``payload``, ``id``, ``queue``, ``headers``; ``max_retry`` and
    ``retried`` (this is attempt ``retried + 1``); ``deadline`` (Unix seconds:
    the earlier of the task's timeout from the start and its deadline);
    ``ticket``: the gate's admission (device, ``env`` with
    ``CUDA_VISIBLE_DEVICES``, ``report_vram``, ``report_torch_memory``).

    :attr:`cancelled` turns true when the handler should stop: the deadline
    passed, the task's Asynq lease was lost (another server recovered it),
    the task was cancelled from AsynqMon, or the worker is shutting down and
    its shutdown timeout ran out. An ``async`` handler is cancelled
    (``asyncio.CancelledError``); a plain one should check now and then.
    """

    __slots__ = (
        "_cancel",
        "_clock",
        "_write",
        "cancel_reason",
        "deadline",
        "message",
        "ticket",
    )

    def __init__(
        self,
        message: TaskMessage,
        *,
        deadline: float,
        ticket: Ticket | None,
        write_result: Callable[[bytes], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.message = message
        self.deadline = deadline
        self.ticket = ticket
        self.cancel_reason: str | None = None
        self._write = write_result
        self._clock = clock
        self._cancel = threading.Event()

    @property
    def type(self) -> str:
        return self.message.type

    @property
    def payload(self) -> bytes:
        return self.message.payload

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def queue(self) -> str:
        return self.message.queue

    @property
    def headers(self) -> Mapping[str, str]:
        return self.message.headers

    @property
    def max_retry(self) -> int:
        return self.message.retry

    @property
    def retried(self) -> int:
        return self.message.retried

    @property
    def time_left(self) -> float:
        """Seconds until the deadline (negative once past)."""
        return self.deadline - self._clock()

    @property
    def cancelled(self) -> bool:
        """True once the handler should stop (see the class docstring)."""
        return self._cancel.is_set() or self.time_left <= 0

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Sleep until :attr:`cancelled` or ``timeout`` seconds; return :attr:`cancelled`."""
        left = max(self.time_left, 0.0)
        self._cancel.wait(left if timeout is None else min(timeout, left))
        return self.cancelled

    def write_result(self, data: bytes) -> int:
        """Store ``data`` as the task's result (Asynq's ``ResultWriter``); returns its length.

        AsynqMon shows it; it is kept after success for the task's retention.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a task result is bytes, not {type(data).__name__}")
        return self._write(bytes(data))

    def _set_cancelled(self, reason: str) -> None:
        if not self._cancel.is_set():
            self.cancel_reason = reason
            self._cancel.set()

    def __repr__(self) -> str:
        return f"<Task {self.type} id={self.id} queue={self.queue} attempt={self.retried + 1}>"
