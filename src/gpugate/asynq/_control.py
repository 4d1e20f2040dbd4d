"""Pause and unpause Asynq queues the way Asynq does, with gpugate's expiry and ownership.

Asynq pauses a queue by creating ``asynq:{<queue>}:paused`` (value: Unix
seconds, no TTL; ``Inspector.PauseQueue``, AsynqMon's pause button, ``asynq
queue pause``) and unpauses it by deleting the key. Its servers check that
key before every dequeue, and AsynqMon shows the queue paused while it
exists. :func:`pause_queue` writes the same key, so Go servers stop taking
the queue's tasks and AsynqMon shows it paused; it also records the pause as
gpugate's (who, why, until when) in ``gpugate:asynq:{<queue>}:pause``.

Expiry: a pause with a ``duration`` gives the paused key that TTL, so Redis
itself ends the pause on time, with no gpugate process running. Only
gpugate's own pauses ever get a TTL: a queue paused by anyone else is left
as it is (``already_paused``), and a pause lifted and set again with
Asynq's tools is a new key without a TTL, which nothing in gpugate ends by
itself (DESIGN decision 7). :func:`unpause_queue` with ``only_own=True``
(what ``gpugate resume`` of a class uses) likewise leaves others' pauses alone.

Each call is one script (``asynq_pause_queue.lua``, ``asynq_unpause_queue.lua``):
the ownership check and the write see the same key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import structlog

from .._units import lifetime_ms
from ..state._connect import Client
from ._keys import AsynqKeys, decode
from ._run import run_script

__all__ = ["PauseResult", "UnpauseResult", "pause_queue", "unpause_queue"]

log = structlog.get_logger(__name__)

_PAUSED_HINT = "asynq:{{{queue}}}:paused should be a string, as Asynq writes it"


@dataclass(frozen=True, slots=True)
class PauseResult:
    """What :func:`pause_queue` did.

    ``outcome``: ``"paused"`` (it was not paused; now it is, as gpugate's
    pause), ``"extended"`` (it was gpugate's pause; expiry, who and why now
    as given), ``"already_paused"`` (someone else's pause: nothing changed,
    and gpugate will not end it). ``paused_at_s``: the paused key's value
    (Unix s). ``until_ms``: when the pause ends by itself (0 = no expiry;
    also 0 for ``already_paused``). ``now_ms``: the scripts' time of the call.
    """

    queue: str
    outcome: Literal["paused", "extended", "already_paused"]
    paused_at_s: int
    until_ms: int
    now_ms: int

    @property
    def owned(self) -> bool:
        """Whether the pause in force is gpugate's."""
        return self.outcome != "already_paused"


@dataclass(frozen=True, slots=True)
class UnpauseResult:
    """What :func:`unpause_queue` did.

    ``outcome``: ``"unpaused"``, ``"not_paused"``, or ``"not_ours"`` (asked for
    gpugate's own pause only, and the pause is someone else's: nothing
    changed). ``was_gpugates``: the lifted pause was gpugate's.
    """

    queue: str
    outcome: Literal["unpaused", "not_paused", "not_ours"]
    was_gpugates: bool


def pause_queue(
    client: Client,
    queue: str,
    *,
    duration: float | str | None = None,
    who: str = "",
    reason: str = "",
    pool: str = "",
    cls: str = "",
    now_ms: int | None = None,
) -> PauseResult:
    """Pause Asynq queue ``queue`` as Asynq does, as gpugate's pause.

    Go servers stop dequeuing it and AsynqMon shows it paused. With
    ``duration`` (seconds or ``"30m"``) Redis ends the pause when it is up;
    without, it lasts until unpaused. Pausing a queue gpugate already paused
    replaces the expiry, who and why (the paused key keeps its value);
    pausing a queue someone else paused changes nothing (``already_paused``).
    ``pool`` and ``cls`` name the class pause this belongs to, for status.
    ``now_ms`` injects the scripts' clock (tests): the paused key's value is
    its second.
    """
    keys = AsynqKeys(queue)
    for_ms = lifetime_ms(duration)
    outcome, value, until_ms, now = run_script(
        client,
        "asynq_pause_queue",
        f"pause Asynq queue {queue!r}",
        [keys.paused, keys.pause_marker],
        [now_ms or 0, for_ms, who, reason, pool, cls],
        hint=_PAUSED_HINT.format(queue=queue),
    )
    result = PauseResult(
        queue=queue,
        outcome=decode(outcome),  # type: ignore[arg-type]
        paused_at_s=int(decode(value)),
        until_ms=int(until_ms),
        now_ms=int(now),
    )
    log.info(
        "asynq_queue_paused" if result.owned else "asynq_queue_already_paused",
        queue=queue,
        outcome=result.outcome,
        duration_s=for_ms / 1000 if result.owned else None,
        who=who,
        reason=reason,
        cls=cls or None,
    )
    return result


def unpause_queue(client: Client, queue: str, *, only_own: bool = False) -> UnpauseResult:
    """Unpause Asynq queue ``queue``: delete its paused key, as Asynq's UnpauseQueue does.

    ``only_own``: only if the pause is gpugate's (``not_ours`` otherwise, and
    nothing changes). Unpausing a queue that is not paused is no error
    (``not_paused``), unlike in Asynq.
    """
    keys = AsynqKeys(queue)
    outcome, was_ours, _value = run_script(
        client,
        "asynq_unpause_queue",
        f"unpause Asynq queue {queue!r}",
        [keys.paused, keys.pause_marker],
        ["1" if only_own else "0"],
        hint=_PAUSED_HINT.format(queue=queue),
    )
    result = UnpauseResult(
        queue=queue,
        outcome=decode(outcome),  # type: ignore[arg-type]
        was_gpugates=bool(was_ours),
    )
    if result.outcome == "unpaused":
        log.info("asynq_queue_unpaused", queue=queue, was_gpugates=result.was_gpugates)
    return result
