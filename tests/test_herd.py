"""Which blocked admissions a wake-up sends to Redis (admission/_herd.py).

What that saves a gate with many of them: ``TestManyWaiters`` in
test_admission.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from gpugate.admission._decision import Reason
from gpugate.admission._herd import Herd, Member

BATCH = ("batch", None, None)


def waiting(herd: Herd, *members: Member, reason: str = Reason.CAP) -> None:
    """Each of ``members`` deferred for ``reason`` in the current wake-up, and waits."""
    for m in members:
        herd.settle(m, herd.generation, reason)


def sent(member: Member) -> bool:
    assert isinstance(member.event, threading.Event)
    return member.event.is_set()


class TestHerd:
    """A wake-up sends, per shape, the oldest request no older one answers for."""

    def test_an_older_requests_deferral_answers_for_the_younger_ones_no_smaller(self) -> None:
        herd = Herd()
        with (
            herd.joined(BATCH, 10) as old,
            herd.joined(BATCH, 10) as same,
            herd.joined(BATCH, 20) as larger,
        ):
            waiting(herd, old, same, larger)
            herd.wake()
            assert [sent(m) for m in (old, same, larger)] == [True, False, False]
            herd.wait(old, 0)
            herd.settle(old, herd.generation, Reason.CAP)
            # Answered for, and left asleep.
            assert [sent(m) for m in (same, larger)] == [False, False]
            assert same.settled == larger.settled == herd.generation

    def test_a_smaller_younger_request_is_sent_alongside_a_larger_older_one(self) -> None:
        herd = Herd()
        with herd.joined(BATCH, 40) as large, herd.joined(BATCH, 10) as small:
            waiting(herd, large, small, reason=Reason.VRAM)
            herd.wake()
            assert sent(large)
            assert sent(small)

    def test_an_admitted_request_leaving_sends_the_next_one(self) -> None:
        herd = Herd()
        with contextlib.ExitStack() as stack:
            first = herd.joined(BATCH, 10)
            oldest = first.__enter__()
            second = stack.enter_context(herd.joined(BATCH, 10))
            third = stack.enter_context(herd.joined(BATCH, 10))
            waiting(herd, oldest, second, third)
            herd.wake()
            assert [sent(m) for m in (oldest, second, third)] == [True, False, False]
            herd.wait(oldest, 0)  # deciding ...
            first.__exit__(None, None, None)  # ... admitted: it leaves
            assert sent(second)
            assert not sent(third)

    def test_a_deferral_that_does_not_hold_for_larger_requests_answers_for_none(self) -> None:
        herd = Herd()
        with herd.joined(BATCH, 10) as old, herd.joined(BATCH, 10) as young:
            waiting(herd, old, young)
            herd.wake()
            assert sent(old)
            assert not sent(young)
            herd.wait(old, 0)
            herd.settle(old, herd.generation, Reason.BACKEND_UNAVAILABLE)
            assert sent(young)

    def test_a_decision_started_before_a_wake_up_holds_younger_ones_until_it_settles(
        self,
    ) -> None:
        herd = Herd()
        with herd.joined(BATCH, 10) as old, herd.joined(BATCH, 10) as young:
            started = herd.generation  # ``old`` decides (its first decision) ...
            waiting(herd, young)
            herd.wake()  # ... and a release wakes the gate meanwhile
            assert not sent(young)
            herd.settle(old, started, Reason.CAP)
            # ``old``'s answer predates the wake-up: ``old`` goes again, first.
            assert sent(old)
            assert not sent(young)

    def test_shapes_are_apart(self) -> None:
        herd = Herd()
        shapes = [BATCH, ("batch", "team-a", None), ("batch", None, "GPU-1"), ("inter", None, None)]
        with (
            herd.joined(shapes[0], 10) as a,
            herd.joined(shapes[1], 10) as b,
            herd.joined(shapes[2], 10) as c,
            herd.joined(shapes[3], 10) as d,
        ):
            waiting(herd, a, b, c, d)
            herd.wake()
            assert all(sent(m) for m in (a, b, c, d))

    def test_closing_sends_everyone(self) -> None:
        herd = Herd()
        with herd.joined(BATCH, 10) as old, herd.joined(BATCH, 10) as young:
            waiting(herd, old, young)
            herd.send_everyone()
            assert sent(old)
            assert sent(young)

    def test_a_timer_sends_a_request_whatever_the_others_do(self) -> None:
        herd = Herd()
        with herd.joined(BATCH, 10) as old, herd.joined(BATCH, 10) as young:
            waiting(herd, old, young)
            assert herd.wait(young, 0.05) is False  # its timer: it decides
            assert young.busy

    def test_asyncio_members_are_sent_on_their_loop(self) -> None:
        herd = Herd()

        async def main() -> tuple[bool, bool]:
            loop = asyncio.get_running_loop()
            with herd.joined(BATCH, 10, loop) as old, herd.joined(BATCH, 10, loop) as young:
                waiting(herd, old, young)
                threading.Thread(target=herd.wake).start()  # the listener's thread
                first = await herd.wait_async(old, 5)
                second = await herd.wait_async(young, 0.1)
                return first, second

        assert asyncio.run(main()) == (True, False)
