"""SimulatedSampler: every change shows in the next sample; no change, the same devices."""

from __future__ import annotations

import time

import pytest

from gpugate import ConfigError, SimulatedSampler

GiB = 1 << 30


def test_unchanged_devices_are_handed_out_again() -> None:
    sim = SimulatedSampler(["8GiB"])
    first, second = sim.sample(), sim.sample()
    assert first.devices is second.devices  # callers may reuse what they derived from it
    assert second.taken_mono >= first.taken_mono


def test_every_change_shows_in_the_next_sample() -> None:
    sim = SimulatedSampler(["8GiB", "8GiB"])
    seen = [sim.sample().devices]

    def changed() -> tuple:
        devices = sim.sample().devices
        assert devices is not seen[-1]
        seen.append(devices)
        return devices

    sim.set_used(0, "1GiB")
    assert changed()[0].used == GiB
    sim.allocate(0, "1GiB")
    assert changed()[0].used == 2 * GiB
    sim.free(0, "512MiB")
    assert changed()[0].used == GiB + GiB // 2
    sim.set_total(1, "4GiB")
    assert changed()[1].total == 4 * GiB
    sim.set_process(1, 7, "1GiB")
    assert changed()[1].processes[0].pid == 7
    sim.lose(0)
    assert [d.index for d in changed()] == [1]
    lost = sim.sample()
    assert lost.quarantined == {sim.uuid(0)}
    assert [(f.index, f.error) for f in lost.faults] == [(0, "GPU_IS_LOST")]
    sim.restore(0)
    assert [d.index for d in changed()] == [0, 1]
    assert sim.sample().faults == ()
    with pytest.raises(ConfigError):
        sim.restore(7)
    sim.script([(0.0, 1, "3GiB")])
    time.sleep(0.01)
    assert changed()[1].used == 3 * GiB
    sim.set_total(1, "2GiB")  # the use never exceeds the total
    assert changed()[1].used == 2 * GiB
