"""The GPU-gated Asynq worker: takes an Asynq task only once the gate admits it.

One :class:`AsynqWorker` serves Asynq queues mapped to gpugate classes. For
each free slot it looks at the oldest pending task of each queue (queues by
class priority, then in the policy's order), asks the gate for that task
type's VRAM, and only on ADMIT takes the task, with a script on the queue's
slot that pops it only if it is still the oldest pending (DESIGN decision 11;
another worker may have taken it meanwhile: the admission is then released
and its rate token refunded). While the gate says DEFER the task stays
pending: visible in AsynqMon, no retry burned, no failure counted.

From then on the task lives Asynq's own lifecycle (``_broker``): active with
a lease this worker extends every heartbeat; done, or completed for its
retention; retried with Asynq's backoff; archived when retries run out, when
the handler raises :class:`SkipRetry` or when the gate rejects it. The
worker also does what an Asynq server does for its queues: forwards due
scheduled and retry tasks, recovers tasks whose lease expired (a worker that
died), deletes completed tasks past retention, and registers itself and its
running tasks where AsynqMon lists servers and workers. SIGTERM (or
:meth:`AsynqWorker.stop`) stops taking tasks, waits ``shutdown_timeout`` for
those running, and puts the rest back at the head of pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from .._exceptions import BackendError, ConfigError, UsageError
from .._logging import Throttle
from .._units import format_size, parse_duration, parse_size

# The admission package imports the metrics, which import this package: take
# the modules, not the package, and the Gate for typing only.
from ..admission._decision import Outcome, Reason
from ..admission._ticket import Ticket, is_cuda_oom
from ..state._connect import Client, connect
from . import _broker as broker
from ._keys import CANCEL_CHANNEL, check_queue_name, decode
from ._proto import ServerInfo, TaskMessage, WorkerInfo
from ._servers import clear_server_state, write_server_state
from ._task import RetryLater, RevokeTask, SkipRetry, Task

if TYPE_CHECKING:
    from ..admission import Gate

__all__ = ["AsynqWorker"]

log = structlog.get_logger(__name__)

Handler = Callable[[Task], Any]
RetryDelay = Callable[[int, BaseException, Task], float]

# Asynq's processor: a task with neither timeout nor deadline gets 30 minutes.
_DEFAULT_TIMEOUT_S = 1800.0
# Error texts Asynq writes for the same events (Go's context errors).
_DEADLINE_EXCEEDED = "context deadline exceeded"
_CANCELED = "context canceled"


def _handler_not_found(task_type: str) -> str:
    # Asynq's ServeMux NotFoundHandler text.
    return f'handler not found for task "{task_type}"'


def error_text(exc: BaseException) -> str:
    """The ``error_msg`` Asynq will show for a handler's exception.

    What Go's ``err.Error()`` is to Asynq: the exception's message, or its
    type's name when it has none (the worker's log has the type and traceback).
    """
    return str(exc) or type(exc).__name__


def default_retry_delay(retried: int, exc: BaseException, task: Task) -> float:
    """Asynq's backoff (:func:`gpugate.asynq._broker.default_retry_delay`);
    :class:`RetryLater` gives its own delay."""
    if isinstance(exc, RetryLater):
        return exc.after
    return broker.default_retry_delay(retried, exc)


def default_is_failure(exc: BaseException) -> bool:
    """Every error is a failure except :class:`RetryLater` (Asynq's ``IsFailure``)."""
    return not isinstance(exc, RetryLater)


@dataclass(frozen=True, slots=True)
class _Unwritten:
    """An attempt's end Redis did not take: written again at each heartbeat
    while the attempt's Asynq lease lasts (Asynq's syncer)."""

    run: _Running
    what: str
    write: Callable[[str], object]
    written: Callable[[], None]


@dataclass(frozen=True, slots=True)
class _Handler:
    fn: Handler
    vram: int
    is_async: bool


class _Failure(Exception):
    """An attempt that failed without a handler exception (deadline, cancel, no handler)."""


_attempts = itertools.count()


class _Running:
    """One attempt at a task this worker holds: its Asynq state and its gate admission."""

    __slots__ = (
        "async_future",
        "handler",
        "key",
        "lease_tried",
        "lease_until",
        "lock",
        "lost",
        "msg",
        "settled",
        "started",
        "task",
        "ticket",
        "timer",
    )

    def __init__(
        self,
        msg: TaskMessage,
        handler: _Handler,
        ticket: Ticket,
        task: Task,
        lease_until: int,
        started: float,
    ) -> None:
        # Attempts, not task ids, key the running set: a plain handler past its
        # deadline still runs when its task, retried, is taken again.
        self.key = next(_attempts)
        self.msg = msg
        self.handler = handler
        self.ticket = ticket
        self.task = task
        self.lease_until = lease_until
        # An extension that failed may have run in Redis after all (a timeout):
        # the expiry it tried to set, until one is confirmed.
        self.lease_tried = 0
        self.started = started
        self.lock = threading.Lock()
        self.settled = False
        self.lost = False
        self.timer: threading.Timer | None = None
        self.async_future: Any = None

    def leases(self) -> str:
        """The leases this attempt may hold in Redis, for an end written again."""
        return f"{self.lease_until} {self.lease_tried}"

    def lease_valid(self, now: float) -> bool:
        """Whether this worker's Asynq lease on the task still runs (as Asynq's
        ``Lease.IsValid``): past it another server may have taken the task."""
        return now < self.lease_until

    def end_once(self) -> bool:
        """True for the one caller that ends this attempt (its handler, the
        deadline, a cancel or the shutdown); the deadline timer stops."""
        with self.lock:
            if self.settled:
                return False
            self.settled = True
        if self.timer is not None:
            self.timer.cancel()
        return True


class AsynqWorker:
    """A Python Asynq worker whose every task is admitted by a :class:`~gpugate.Gate` first.

    ``gate``: the pool's gate (its policy maps classes to queues).
    ``queues``: which Asynq queues to serve: a mapping queue -> class, a list
    of queue names (each class taken from the policy's ``queues``), or
    ``None`` for every queue of the policy. Queues are served by their class's
    priority (strictly), and within a class in the order given.
    ``asynq_redis``: the Redis Asynq uses (a URL or a client); by default the
    gate's. ``concurrency``: tasks run at once by this process.

    Asynq's intervals, all durations (seconds or ``"5s"``), default to
    Asynq's own: ``heartbeat_interval`` 5 s (server registration, lease
    extension), ``lease_duration`` 30 s, ``recover_interval`` 1 min and
    ``recover_grace`` 30 s (a task whose lease expired that long ago is taken
    back to retry), ``forward_interval`` 5 s (scheduled and retry tasks due
    now move to pending), ``janitor_interval`` 8 s (completed tasks past
    retention are deleted), ``task_check_interval`` 1 s (how long an idle
    worker sleeps; a deferred one sleeps the gate's ``retry_after``, at most
    this), ``shutdown_timeout`` 8 s.

    ``retry_delay(retried, exc, task)``: seconds until a failed task is
    retried (default: Asynq's ``retried⁴ + 15 + rand(30)·(retried+1)``).
    ``is_failure(exc)``: whether an error counts as a failure (default: all
    but :class:`RetryLater`). ``clock``: Unix seconds (tests).
    """

    def __init__(
        self,
        gate: Gate,
        *,
        queues: Mapping[str, str] | Sequence[str] | None = None,
        asynq_redis: str | Client | None = None,
        concurrency: int = 1,
        heartbeat_interval: float | str = 5.0,
        lease_duration: float | str = 30.0,
        recover_interval: float | str = 60.0,
        recover_grace: float | str = 30.0,
        forward_interval: float | str = 5.0,
        janitor_interval: float | str = 8.0,
        task_check_interval: float | str = 1.0,
        shutdown_timeout: float | str = 8.0,
        retry_delay: RetryDelay | None = None,
        is_failure: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigError(
                f"concurrency must be a whole number of at least 1, not {concurrency!r}",
                key="concurrency",
                value=concurrency,
            )
        self.gate = gate
        self.concurrency = concurrency
        self.heartbeat_interval = self._positive(heartbeat_interval, "heartbeat_interval")
        self.lease_duration = self._positive(lease_duration, "lease_duration")
        self.recover_interval = self._positive(recover_interval, "recover_interval")
        self.recover_grace = parse_duration(recover_grace, key="recover_grace")
        self.forward_interval = self._positive(forward_interval, "forward_interval")
        self.janitor_interval = self._positive(janitor_interval, "janitor_interval")
        self.task_check_interval = self._positive(task_check_interval, "task_check_interval")
        self.shutdown_timeout = parse_duration(shutdown_timeout, key="shutdown_timeout")
        if self.heartbeat_interval >= self.lease_duration:
            raise ConfigError(
                f"heartbeat_interval ({self.heartbeat_interval:g}s) must be shorter than "
                f"lease_duration ({self.lease_duration:g}s), or leases lapse between beats",
                key="heartbeat_interval",
                value=heartbeat_interval,
            )
        self.retry_delay: RetryDelay = retry_delay or default_retry_delay
        self.is_failure = is_failure or default_is_failure
        self._clock = clock or time.time
        self.queues = self._queue_classes(queues)
        if isinstance(asynq_redis, str):
            self.client: Client = connect(asynq_redis)
            self._own_client = True
        else:
            self.client = asynq_redis if asynq_redis is not None else gate.client
            self._own_client = False
        self._handlers: dict[str, _Handler] = {}
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.server_id = str(uuid.uuid4())
        self._started_ns = int(self._clock() * 1e9)
        self._running: dict[int, _Running] = {}  # by attempt (_Running.key)
        self._unwritten: list[_Unwritten] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        # The heartbeat runs on through shutdown (Asynq stops its heartbeater
        # last): running tasks keep their leases while they finish.
        self._beats_end = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._throttle = Throttle(10.0)
        self._stats_lock = threading.Lock()
        self.stats = {"done": 0, "retried": 0, "archived": 0, "deferred": 0, "requeued": 0}

    # -- configuration --------------------------------------------------------------

    @staticmethod
    def _positive(value: float | str, key: str) -> float:
        seconds = parse_duration(value, key=key)
        if seconds <= 0:
            raise ConfigError(f"{key} must be longer than 0, not {value!r}", key=key, value=value)
        return seconds

    def _queue_classes(self, queues: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
        gate = self.gate
        if not isinstance(queues, Mapping) and gate.pool_policy is None and gate.policy is None:
            # The policy's queues are the pool's: a gate that could not read
            # them (Redis down or loading) would check them against a default.
            try:
                self.gate.sync_policy()
            except BackendError as exc:
                raise BackendError(
                    f"cannot read pool {self.gate.pool!r}'s policy to find its Asynq queues: "
                    f"{exc}; start the worker when Redis answers, or map the queues to "
                    "classes yourself (queues={'ocr:bulk': 'batch'})"
                ) from exc
        policy = self.gate.effective_policy
        known = policy.queue_classes()
        # The fixes below name a class the policy has: its lowest, most often
        # the one that takes queued work.
        example = min(policy.classes.values(), key=lambda cp: cp.priority).name
        if queues is None:
            wanted = dict(known)
            if not wanted:
                raise ConfigError(
                    f"pool {self.gate.pool!r}'s policy maps no Asynq queue to a class; give "
                    f"queues={{'ocr:bulk': {example!r}}} or add queues = [...] to a class of "
                    "the policy",
                    key="queues",
                )
        elif isinstance(queues, Mapping):
            wanted = {check_queue_name(q): c for q, c in queues.items()}
        else:
            if isinstance(queues, str):
                queues = [queues]
            wanted = {}
            for q in queues:
                check_queue_name(q)
                if q not in known:
                    raise ConfigError(
                        f"queue {q!r} belongs to no class of pool {self.gate.pool!r}'s policy; "
                        f"map it: queues={{{q!r}: {example!r}}}, or add it to a class's queues",
                        key="queues",
                        value=q,
                    )
                wanted[q] = known[q]
        if not wanted:
            raise ConfigError("queues is empty; name at least one Asynq queue", key="queues")
        for cls in wanted.values():
            policy.class_policy(cls)  # UsageError naming the classes for an unknown one
        order = {name: i for i, name in enumerate(wanted)}
        ranked = sorted(wanted, key=lambda q: (-policy.class_policy(wanted[q]).priority, order[q]))
        return {q: wanted[q] for q in ranked}

    def handle(self, task_type: str, fn: Handler | None = None, *, vram: int | str = 0) -> Any:
        """Register ``fn`` for tasks of ``task_type``, with its VRAM estimate.

        As a decorator: ``@worker.handle("ocr:page", vram="6GiB")``. ``fn``
        takes a :class:`Task`; it may be ``async def``. Returning ends the task
        as done; raising retries it (or archives it, see :class:`SkipRetry`,
        :class:`RevokeTask`, :class:`RetryLater`).
        """
        if not isinstance(task_type, str) or not task_type:
            raise ConfigError(f"a task type is a non-empty string, not {task_type!r}")
        vram_b = parse_size(vram, key=f"vram of {task_type}")

        def register(f: Handler) -> Handler:
            if not callable(f):
                raise ConfigError(f"the handler of {task_type!r} is not callable: {f!r}")
            # A function, or an object whose __call__ is async.
            is_async = inspect.iscoroutinefunction(f) or inspect.iscoroutinefunction(
                type(f).__call__
            )
            self._handlers[task_type] = _Handler(f, vram_b, is_async)
            return f

        return register if fn is None else register(fn)

    # -- running ----------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (in the main thread) or :meth:`stop`; then shut down."""
        if not self._handlers:
            raise UsageError("no handler is registered; use @worker.handle('type', vram=...)")
        if self._stopped.is_set() or self._threads:
            raise UsageError("an AsynqWorker runs once; make a new one")
        restore = self._install_signals()
        log.info(
            "asynq_worker_started",
            server=f"{self.host}:{self.pid}:{self.server_id}",
            queues=self.queues,
            concurrency=self.concurrency,
            types=sorted(self._handlers),
        )
        try:
            self._start_threads()
            self._dispatch_loop()
        finally:
            try:
                self._shutdown()
            finally:
                restore()

    def stop(self) -> None:
        """Stop taking tasks; :meth:`run` then shuts down and returns. Thread-safe."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: object) -> None:
            log.info("asynq_worker_stopping", signal=signal.Signals(signum).name)
            self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _start_threads(self) -> None:
        def spawn(name: str, target: Callable[[], None]) -> threading.Thread:
            t = threading.Thread(target=target, name=f"gpugate-asynq-{name}", daemon=True)
            t.start()
            self._threads.append(t)
            return t

        if any(h.is_async for h in self._handlers.values()):
            loop = asyncio.new_event_loop()
            self._loop = loop
            spawn("loop", loop.run_forever)
        self._beat()  # registered before the first task, as Asynq's server
        self._heartbeat_thread = spawn("heartbeat", self._heartbeat_loop)
        spawn("housekeeping", self._housekeeping_loop)
        spawn("cancel", self._cancel_listener)

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while len(self._running) >= self.concurrency and not self._stop.is_set():
                    self._cond.wait(self.task_check_interval)
            if self._stop.is_set():
                return
            try:
                pause = self._dispatch_one()
            except BackendError as exc:
                self._warn("asynq_backend_error", error=str(exc))
                pause = self.task_check_interval
            if pause > 0:
                with self._cond:
                    self._cond.wait(pause)

    def _dispatch_one(self) -> float:
        """Try to take one task; the seconds to wait before the next try (0: at once)."""
        wait: float | None = None
        for queue, cls in self.queues.items():
            try:
                peeked = broker.peek(self.client, queue)
            except BackendError as exc:
                # One unreadable queue (Redis down, a task hash that is not
                # Asynq's) must not stop the others.
                self._warn("asynq_queue_unreadable", queue=queue, error=str(exc))
                wait = self.task_check_interval
                continue
            if peeked is None or peeked == broker.PAUSED:
                continue
            assert isinstance(peeked, broker.Peek)
            msg = peeked.message
            handler = self._handlers.get(msg.type)
            if handler is None:
                # As Asynq: the task is taken and fails (retried, then archived).
                self._take_and_fail(peeked, _handler_not_found(msg.type))
                return 0.0
            try:
                d = self.gate.try_admit(cls, handler.vram)
            except UsageError as exc:
                # The pool's policy no longer has the class (`gpugate policy
                # apply`): its queues wait, the others are served.
                self._warn("asynq_class_unknown", queue=queue, cls=cls, error=str(exc))
                wait = self.task_check_interval if wait is None else wait
                continue
            if d.outcome is Outcome.DEFER:
                self._count("deferred")
                wait = d.retry_after if wait is None else min(wait, d.retry_after)
                continue
            if d.outcome is Outcome.REJECT and d.reason != Reason.TOO_LARGE:
                # This host cannot run the class (no GPU visible, and the class's
                # no_gpu is "reject"): the task is not the pool's to refuse, so
                # it stays pending for a host that can.
                self._count("deferred")
                self._warn("asynq_class_rejected_here", queue=queue, cls=cls, reason=d.reason)
                wait = self.task_check_interval if wait is None else wait
                continue
            if d.outcome is Outcome.REJECT:
                self._take_and_fail(
                    peeked,
                    f"gpugate: pool {self.gate.pool!r} rejects {cls} tasks of "
                    f"{format_size(handler.vram)}: {d.reason} ({d.detail})",
                    archive=True,
                )
                return 0.0
            self._take(peeked, handler, Ticket(d))
            return 0.0
        if wait is None:
            # Nothing pending anywhere: Asynq's idle pause, jittered.
            return self.task_check_interval * (0.5 + random.random())
        return min(max(wait, 0.001), self.task_check_interval)

    def _lease_until(self) -> int:
        return int(self._clock() + self.lease_duration)

    def _take_and_fail(self, peeked: broker.Peek, error: str, *, archive: bool = False) -> None:
        msg = broker.claim(
            self.client, peeked.queue, peeked.task_id, lease_until_s=self._lease_until()
        )
        if msg is None:
            return
        self._fail(msg, _Failure(error), archive=archive)

    def _take(self, peeked: broker.Peek, handler: _Handler, ticket: Ticket) -> None:
        try:
            lease_until = self._lease_until()
            msg = broker.claim(self.client, peeked.queue, peeked.task_id, lease_until_s=lease_until)
        except BaseException:
            ticket.release("ok", refund=True)
            raise
        if msg is None:
            # Another worker took it (or the queue was paused) between peek and pop.
            ticket.release("ok", refund=True)
            return
        now = self._clock()
        deadline = now + msg.timeout if msg.timeout > 0 else None
        if msg.deadline > 0:
            deadline = msg.deadline if deadline is None else min(deadline, msg.deadline)
        if deadline is None:
            deadline = now + _DEFAULT_TIMEOUT_S
        queue = peeked.queue
        task = Task(
            msg,
            deadline=deadline,
            ticket=ticket,
            write_result=lambda data: broker.write_result(self.client, queue, msg.id, data),
            clock=self._clock,
        )
        run = _Running(msg, handler, ticket, task, lease_until, now)
        with self._cond:
            self._running[run.key] = run
        if ticket.lease is not None:
            # The GPU may be another job's now (Redis did not confirm the lease
            # for a TTL, or an operator expired it): the handler stops, and the
            # attempt fails (context canceled), to be retried.
            ticket.lease.on_lost(functools.partial(self._gpu_lease_lost, run))
        if deadline <= now:
            # As Asynq: a task already past its deadline fails without running.
            self._settle(run, _Failure(_DEADLINE_EXCEEDED))
            ticket.release("ok", refund=True)  # it never ran
            self._end(run, None)
            return
        log.debug("asynq_task_started", task_id=msg.id, type=msg.type, queue=queue)
        if handler.is_async:
            assert self._loop is not None
            run.async_future = asyncio.run_coroutine_threadsafe(self._run_async(run), self._loop)
        else:
            run.timer = threading.Timer(deadline - now, self._deadline_passed, (run,))
            run.timer.daemon = True
            run.timer.start()
            threading.Thread(
                target=self._run_sync, args=(run,), name=f"gpugate-asynq-{msg.id}", daemon=True
            ).start()

    def _run_sync(self, run: _Running) -> None:
        error: BaseException | None = None
        try:
            run.handler.fn(run.task)
        except BaseException as exc:
            error = exc
        if error is None and run.task.time_left <= 0:
            error = _Failure(_DEADLINE_EXCEEDED)  # it returned too late
        self._settle(run, error)
        self._end(run, error)

    async def _run_async(self, run: _Running) -> None:
        error: BaseException | None = None
        try:
            await asyncio.wait_for(run.handler.fn(run.task), timeout=max(run.task.time_left, 0))
        except TimeoutError:
            error = _Failure(_DEADLINE_EXCEEDED)
        except asyncio.CancelledError:
            error = _Failure(_CANCELED)
        except BaseException as exc:
            error = exc
        self._settle(run, error)
        self._end(run, error)

    def _deadline_passed(self, run: _Running) -> None:
        run.task._set_cancelled("deadline")
        self._settle(run, _Failure(_DEADLINE_EXCEEDED))

    def _gpu_lease_lost(self, run: _Running, _lease: object) -> None:
        """As a cancel from AsynqMon: the handler is told, the attempt fails."""
        log.warning("asynq_task_gpu_lease_lost", task_id=run.msg.id, type=run.msg.type)
        self._cancel(run, "gpu lease lost")
        if not run.handler.is_async:
            self._settle(run, _Failure(_CANCELED))

    def _cancel(self, run: _Running, reason: str) -> None:
        run.task._set_cancelled(reason)
        if run.async_future is not None:
            run.async_future.cancel()

    # -- the end of an attempt ----------------------------------------------------------

    def _settle(self, run: _Running, error: BaseException | None) -> None:
        """Write the attempt's end to Asynq's state, once (done, retry or archive)."""
        if not run.end_once():
            return
        if not run.lost and not run.lease_valid(self._clock()):
            # As Asynq: past the lease another server may have the task (its
            # recoverer takes it back otherwise); writing now could end that run.
            run.lost = True
        if run.lost:
            log.warning(
                "asynq_task_lease_lost",
                task_id=run.msg.id,
                queue=run.msg.queue,
                note="its Asynq lease is gone or over: the outcome is not written, and a "
                "recoverer takes the task back if no other server has it",
            )
            return
        if error is None:
            self._succeed(run.msg, run)
        elif isinstance(error, RevokeTask):
            self._succeed(run.msg, run, revoke=True)
        else:
            self._fail(run.msg, error, task=run.task, run=run)

    def _succeed(self, msg: TaskMessage, run: _Running, *, revoke: bool = False) -> None:
        """Done (deleted), or completed for its retention; a revoked task is
        deleted whatever its retention, as Asynq's ``RevokeTask``."""
        now = self._clock()
        complete = msg.retention > 0 and not revoke

        def write(attempt_leases: str) -> object:
            if complete:
                return broker.mark_complete(
                    self.client, msg, now_s=now, attempt_leases=attempt_leases
                )
            return broker.done(self.client, msg, now_s=now, attempt_leases=attempt_leases)

        def written() -> None:
            self._count("done")
            log.debug("asynq_task_done", task_id=msg.id, queue=msg.queue, revoked=revoke)

        self._write_end(run, msg, "done", write, written)

    def _write_end(
        self,
        run: _Running | None,
        msg: TaskMessage,
        what: str,
        write: Callable[[str], object],
        written: Callable[[], None],
    ) -> None:
        """Write an attempt's end; if Redis does not take it, the heartbeat
        writes it again while the attempt's lease lasts (``run``; without one,
        the recoverer or the next pass takes the task up again). ``written``
        counts and logs it, once Redis says it took it."""
        try:
            took = write("")
        except BackendError as exc:
            if run is not None:
                with self._cond:
                    self._unwritten.append(_Unwritten(run, what, write, written))
            self._warn(
                "asynq_task_end_unwritten",
                task_id=msg.id,
                what=what,
                error=str(exc),
                note="written again at each heartbeat while its Asynq lease lasts"
                if run is not None
                else "taken up again by the recoverer",
            )
            return
        self._took(msg, what, took, written, attempt=run is not None)

    @staticmethod
    def _took(
        msg: TaskMessage,
        what: str,
        took: object,
        written: Callable[[], None],
        *,
        attempt: bool = True,
    ) -> None:
        """Count and log an end Redis took; say so when it did not (NOT FOUND)
        for one of this worker's attempts. The recoverer's are quiet: several
        workers' recoverers race for the same expired task."""
        if took:
            written()
        elif attempt:
            log.warning(
                "asynq_task_end_not_found",
                task_id=msg.id,
                queue=msg.queue,
                what=what,
                note="the task was no longer this attempt's (another server took it "
                "back, or a write that timed out had run after all)",
            )

    def _write_unwritten(self, *, last: bool = False) -> None:
        """Write again the ends Redis did not take, each only while the task is
        still its attempt's (its lease); drop those whose lease ran out
        (Asynq's syncer: the recoverer takes those tasks back). ``last`` (at
        shutdown): stop at the first failure, each try may wait a socket
        timeout."""
        with self._cond:
            pending, self._unwritten = self._unwritten, []
        keep: list[_Unwritten] = []
        for n, item in enumerate(pending):
            if last and keep:
                keep.extend(pending[n:])
                break
            msg = item.run.msg
            if item.run.lost or not item.run.lease_valid(self._clock()):
                log.warning(
                    "asynq_task_end_abandoned",
                    task_id=msg.id,
                    queue=msg.queue,
                    what=item.what,
                    note="its Asynq lease ran out before Redis took the write: "
                    "a recoverer takes the task back",
                )
                continue
            try:
                took = item.write(item.run.leases())
            except BackendError:
                keep.append(item)
                continue
            self._took(msg, item.what, took, item.written)
        if keep:
            with self._cond:
                self._unwritten = keep + self._unwritten

    def _fail(
        self,
        msg: TaskMessage,
        error: BaseException,
        *,
        archive: bool = False,
        task: Task | None = None,
        run: _Running | None = None,
    ) -> None:
        """Archive (retries exhausted, ``SkipRetry``, ``archive``) or retry, as
        Asynq's ``handleFailedMessage``: exhaustion is checked first, whether
        or not the error counts as a failure."""
        now = self._clock()
        text = error_text(error)
        # A handler's own exception is logged with its traceback; ours are sentences.
        why: dict[str, Any] = {} if isinstance(error, _Failure) else {"exc_info": error}
        if archive or isinstance(error, SkipRetry) or msg.retried >= msg.retry:

            def archived() -> None:
                self._count("archived")
                log.warning(
                    "asynq_task_archived", task_id=msg.id, queue=msg.queue, error=text, **why
                )

            self._write_end(
                run,
                msg,
                "archive",
                lambda leases: broker.archive(
                    self.client, msg, error=text, now_s=now, attempt_leases=leases
                ),
                archived,
            )
            return
        if task is None:
            task = Task(msg, deadline=now, ticket=None, write_result=lambda _: 0, clock=self._clock)
        # Asynq asks its IsFailure of every error, its own (deadline, cancel,
        # lease expired, no handler) included.
        failure = bool(self._call_user("is_failure", self.is_failure, default_is_failure, error))
        delay = max(
            0.0,
            float(
                self._call_user(
                    "retry_delay", self.retry_delay, default_retry_delay, msg.retried, error, task
                )
            ),
        )

        def retried() -> None:
            self._count("retried")
            log.info(
                "asynq_task_retry",
                task_id=msg.id,
                queue=msg.queue,
                error=text,
                in_s=round(delay, 3),
                failure=failure,
                **why,
            )

        self._write_end(
            run,
            msg,
            "retry",
            lambda leases: broker.retry(
                self.client,
                msg,
                retry_at_s=now + delay,
                error=text,
                is_failure=failure,
                now_s=now,
                attempt_leases=leases,
            ),
            retried,
        )

    @staticmethod
    def _call_user(
        name: str, fn: Callable[..., Any], default: Callable[..., Any], *args: Any
    ) -> Any:
        """``fn(*args)``; if the user's function fails, log it and use Asynq's default."""
        try:
            return fn(*args)
        except Exception as exc:
            log.error(
                f"asynq_{name}_failed", error=repr(exc), exc_info=exc, note="Asynq's default used"
            )
            return default(*args)

    def _end(self, run: _Running, error: BaseException | None) -> None:
        """The handler returned: give the GPU back and free the slot."""
        if error is None or isinstance(error, (RevokeTask, RetryLater)):
            outcome = "ok"
        else:
            outcome = "oom" if is_cuda_oom(error) else "error"
        run.ticket.release(outcome)
        with self._cond:
            self._running.pop(run.key, None)
            self._cond.notify_all()

    # -- heartbeat: registration and Asynq leases ------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._beats_end.wait(self.heartbeat_interval):
            try:
                self._beat()
            except Exception as exc:  # the next beat still extends the leases
                self._warn("asynq_heartbeat_failed", error=repr(exc))

    def _beat(self) -> None:
        with self._cond:
            running = list(self._running.values())
        self._extend(running)
        self._write_unwritten()
        info = ServerInfo(
            host=self.host,
            pid=self.pid,
            server_id=self.server_id,
            concurrency=self.concurrency,
            # A class a new policy dropped still has its queues served here.
            queues={q: max(1, self._priority(c)) for q, c in self.queues.items()},
            strict_priority=True,
            # Asynq's server state: "closed" from the start of its shutdown.
            status="closed" if self._stop.is_set() else "active",
            start_time_ns=self._started_ns,
            active_worker_count=len(running),
        )
        workers = [
            WorkerInfo(
                host=self.host,
                pid=self.pid,
                server_id=self.server_id,
                task_id=r.msg.id,
                task_type=r.msg.type,
                task_payload=r.msg.payload,
                queue=r.msg.queue,
                start_time_ns=int(r.started * 1e9),
                deadline_ns=int(r.task.deadline * 1e9),
            )
            for r in running
            if not r.settled
        ]
        try:
            write_server_state(
                self.client, info, workers, ttl_s=2 * self.heartbeat_interval, now_s=self._clock()
            )
        except BackendError as exc:
            self._warn("asynq_server_state_unwritten", error=str(exc))

    def _priority(self, cls: str) -> int:
        cp = self.gate.effective_policy.classes.get(cls)
        return cp.priority if cp is not None else 1

    def _extend(self, running: Iterable[_Running]) -> None:
        by_queue: dict[str, list[_Running]] = {}
        for r in running:
            if not r.settled and not r.lost:
                by_queue.setdefault(r.msg.queue, []).append(r)
        now = self._clock()
        until = int(now + self.lease_duration)
        for queue, runs in by_queue.items():
            try:
                present = set(
                    broker.extend_leases(
                        self.client, queue, [r.msg.id for r in runs], lease_until_s=until
                    )
                )
            except BackendError as exc:
                self._warn("asynq_lease_extension_failed", queue=queue, error=str(exc))
                present = {r.msg.id for r in runs if r.lease_until > now}
                for r in runs:
                    r.lease_tried = until  # it may have run all the same
            else:
                for r in runs:
                    if r.msg.id in present:
                        r.lease_until, r.lease_tried = until, 0
            for r in runs:
                if r.msg.id not in present:
                    r.lost = True
                    self._cancel(r, "lease lost")

    # -- housekeeping: forwarder, recoverer, janitor ---------------------------------

    def _housekeeping_loop(self) -> None:
        clock = time.monotonic
        next_forward = clock()
        next_recover = clock()
        next_janitor = clock() + self.janitor_interval
        while not self._stop.is_set():
            now = clock()
            try:
                if now >= next_forward:
                    next_forward = now + self.forward_interval
                    self.forward()
                if now >= next_recover:
                    next_recover = now + self.recover_interval
                    self.recover()
                if now >= next_janitor:
                    next_janitor = now + self.janitor_interval
                    self.clean_completed()
            except BackendError as exc:
                self._warn("asynq_housekeeping_failed", error=str(exc))
            except Exception as exc:  # a bug must not end the forwarder and recoverer
                log.exception("asynq_housekeeping_failed", error=repr(exc))
            self._stop.wait(max(0.0, min(next_forward, next_recover, next_janitor) - clock()))

    def forward(self) -> int:
        """Move scheduled and retry tasks that are due to pending, in every queue served."""
        now = self._clock()
        return sum(broker.forward(self.client, q, now_s=now) for q in self.queues)

    def recover(self) -> int:
        """Take back tasks whose Asynq lease expired ``recover_grace`` ago (a dead worker's).

        Each goes to retry with Asynq's "task lease expired" error (or is
        archived when out of retries), as Asynq's recoverer does.
        """
        now = self._clock()
        taken = 0
        for queue in self.queues:
            for msg in broker.lease_expired(self.client, queue, cutoff_s=now - self.recover_grace):
                if self._holds(msg.id):
                    continue  # ours and alive: its lease is extended at the next beat
                self._fail(msg, _Failure(broker.ERR_LEASE_EXPIRED))
                taken += 1
        return taken

    def _holds(self, task_id: str) -> bool:
        """Whether an attempt at ``task_id`` runs here unsettled, or its end
        waits to be written."""
        with self._cond:
            return any(
                r.msg.id == task_id and not r.settled for r in self._running.values()
            ) or any(u.run.msg.id == task_id for u in self._unwritten)

    def clean_completed(self) -> int:
        """Delete completed tasks past their retention (Asynq's janitor)."""
        now = self._clock()
        return sum(broker.delete_expired_completed(self.client, q, now_s=now) for q in self.queues)

    # -- cancellation from AsynqMon ------------------------------------------------------

    def _cancel_listener(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is None:
                        continue
                    data = message.get("data")
                    task_id = decode(data)
                    with self._cond:
                        runs = [
                            r
                            for r in self._running.values()
                            if r.msg.id == task_id and not r.settled
                        ]
                    for run in runs:
                        log.info("asynq_task_cancel_requested", task_id=task_id)
                        self._cancel(run, "cancelled")
                        if not run.handler.is_async:
                            self._settle(run, _Failure(_CANCELED))
            except Exception as exc:  # Redis gone, or a bug: listen again
                self._warn("asynq_cancel_listener_failed", error=repr(exc))
                self._stop.wait(self.task_check_interval)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()

    # -- shutdown ---------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + self.shutdown_timeout
        with self._cond:
            while self._running and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            left = list(self._running.values())
        for run in left:
            if not run.end_once():
                continue
            self._cancel(run, "shutdown")
            if run.lost or not run.lease_valid(self._clock()):
                continue  # as Asynq: no write past the lease; the recoverer has it
            try:
                broker.requeue(self.client, run.msg)
                self._count("requeued")
                log.warning(
                    "asynq_task_requeued",
                    task_id=run.msg.id,
                    queue=run.msg.queue,
                    note="still running at the end of shutdown_timeout",
                )
            except BackendError as exc:
                self._warn("asynq_requeue_failed", task_id=run.msg.id, error=str(exc))
        self._write_unwritten(last=True)  # a last try, as Asynq's syncer at shutdown
        with self._cond:
            for item in self._unwritten:
                log.warning(
                    "asynq_task_end_abandoned",
                    task_id=item.run.msg.id,
                    queue=item.run.msg.queue,
                    what=item.what,
                    note="Redis did not take it before shutdown: a recoverer takes the "
                    "task back once its lease runs out",
                )
        # The heartbeat ends last, so that it does not register the server again.
        self._beats_end.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=2.0)
        with contextlib.suppress(BackendError):
            clear_server_state(self.client, self.host, self.pid, self.server_id)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        for t in self._threads:
            t.join(timeout=2.0)
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
        if self._own_client:
            self.client.close()
        self._stopped.set()
        log.info("asynq_worker_stopped", server=self.server_id, **self.stats)

    def _count(self, what: str) -> None:
        with self._stats_lock:
            self.stats[what] += 1

    def _warn(self, event: str, **fields: Any) -> None:
        dropped = self._throttle.allow(event)
        if dropped is not None:
            log.warning(event, dropped=dropped, **fields)

    def __repr__(self) -> str:
        return (
            f"<AsynqWorker {self.host}:{self.pid}:{self.server_id[:8]} "
            f"queues={list(self.queues)} running={len(self._running)}>"
        )
