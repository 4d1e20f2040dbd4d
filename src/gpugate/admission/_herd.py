"""The blocked admissions of one gate, and which of them a wake-up sends to Redis.

Every lease end in the pool wakes every gate. Were every blocked admission to
ask Redis again, N of them would cost N decisions per release, N x N for N
jobs, and every gate of the pool would pay for a release on any host. Two
rules keep a wake-up to the decisions that may go differently.

What was freed. A lease end frees a slot (and, at a later sample, memory) on
its device, one lease of its class's pool-wide count, and at most one token
of its class (a refund). A request whose last answer was a DEFER that none of
these could change keeps that answer (see :func:`_concerns`): ``vram`` on
devices of another host, ``rate`` or the class cap of another class. Every
other wake-up (an override set or lifted, a policy replaced, a message of an
older gate that names only the device, the listener reconnecting) concerns
everyone. A request that keeps its answer still goes to Redis at its own
retry_after (its timer), so no wake-up it misses strands it.

Who answers for whom. When an older request of the same shape (class, device
pin) asking for no more memory deferred since the wake-up, for a reason that
holds for any request of that shape at least as large (the class at its cap,
paused or out of tokens, no device with room, a higher waiter first), Redis
would tell a younger one the same: it has no better claim by priority, aging
or size. A tenant changes no decision (admit_job.lua only writes it into the
lease), so requests of different tenants share a shape. So a wake-up goes,
per shape, in age order:

* the oldest request that no older one answers for is sent to Redis;
* a younger one no smaller waits until every older one no larger has
  answered: if one of them deferred for such a reason, that answer is its own
  too and it sleeps on; if one was admitted (it left), the next is sent.

One decision per wake-up and shape, plus one per admission, instead of one
per waiter. A request's own timer always sends it to Redis (its waiter entry
stays fresh, and a request waits for nobody longer than its timer).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Callable, Collection, Iterator
from typing import NamedTuple

from ._decision import Reason

# Deferring for one of these, a request answers for every younger request of
# its shape asking for at least as much memory.
_HOLDS_FOR_LARGER = frozenset(
    {
        Reason.PAUSED,
        Reason.NO_GPU,
        Reason.STALE_SAMPLE,
        Reason.GPU_LOST,
        Reason.CAP,
        Reason.PRIORITY,
        Reason.VRAM,
        Reason.FRAGMENTED,
        Reason.RATE,
    }
)

# Deferring for one of these, a request can be admitted after a lease end
# only if that lease was on a device it can use: room and slots are per
# device. (A lost GPU, a stale sample or none visible are the gate's own:
# a release changes none of them, but waking for one on its own devices is
# what every wake-up did before, and cheap.)
_ON_ITS_DEVICES = frozenset(
    {
        Reason.VRAM,
        Reason.FRAGMENTED,
        Reason.PRIORITY,
        Reason.STALE_SAMPLE,
        Reason.NO_GPU,
        Reason.GPU_LOST,
    }
)

Shape = tuple[str, str | None]  # class, device


class Freed(NamedTuple):
    """What a lease end gave back (its wake message, written by end_lease in
    _prelude.lua): a slot on ``device`` (and its memory, at a sample taken
    after it), one lease of ``cls``'s pool-wide count, and one token of
    ``cls`` when the release refunded it."""

    device: str
    cls: str


def _concerns(
    reason: str | None, shape: Shape, freed: Freed, devices: Collection[str] | None
) -> bool:
    """Whether a lease end that freed ``freed`` may change the answer a
    request of ``shape`` last had (a DEFER for ``reason``; ``None``: none yet),
    on a gate that can use ``devices`` (``None``: unknown, any)."""
    cls, pinned = shape
    if pinned is not None:
        on_its_devices = freed.device == pinned
    else:
        on_its_devices = devices is None or freed.device in devices
    if reason in _ON_ITS_DEVICES:
        return on_its_devices
    if reason == Reason.CAP:
        # The class's pool-wide cap, or a per-device one (the class's, or the
        # slots all classes share): the DEFER does not say which.
        return freed.cls == cls or on_its_devices
    if reason == Reason.RATE:
        return freed.cls == cls  # a refund (release_lease.lua)
    # A pause is lifted by an override, which wakes everyone, or at its end
    # (its retry_after); any other reason: when unsure, wake.
    return reason != Reason.PAUSED


class Member:
    """One blocked admission of a :class:`Herd`."""

    __slots__ = (
        "busy",
        "event",
        "loop",
        "reason",
        "settled",
        "shape",
        "speaks_for_larger",
        "vram",
    )

    def __init__(self, shape: Shape, vram: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.shape = shape
        self.vram = vram
        # The wake-up generation its last answer holds for (-1: none yet), and
        # whether that answer holds for larger requests of its shape too.
        self.settled = -1
        self.speaks_for_larger = False
        # The reason of that answer: its own last DEFER's, or that of the older
        # member that answered for it. Which lease ends may change the answer
        # follows from it (_concerns).
        self.reason: str | None = None
        # Deciding, or sent to: not to be sent again until it settles.
        self.busy = True
        self.loop = loop
        self.event: threading.Event | asyncio.Event = (
            threading.Event() if loop is None else asyncio.Event()
        )

    def send(self) -> None:
        """Wake it to ask Redis (any thread)."""
        if isinstance(self.event, threading.Event):
            self.event.set()
        else:
            assert self.loop is not None
            # RuntimeError: that loop is closed; its admission is gone.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.event.set)


class Herd:
    """The blocked admissions of one gate, in age order per shape."""

    def __init__(self, devices: Callable[[], Collection[str]] | None = None) -> None:
        """``devices``: the uuids of the devices its gate's requests can run on
        (its sampler's); without it, a lease end on any device concerns them."""
        self._devices = devices
        # Re-entrant: the gate's close() (send_everyone) may run in a signal
        # handler that interrupted a blocked admission's thread in here.
        self._lock = threading.RLock()
        self._generation = 0
        self._shapes: dict[Shape, list[Member]] = {}

    @property
    def generation(self) -> int:
        """How many wake-ups the gate has had: read before a decision, given to :meth:`settle`."""
        return self._generation

    @contextlib.contextmanager
    def joined(
        self, shape: Shape, vram: int, loop: asyncio.AbstractEventLoop | None = None
    ) -> Iterator[Member]:
        """A blocked admission's membership, for as long as it blocks (``loop``:
        the event loop of an asyncio admission)."""
        member = Member(shape, vram, loop)
        with self._lock:
            self._shapes.setdefault(shape, []).append(member)
        try:
            yield member
        finally:
            with self._lock:
                members = self._shapes[shape]
                members.remove(member)
                if members:
                    to_send = self._front(members)
                else:
                    del self._shapes[shape]
                    to_send = []
            for m in to_send:
                m.send()

    def wake(self, freed: Freed | None = None) -> None:
        """A wake-up: send each shape's front to Redis. ``freed``: what the lease
        end that woke it gave back; ``None``: anything may have changed."""
        devices = self._devices() if freed is not None and self._devices is not None else None
        with self._lock:
            answered = self._generation
            self._generation += 1
            if freed is not None:
                # An answer this lease end cannot change holds in the new
                # wake-up too (and for the larger ones it held for).
                for members in self._shapes.values():
                    for m in members:
                        if (
                            m.settled == answered
                            and not m.busy
                            and not _concerns(m.reason, m.shape, freed, devices)
                        ):
                            m.settled = self._generation
            to_send = [m for members in self._shapes.values() for m in self._front(members)]
        for m in to_send:
            m.send()

    def send_everyone(self) -> None:
        """Send every blocked admission (its gate is closing: they end now)."""
        with self._lock:
            everyone = [m for members in self._shapes.values() for m in members]
            for m in everyone:
                m.busy = True
        for m in everyone:
            m.send()

    def settle(self, member: Member, generation: int, reason: str) -> None:
        """``member``, deciding in wake-up ``generation``, deferred for ``reason``,
        and is about to wait."""
        with self._lock:
            member.settled = generation
            member.speaks_for_larger = reason in _HOLDS_FOR_LARGER
            member.reason = reason
            member.busy = False
            to_send = self._front(self._shapes[member.shape])
        for m in to_send:
            m.send()

    def wait(self, member: Member, timeout_s: float) -> bool:
        """Sleep until sent (True) or ``timeout_s`` (False); it is deciding then."""
        assert isinstance(member.event, threading.Event)
        sent = timeout_s > 0 and member.event.wait(timeout_s)
        self._deciding(member)
        return sent

    async def wait_async(self, member: Member, timeout_s: float) -> bool:
        """The asyncio form of :meth:`wait`."""
        assert isinstance(member.event, asyncio.Event)
        sent = False
        if timeout_s > 0:
            try:
                await asyncio.wait_for(member.event.wait(), timeout_s)
                sent = True
            except TimeoutError:
                pass
        self._deciding(member)
        return sent

    def _deciding(self, member: Member) -> None:
        with self._lock:
            member.busy = True
            member.event.clear()

    def _front(self, members: list[Member]) -> list[Member]:
        """The members of one shape to send now (marked busy); those an older
        member answers for are settled in the current generation on the way.
        Called with the lock held."""
        generation = self._generation
        answered = math.inf  # the least memory an older member's answer holds for
        answered_for = None  # that member's reason
        to_answer = math.inf  # the least memory of an older member still to answer
        to_send = []
        for m in members:
            if m.settled == generation:
                if m.speaks_for_larger and m.vram < answered:
                    answered, answered_for = m.vram, m.reason
            elif m.vram >= answered:
                m.settled = generation
                m.speaks_for_larger = True
                m.reason = answered_for
            elif m.vram < to_answer:
                if not m.busy:
                    m.busy = True
                    to_send.append(m)
                to_answer = m.vram
        return to_send
