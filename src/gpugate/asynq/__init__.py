"""The Asynq integration: Asynq's queues as Asynq's own tools see them, and
a GPU-gated worker for them.

Inspection (:func:`read_queue`, :func:`read_queues`): per queue, sizes by
state, latency, processed and failed counts, pause; :func:`throughput` and
:func:`eta_s` for the drain time. Control (:func:`pause_queue`,
:func:`unpause_queue`): pause as Asynq does, so Go servers stop dequeuing
and AsynqMon shows it, with gpugate's expiry and ownership. The worker
(:class:`AsynqWorker`): serves Asynq queues, taking each task only once the
gate admits it, through Asynq's own task lifecycle. Key names are in
:mod:`gpugate.asynq._keys`; the layout is Asynq v0.26.0's (docs/asynq.md).
"""

from ._control import PauseResult, UnpauseResult, pause_queue, unpause_queue
from ._inspect import (
    QueuePause,
    QueueStats,
    Throughput,
    eta_s,
    list_queues,
    queue_concerns,
    read_queue,
    read_queues,
    throughput,
)
from ._keys import AsynqKeys
from ._proto import ServerInfo, TaskMessage, WorkerInfo, decode_task_message, encode_task_message
from ._servers import list_servers, list_workers
from ._task import RetryLater, RevokeTask, SkipRetry, Task
from ._worker import AsynqWorker

__all__ = [
    "AsynqKeys",
    "AsynqWorker",
    "PauseResult",
    "QueuePause",
    "QueueStats",
    "RetryLater",
    "RevokeTask",
    "ServerInfo",
    "SkipRetry",
    "Task",
    "TaskMessage",
    "Throughput",
    "UnpauseResult",
    "WorkerInfo",
    "decode_task_message",
    "encode_task_message",
    "eta_s",
    "list_queues",
    "list_servers",
    "list_workers",
    "pause_queue",
    "queue_concerns",
    "read_queue",
    "read_queues",
    "throughput",
    "unpause_queue",
]
