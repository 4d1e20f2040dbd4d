"""Which blocked admissions a wake-up sends to Redis (admission/_herd.py).

What that saves a gate with many of them: ``TestManyWaiters`` in
test_admission.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from gpugate.admission._decision import Reason
from gpugate.admission._herd import Freed, Herd, Member
from gpugate.admission._wake import freed_by

BATCH = ("batch", None)
HOST_A = frozenset({"GPU-A0", "GPU-A1"})  # the devices of the gate's host


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
        shapes = [BATCH, ("batch", "GPU-1"), ("inter", None)]
        with (
            herd.joined(shapes[0], 10) as a,
            herd.joined(shapes[1], 10) as b,
            herd.joined(shapes[2], 10) as c,
        ):
            waiting(herd, a, b, c)
            herd.wake()
            assert all(sent(m) for m in (a, b, c))

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


def woken_by(
    reason: str, *freed: Freed | None, shape: tuple[str, str | None] = BATCH
) -> list[bool]:
    """For each of ``freed`` in turn: whether a request of ``shape`` on a gate
    of host A, waiting after a DEFER for ``reason``, is sent to Redis."""
    herd = Herd(lambda: HOST_A)
    woken = []
    with herd.joined(shape, 10) as m:
        waiting(herd, m, reason=reason)
        for f in freed:
            herd.wake(f)
            woken.append(sent(m))
            if sent(m):
                herd.wait(m, 0)
                herd.settle(m, herd.generation, reason)
    return woken


class TestWhatALeaseEndConcerns:
    """A lease end sends only the requests whose last DEFER what it freed may change."""

    def test_memory_and_slots_on_its_own_hosts_devices_only(self) -> None:
        for reason in (Reason.VRAM, Reason.FRAGMENTED, Reason.PRIORITY):
            woken = woken_by(reason, Freed("GPU-B0", "batch"), Freed("GPU-A1", "inter"))
            assert woken == [False, True], reason

    def test_a_pinned_request_on_its_device_only(self) -> None:
        assert woken_by(
            Reason.VRAM,
            Freed("GPU-A1", "batch"),
            Freed("GPU-A0", "batch"),
            shape=("batch", "GPU-A0"),
        ) == [False, True]

    def test_a_cap_on_a_release_of_its_class_anywhere_or_on_its_own_devices(self) -> None:
        # The class's pool-wide cap, or a per-device slot: a DEFER cap does not say which.
        assert woken_by(
            Reason.CAP,
            Freed("GPU-B0", "inter"),
            Freed("GPU-B0", "batch"),
            Freed("GPU-A0", "inter"),
        ) == [False, True, True]

    def test_a_token_bucket_on_a_release_of_its_class_only(self) -> None:
        # A release may refund its class's token; it frees no other class's.
        assert woken_by(Reason.RATE, Freed("GPU-A0", "inter"), Freed("GPU-B0", "batch")) == [
            False,
            True,
        ]

    def test_a_pause_on_no_release(self) -> None:
        assert woken_by(Reason.PAUSED, Freed("GPU-A0", "batch"), None) == [False, True]

    def test_any_other_wake_up_sends_every_reason(self) -> None:
        for reason in (Reason.PAUSED, Reason.RATE, Reason.CAP, Reason.VRAM, Reason.NO_GPU):
            assert woken_by(reason, None) == [True], reason

    def test_a_reason_without_a_rule_on_any_release(self) -> None:
        assert woken_by(Reason.BACKEND_UNAVAILABLE, Freed("GPU-B0", "inter")) == [True]

    def test_a_gate_that_cannot_tell_its_devices_wakes_on_any(self) -> None:
        herd = Herd()
        with herd.joined(BATCH, 10) as m:
            waiting(herd, m, reason=Reason.VRAM)
            herd.wake(Freed("GPU-B0", "inter"))
            assert sent(m)

    def test_an_answer_a_release_leaves_standing_still_answers_for_the_larger(self) -> None:
        herd = Herd(lambda: HOST_A)
        with herd.joined(BATCH, 10) as old, herd.joined(BATCH, 20) as larger:
            waiting(herd, old, larger, reason=Reason.VRAM)
            herd.wake(Freed("GPU-B0", "batch"))
            assert not sent(old)
            assert not sent(larger)
            herd.wake(Freed("GPU-A0", "batch"))
            assert sent(old)
            assert not sent(larger)

    def test_a_request_answered_for_takes_the_older_ones_reason(self) -> None:
        herd = Herd(lambda: HOST_A)
        with contextlib.ExitStack() as stack:
            first = herd.joined(BATCH, 10)
            old = first.__enter__()
            larger = stack.enter_context(herd.joined(BATCH, 20))
            waiting(herd, old, larger, reason=Reason.VRAM)
            herd.wake(Freed("GPU-A0", "batch"))
            herd.wait(old, 0)
            herd.settle(old, herd.generation, Reason.CAP)  # answers for ``larger``
            assert larger.reason == Reason.CAP
            # Its class's cap on another host: ``old`` goes; ``larger`` waits
            # for it, and goes once it is admitted (it leaves). Keeping its own
            # (stale) vram, it would have slept on.
            herd.wake(Freed("GPU-B0", "batch"))
            assert sent(old)
            assert not sent(larger)
            herd.wait(old, 0)
            first.__exit__(None, None, None)
            assert sent(larger)


class TestWakeMessages:
    """What a message on the wake channel says was freed."""

    def test_a_lease_end_names_its_device_and_class(self) -> None:
        assert freed_by(b"GPU-A0 batch") == Freed("GPU-A0", "batch")
        assert freed_by("SIM host 0 batch") == Freed("SIM host 0", "batch")

    def test_anything_else_may_concern_everyone(self) -> None:
        # An override changed, a policy replaced, a bare uuid from a gate of
        # the previous release.
        for data in (b"override", b"policy", b"GPU-A0", b"", None, 1):
            assert freed_by(data) is None, data
