"""Admission as a state machine: a pure-Python model predicts every decision.

Gates share one pool of a real Redis and two simulated 40 GiB GPUs. Script
time is a fake clock, so expiries are exact, and samples are always 0 ms old,
so a sample's time in the scripts is the script time itself. After every
operation the model's prediction (outcome, reason, device, lease id, expiry,
the VRAM it saw available, whether the local pre-check answered, and
``retry_after`` where it is exact) must match the gate's answer, and the
pool's state in Redis (counters, leases and ghosts, expiries, waiters, token
buckets, the script clock) must match the model's. Safety invariants are
also checked from Redis alone: class and device caps, and every device's
leases (and the ghosts a decision would still count) within its memory.

The model follows the design, and ``admit_job.lua`` where the design is
silent. It covers: lazy reaping of expired leases; pauses and runtime caps
with and without expiry (and their clean-up); the freshest-sample rule (a
stored sample of the same instant wins over the caller's); never-fits
against capacity less the reserves of higher classes; class, per-class
per-device and shared device caps ("slot" waiters); waiters (refreshed by
every DEFER with what they wait for and their device, expiring after the
waiter TTL, aging); priority hold-back by the highest live waiter of a
device; VRAM with ghosts counting until a sample taken after the release,
reported actuals and unmanaged memory; best-fit and spread placement; token
buckets with their exact retry; heartbeats (renewal, lost leases, dropped
lease objects released); the clock stepping back (script time never does);
and the local pre-check of ``try_admit``.

It leaves out: blocking ``admit`` (``test_admission.py``), max durations,
``device=`` pinning, tenants, lost GPUs and stale samples, refunds, and
exactly when a reported actual was measured (the heartbeat takes that from
the host's monotonic clock; it is always before the next sample here).

Known deviations of the scripts from the design are listed in
``KNOWN_DEVIATIONS``, each with a focused test in :class:`TestFoundByTheMachine`
that asserts the design. While one is listed, the machine accepts the
scripts' answer when it is exactly what the deviation produces (and notes
it), so that it keeps looking for other bugs; drop the entry once fixed.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conftest import FakeClock
from gpugate import Gate, Lease, Outcome, Policy, SimulatedSampler, Snapshot
from gpugate.admission._gate import _poller
from gpugate.state._keys import PoolKeys
from gpugate.state._server import RedisProcess
from strategies import (
    ADMISSION_CLASSES,
    admission_steps,
    clock_steps_ms,
    device_usages,
    override_durations,
    request_sizes,
)

GiB = 1 << 30
DEVICE_TOTAL = 40 * GiB
N_DEVICES = 2

# Deviations of the scripts from the design that the machine tolerates (see
# the module docstring and TestKnownDeviations).
KNOWN_DEVIATIONS: frozenset[str] = frozenset()


def poll_waiter(owner: str, cls: str, vram: int) -> str:
    """The waiter id of a try_admit of ``owner``'s gate, with no device pin,
    polled from this thread (the machine runs in one)."""
    return f"{owner}|{cls}|{vram}||{_poller()}"


STEP_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def machine_policy(placement: str = "best-fit", aging: str = "0/s") -> Policy:
    """Three classes, each with something that makes it wait.

    interactive: pool cap 3 and 4 GiB reserved for it; notebook: 2 GiB more
    reserved for it and interactive; batch: pool cap 3, 2 per device, 4/s
    with a burst of 2. At most 3 leases of any class on one device.
    """
    return Policy.from_dict(
        {
            "pool": {
                "safety_margin": "2GiB",
                "lease_ttl": "10s",
                "waiter_ttl": "4s",
                "retry_max": "30s",
                "sample_max_age": "2s",
                "max_per_device": 3,
                "placement": placement,
                "priority_aging": aging,
            },
            "classes": {
                "interactive": {"priority": 100, "max_concurrent": 3, "reserve": "4GiB"},
                "notebook": {"priority": 50, "reserve": "2GiB"},
                "batch": {
                    "priority": 10,
                    "max_concurrent": 3,
                    "max_per_device": 2,
                    "rate": "4/s",
                    "burst": 2,
                },
            },
        }
    )


class _NowSnapshot(Snapshot):
    """A snapshot that is always 0 ms old, as a whole and device by device
    (the gate sends each device's age: a slow host made it 1 ms now and then,
    a sample 1 ms older than the model's, and a ghost released in that ms
    counted on in the scripts only; seen once in a CI run)."""

    def age_s(self, now_mono: float | None = None) -> float:
        return 0.0

    def device_ages_ms(self, now_mono: float) -> list[int]:
        return [0] * len(self.devices)


class AgelessSampler:
    """Samples of a SimulatedSampler, each 0 ms old when the gate sends it.

    Script time is a fake clock while sample ages come from the host's
    monotonic clock; pinning the age makes a sample's time in the scripts
    exactly the script time of the decision.
    """

    backend = "simulated"

    def __init__(self, inner: SimulatedSampler) -> None:
        self.inner = inner

    def sample(self) -> Snapshot:
        s = self.inner.sample()
        return _NowSnapshot(
            devices=s.devices, taken_mono=s.taken_mono, host=s.host, backend=s.backend
        )


class ManualHeartbeat:
    """Stands in for a gate's heartbeat thread: leases are renewed only by
    ``beat_now`` from the test, never by a thread at a moment the model
    cannot know."""

    def start(self) -> None:
        pass

    def kick(self) -> None:
        pass

    def stop(self, timeout_s: float = 2.0) -> None:
        pass


# -- the model -------------------------------------------------------------------


@dataclass
class ClassRow:
    """A class as the scripts read it (``-1``: no cap; rate per ms, 0: no bucket)."""

    prio: int
    cap: int
    dev_cap: int
    rate: float
    burst: int
    reserve_above: int


@dataclass
class LeaseRec:
    """A lease record in a device hash: live while ``r`` is 0, else a ghost."""

    id: str
    cls: str
    dev: int
    e: int
    gate: int
    a: int = 0
    r: int = 0


@dataclass(frozen=True)
class Waiter:
    """A waiter record (see the prelude): priority, since, vram, what it waits
    for, expiry, device, class, reason, the class's reserve_above; never pinned
    here."""

    p: int
    s: int
    v: int
    w: str
    x: int
    d: str
    c: str
    r: str
    a: int

    def encode(self) -> str:
        return f"{self.p} {self.s} {self.v} {self.w} {self.x} {self.d} {self.c} {self.r} {self.a} -"


@dataclass(frozen=True)
class Prediction:
    """What a decision should be. ``retry_ms`` is exact for rate and paused,
    ``None`` where it is an estimate, 0 for ADMIT and REJECT."""

    outcome: str
    reason: str
    retry_ms: int | None = 0
    device: int | None = None
    lease_id: str | None = None
    expires_ms: int | None = None
    available: int | None = None


@dataclass
class Model:
    """The pool's state and the admission rules, in plain Python.

    Mirrors what the scripts keep in Redis, field for field, so that the
    state itself can be compared after every step.
    """

    policy: Policy
    uuids: list[str]
    n_gates: int
    last: int = 0  # the script clock recorded in the state hash (0: none yet)
    seq: int = 0
    swept: int = 0  # when a heartbeat last swept lapsed waiters (renew_leases.lua)
    leases: dict[str, LeaseRec] = field(default_factory=dict)  # live leases and ghosts
    exp: dict[str, int] = field(default_factory=dict)  # live lease id -> expiry
    waiters: dict[str, Waiter] = field(default_factory=dict)
    samples: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # total used ts
    buckets: dict[str, tuple[float, int]] = field(default_factory=dict)
    pauses: dict[str, int] = field(default_factory=dict)
    caps: dict[str, tuple[int, int]] = field(default_factory=dict)
    held: list[set[str]] = field(default_factory=list)  # per gate: in its lease registry
    lost: set[str] = field(default_factory=set)
    recent: list[set[tuple[str, int, str]]] = field(default_factory=list)  # per gate
    reports: dict[str, int] = field(default_factory=dict)  # lease id -> actual to send

    def __post_init__(self) -> None:
        wire = self.policy.to_wire()
        pool = wire["pool"]
        self.margin: int = pool["margin"]
        self.ttl: int = pool["ttl_ms"]
        self.placement: str = pool["placement"]
        self.max_age: int = pool["max_age_ms"]
        self.waiter_ttl: int = pool["waiter_ttl_ms"]
        self.aging: float = pool["aging_per_ms"]
        self.retry_max: int = pool["retry_max_ms"]
        self.shared_cap: int = pool["max_per_device"]
        self.classes = {
            name: ClassRow(c["prio"], c["cap"], c["dev_cap"], c["rate_per_ms"], c["burst"],
                           self.policy.reserve_above(name))
            for name, c in wire["classes"].items()
        }  # fmt: skip
        self.held = [set() for _ in range(self.n_gates)]
        self.recent = [set() for _ in range(self.n_gates)]

    def clone(self) -> Model:
        """A copy whose state changes leave this one as it is (the policy is shared)."""
        twin = copy.copy(self)
        twin.leases = {i: dataclasses.replace(rec) for i, rec in self.leases.items()}
        for name in ("exp", "waiters", "samples", "buckets", "pauses", "caps", "reports"):
            setattr(twin, name, dict(getattr(self, name)))
        twin.held = [set(h) for h in self.held]
        twin.recent = [set(r) for r in self.recent]
        twin.lost = set(self.lost)
        return twin

    # -- helpers ---------------------------------------------------------------

    @property
    def estimate_ms(self) -> int:
        return min(self.retry_max, max(100, min(self.ttl // 3, self.waiter_ttl // 2)))

    def count(self, cls: str | None = None, dev: int | None = None) -> int:
        return sum(
            1
            for rec in self.leases.values()
            if rec.r == 0 and (cls is None or rec.cls == cls) and (dev is None or rec.dev == dev)
        )

    def script_now(self, fake_ms: int) -> int:
        return max(fake_ms, self.last)

    def _record_clock(self, now: int) -> None:
        self.last = max(self.last, now)

    def _end(self, lease_id: str, now: int) -> None:
        self.leases[lease_id].r = now
        del self.exp[lease_id]

    def _reap(self, now: int) -> int:
        expired = [i for i, x in self.exp.items() if x <= now]
        for i in expired:
            self._end(i, now)
        return len(expired)

    def effective_cap(self, cls: str, now: int) -> int:
        """The class cap a decision at script time ``now`` enforces."""
        cap = self.classes[cls].cap
        if cls in self.caps:
            n, until = self.caps[cls]
            if (until == 0 or until > now) and (cap < 0 or n < cap):
                cap = n
        return cap

    # -- operations --------------------------------------------------------------

    def local_defer(self, gate: int, cls: str, vram: int, used: list[int]) -> bool:
        """Whether try_admit answers DEFER itself (a fresh recent DEFER, nothing fits locally)."""
        if (cls, vram, "") not in self.recent[gate]:
            return False
        return not any(max(0, DEVICE_TOTAL - u) >= vram + self.margin for u in used)

    def admit(
        self,
        gate: int,
        owner: str,
        cls: str,
        vram: int,
        fake_ms: int,
        used: list[int],
        *,
        stale_own_since: bool = False,
    ) -> Prediction:
        """One ``try_admit`` that reaches Redis: the prediction, and the state after it."""
        waiter_id = poll_waiter(owner, cls, vram)
        row = self.classes[cls]
        now = self.script_now(fake_ms)
        if self._reap(now):
            self._record_clock(now)

        paused_since: list[int | None] = [None]

        def since() -> int:
            if paused_since[0] is not None:
                return paused_since[0]
            own = self.waiters.get(waiter_id)
            if own is None or (own.x <= now and not stale_own_since):
                return now
            return own.s

        def defer(
            reason: str,
            retry: int | None,
            device: int | None,
            wants: str,
            available: int | None = None,
        ) -> Prediction:
            d = self.uuids[device] if device is not None else "-"
            self.waiters[waiter_id] = Waiter(
                row.prio,
                since(),
                vram,
                wants,
                now + self.waiter_ttl,
                d,
                cls,
                reason,
                row.reserve_above,
            )
            self.recent[gate].add((cls, vram, ""))
            return Prediction("defer", reason, retry, available=available)

        until = self.pauses.get(cls)
        if until is not None and (until == 0 or until > now):
            paused_since[0] = now  # a paused class does not age
            return defer("paused", until - now if until > 0 else self.retry_max, None, "-")
        cap = self.effective_cap(cls, now)

        cand: list[tuple[int, int, int, int]] = []  # device, total, used, ts
        fits_listed = False  # capacity does not go stale: never-fits looks at every device
        unstored: set[int] = set()  # devices whose newer sample was not written (100 ms)
        for i in range(len(self.uuids)):
            total, use, ts = DEVICE_TOTAL, used[i], now
            stored = self.samples.get(i)
            s_ts = -1
            if stored is not None:
                s_ts = stored[2]
                if s_ts >= ts:
                    total, use, ts = stored
            if ts >= s_ts + 100:
                self.samples[i] = (total, use, ts)
            elif ts > s_ts:
                unstored.add(i)
            fits_listed |= total - self.margin - row.reserve_above >= vram
            if now - ts <= self.max_age:
                cand.append((i, total, use, ts))
        if not cand:
            return defer("stale_sample", None, None, "-")

        if not any(total - self.margin - row.reserve_above >= vram for _, total, _, _ in cand):
            if fits_listed:
                return defer("stale_sample", None, None, "-")
            return Prediction("reject", "too_large")
        if cap >= 0 and self.count(cls) >= cap:
            return defer("cap", None, None, "-")

        slotted = []
        slot_blocked = None
        for c in cand:
            n_cls, n_all = self.count(cls, c[0]), self.count(None, c[0])
            if row.dev_cap < 0 or n_cls < row.dev_cap:
                if self.shared_cap < 0 or n_all < self.shared_cap:
                    slotted.append(c)
                elif slot_blocked is None:
                    slot_blocked = c[0]
        if not slotted:
            if slot_blocked is not None:
                return defer("cap", None, slot_blocked, "slot")
            return defer("cap", None, None, "-")

        waiting_on: dict[str, list[tuple[int, int]]] = {}
        # waiters for memory or a slot: (effective priority, vram, their class's reserve_above)
        wanted: list[tuple[float, int, int]] = []
        for wid, w in list(self.waiters.items()):
            if wid == waiter_id:
                continue
            if w.x <= now:
                del self.waiters[wid]
            elif w.w != "-" and w.d != "-":
                waiting_on.setdefault(w.d, []).append((w.p, w.s))
                if w.d in self.uuids:  # a waiter of this host
                    wanted.append((w.p + self.aging * (now - w.s), w.v, w.a))
        my_eff = row.prio + self.aging * (now - since())
        # A device is held back by the highest of the live waiters for it.
        blocked = {
            i: any(p + self.aging * (now - s) > my_eff for p, s in waiting_on.get(dev_uuid, []))
            for i, dev_uuid in enumerate(self.uuids)
        }
        # ... and by a waiter above this request that could go there now (its
        # VRAM fits with its own class's reserve left free), and could not
        # once this request took its share of memory or the last free slot.
        needs = [(v, a) for eff, v, a in wanted if eff > my_eff]

        # Ghosts on the other devices that no decision can need any more: any
        # decision that looks at their device has a sample taken after them.
        looked_at = {c[0] for c in slotted}
        for lid, rec in list(self.leases.items()):
            if 0 < rec.r < now - self.max_age and rec.dev not in looked_at:
                del self.leases[lid]

        best = closest = None
        best_avail = closest_avail = 0
        closest_holds = False  # the device a DEFER waits for could ever hold the request
        held_back = False
        for i, total, use, ts in slotted:
            reserved = measured = 0
            for lid, rec in list(self.leases.items()):
                if rec.dev != i:
                    continue
                if 0 < rec.r < ts:
                    del self.leases[lid]  # a sample after the release shows it gone
                    if i in unstored:  # ... and the stored sample is that one from now on
                        self.samples[i] = (total, use, ts)
                        unstored.discard(i)
                    continue
                reserved += max(rec.e, rec.a)
                measured += rec.a  # measured (by the heartbeat) before any later sample
            unmanaged = max(0, use - measured)
            avail = total - unmanaged - reserved - self.margin - row.reserve_above
            free = total - unmanaged - reserved - self.margin
            if avail >= vram:
                last_slot = self.shared_cap >= 0 and self.count(None, i) + 1 >= self.shared_cap
                fit = [(n, a) for n, a in needs if free - a - n >= 0]
                # ... and the room those that fit here now need together
                joint = free - max((a for _, a in fit), default=0) - sum(n for n, _ in fit)
                if (
                    blocked.get(i, False)
                    or any(last_slot or free - a - n < vram for n, a in fit)
                    or (fit and 0 <= joint < vram)
                ):
                    held_back = True
                elif (
                    best is None
                    or (self.placement == "spread" and avail > best_avail)
                    or (self.placement != "spread" and avail < best_avail)
                ):
                    best, best_avail = i, avail
            holds = total - self.margin - row.reserve_above >= vram
            if (
                closest is None
                or (holds and not closest_holds)
                or (holds == closest_holds and avail > closest_avail)
            ):
                closest, closest_avail, closest_holds = i, avail, holds
        if best is None:
            return defer("priority" if held_back else "vram", None, closest, "vram", closest_avail)

        if row.rate > 0:
            tokens, updated = self.buckets.get(cls, (float(row.burst), now))
            if now > updated:
                tokens = min(float(row.burst), tokens + (now - updated) * row.rate)
            if tokens < 1:
                return defer("rate", math.ceil((1 - tokens) / row.rate), best, "-", best_avail)
            self.buckets[cls] = (tokens - 1, now)

        self.seq = max(self.seq + 1, now * 1000)
        lease_id = str(self.seq)
        self.leases[lease_id] = LeaseRec(lease_id, cls, best, vram, gate)
        self.exp[lease_id] = now + self.ttl
        self._record_clock(now)
        self.waiters.pop(waiter_id, None)
        self.held[gate].add(lease_id)
        return Prediction("admit", "ok", 0, best, lease_id, now + self.ttl, best_avail)

    def release(self, gate: int, lease_id: str, fake_ms: int) -> bool:
        """``release_lease.lua``: True if the lease was still in the expiry set."""
        self.held[gate].discard(lease_id)
        now = self.script_now(fake_ms)
        self._record_clock(now)
        if lease_id not in self.exp:
            return False
        self._end(lease_id, now)
        return True

    def beat(self, gate: int, fake_ms: int, dropped: list[str]) -> dict[str, int]:
        """``Gate.beat_now``: release dropped leases, then renew the rest in one call."""
        for lease_id in dropped:
            self.release(gate, lease_id, fake_ms)
        if not self.held[gate]:
            return {}
        now = self.script_now(fake_ms)
        self._record_clock(now)
        self._reap(now)
        if now - self.swept >= self.ttl:  # once per TTL: waiters past their expiry go
            self.waiters = {i: w for i, w in self.waiters.items() if w.x > now}
            self.swept = now
        status = {}
        for lease_id in sorted(self.held[gate]):
            actual = self.reports.pop(lease_id, None)
            if lease_id in self.exp and self.exp[lease_id] > now:
                if actual is not None:
                    self.leases[lease_id].a = actual
                self.exp[lease_id] = now + self.ttl
                status[lease_id] = 1
            else:
                status[lease_id] = 0
                self.held[gate].discard(lease_id)
                self.lost.add(lease_id)
        return status

    def override(self, kind: str, cls: str, n: int, for_ms: int, fake_ms: int) -> None:
        """``set_override.lua``: drop expired overrides, then set or clear one."""
        now = self.script_now(fake_ms)
        self._record_clock(now)
        self.pauses = {c: u for c, u in self.pauses.items() if u == 0 or u > now}
        self.caps = {c: v for c, v in self.caps.items() if v[1] == 0 or v[1] > now}
        until = now + for_ms if for_ms > 0 else 0
        if kind == "pause":
            self.pauses[cls] = until
        elif kind == "cap":
            self.caps[cls] = (n, until)
        elif kind == "resume":
            self.pauses.pop(cls, None)
        else:
            self.caps.pop(cls, None)


# -- gates on a real Redis, driven in step with the model ------------------------


def _duration_ms(duration: str | None) -> int:
    if duration is None:
        return 0
    number = float(duration.removesuffix("ms").removesuffix("s"))
    return round(number if duration.endswith("ms") else number * 1000)


class Harness:
    """One pool: gates sharing two simulated GPUs, the model, and the checks."""

    def __init__(
        self, url: str, *, n_gates: int, placement: str = "best-fit", aging: str = "0/s"
    ) -> None:
        self.pool = f"sm-{uuid.uuid4().hex[:12]}"
        self.keys = PoolKeys(self.pool)
        self.policy = machine_policy(placement, aging)
        self.clock = FakeClock()
        self.sim = SimulatedSampler([DEVICE_TOTAL] * N_DEVICES, name=self.pool)
        self.used = [0] * N_DEVICES
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.gates: list[Gate] = []
        for _ in range(n_gates):
            gate = Gate(
                url,
                pool=self.pool,
                policy=self.policy,
                sampler=AgelessSampler(self.sim),
                register=False,  # the worker registry is not part of the model
                _clock_ms=self.clock,
            )
            gate._heartbeat = ManualHeartbeat()  # type: ignore[assignment]
            self.gates.append(gate)
        self.model = Model(self.policy, self.sim.uuids, n_gates)
        # Lease objects by id: the only strong references the test keeps.
        self.objs: dict[str, Lease] = {}
        self.owner_of: dict[str, int] = {}
        self.deferred: list[tuple[int, str, int]] = []
        self.tolerated: set[str] = set()

    def close(self) -> None:
        for gate in self.gates:
            gate.close()
        self.objs.clear()
        keys = list(self.redis.scan_iter(match=self.keys.prefix + "*"))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()

    def gate(self, g: int) -> int:
        return g % len(self.gates)

    def pick(self, n: int) -> str | None:
        ids = sorted(self.objs, key=int)
        return ids[n % len(ids)] if ids else None

    # -- operations --------------------------------------------------------------

    def try_admit(self, g: int, cls: str, vram: int, fresh: bool) -> None:
        g = self.gate(g)
        gate = self.gates[g]
        key = (cls, vram, "")
        waiter = poll_waiter(gate.owner, cls, vram)
        # The pre-check trusts a DEFER younger than a third of the waiter TTL
        # on the host's clock: make that age explicit instead of real.
        if fresh and waiter in gate._recent_defer:
            gate._recent_defer[waiter] = time.monotonic()
        else:
            gate._recent_defer.pop(waiter, None)
            self.model.recent[g].discard(key)
        local = fresh and self.model.local_defer(g, cls, vram, self.used)
        d = gate.try_admit(cls, vram)
        if local:
            assert (d.outcome, d.reason, d.local, d.available) == (
                Outcome.DEFER,
                "vram",
                True,
                None,
            ), d
            pool = self.policy.pool
            estimate_s = min(
                pool.retry_max_s, max(0.1, min(pool.lease_ttl_s / 3, pool.waiter_ttl_s / 2))
            )
            self._check_retry(Prediction("defer", "vram", None), d.retry_after, estimate_s)
            return
        assert not d.local
        actual = (d.outcome.value, d.reason, d.device, d.lease.id if d.lease else None,
                  d.lease.expires_ms if d.lease else None, d.available)  # fmt: skip
        raw = self.redis.hget(self.keys.waiters, waiter)
        own = None if raw is None else str(raw)
        pred = self._adopt(g, gate.owner, cls, vram, actual, own)
        self._check_retry(pred, d.retry_after)
        if d.lease is not None:
            self.objs[d.lease.id] = d.lease
            self.owner_of[d.lease.id] = g
            self._check_cap_after_admit(cls)
        elif d.outcome is Outcome.DEFER:
            if (g, cls, vram) in self.deferred:
                self.deferred.remove((g, cls, vram))
            self.deferred.append((g, cls, vram))

    def poll_again(self, n: int, fresh: bool) -> None:
        """Ask again for a request that was deferred, the latest one for ``n`` = 0."""
        if self.deferred:
            self.try_admit(*self.deferred[-1 - n % len(self.deferred)], fresh)

    def _adopt(
        self, g: int, owner: str, cls: str, vram: int, actual: tuple[Any, ...], own: str | None
    ) -> Prediction:
        """Advance the model by the variant that matches what the gate said.

        The design's variant first; the scripts' known deviations only when
        the design's does not match, and only while they are listed.
        """
        args = (g, owner, cls, vram, self.clock.ms, list(self.used))
        waiter_id = poll_waiter(owner, cls, vram)
        expected: Prediction | None = None
        variants = [False, True] if "stale_own_since" in KNOWN_DEVIATIONS else [False]
        for stale_own_since in variants:
            trial = self.model.clone()
            pred = trial.admit(*args, stale_own_since=stale_own_since)
            w = trial.waiters.get(waiter_id)
            got = (
                pred.outcome,
                pred.reason,
                pred.device,
                pred.lease_id,
                pred.expires_ms,
                pred.available,
            )
            if got == actual and (w.encode() if w else None) == own:
                if stale_own_since:
                    self.tolerated.add("stale_own_since")
                    note(f"tolerated stale_own_since: design {expected}, scripts {actual}")
                self.model = trial
                return pred
            expected = expected or pred
        raise AssertionError(
            f"{cls} {vram // GiB} GiB on gate {g}: the model expects {expected},"
            f" the gate said {actual} (waiter entry {own!r})"
        )

    def _check_retry(
        self, pred: Prediction, retry_after: float, estimate_s: float | None = None
    ) -> None:
        """Exact where the cause has a known end; else the estimate with its jitter (x0.5-1.5)."""
        if pred.outcome != "defer":
            assert retry_after == 0
        elif pred.retry_ms is not None:
            assert retry_after == pred.retry_ms / 1000.0, (pred, retry_after)
        else:
            est = self.model.estimate_ms / 1000.0 if estimate_s is None else estimate_s
            cap = self.model.retry_max / 1000.0
            assert 0.5 * est - 1e-9 <= retry_after <= min(cap, 1.5 * est) + 1e-9, (
                pred,
                retry_after,
            )

    def _check_cap_after_admit(self, cls: str) -> None:
        """From Redis alone: an admission never takes a class past its effective cap."""
        state = self.redis.hgetall(self.keys.state)
        now = max(self.clock.ms, int(state.get("clock", 0)))
        cap = self.model.classes[cls].cap
        if f"cap:{cls}" in state:
            n, until = (int(v) for v in state[f"cap:{cls}"].split())
            if (until == 0 or until > now) and (cap < 0 or n < cap):
                cap = n
        assert cap < 0 or int(state.get(f"n:{cls}", 0)) <= cap

    def release(self, n: int, outcome: str) -> None:
        lease_id = self.pick(n)
        if lease_id is None:
            return
        lease = self.objs.pop(lease_id)
        g = self.owner_of[lease_id]
        expected = self.model.release(g, lease_id, self.clock.ms)
        assert lease.release(outcome) is expected
        assert lease.release(outcome) is False  # idempotent, no second script call

    def drop(self, n: int) -> None:
        """Forget a lease object without releasing it: the heartbeat releases it."""
        lease_id = self.pick(n)
        if lease_id is None:
            return
        g = self.owner_of[lease_id]
        dropped = [lease_id] if lease_id in self.model.held[g] else []
        ref = weakref.ref(self.objs.pop(lease_id))
        if ref() is not None:  # only a reference cycle would keep it; a full collection is slow
            gc.collect()
        assert ref() is None
        self._beat(g, dropped)

    def report(self, n: int, factor: float) -> None:
        lease_id = self.pick(n)
        if lease_id is None:
            return
        g = self.owner_of[lease_id]
        actual = (
            int(self.model.leases[lease_id].e * factor) if lease_id in self.model.leases else GiB
        )
        self.objs[lease_id].report_vram(actual)
        if lease_id in self.model.held[g]:
            self.model.reports[lease_id] = actual
        self._beat(g, [])

    def beat(self, g: int) -> None:
        self._beat(self.gate(g), [])

    def _beat(self, g: int, dropped: list[str]) -> None:
        status = self.model.beat(g, self.clock.ms, dropped)
        self.gates[g].beat_now()
        for lease_id, s in status.items():
            lease = self.objs.get(lease_id)
            if lease is not None:
                assert lease.lost is (s == 0), (lease, s)

    def advance(self, ms: int) -> None:
        self.clock.ms += ms

    def advance_to_edge(self, n: int, delta_ms: int) -> None:
        """Move the clock to 1 ms before, at, or after a moment something
        changes: a lease or waiter expiry, an override's end, a token's return."""
        m = self.model
        now = m.script_now(self.clock.ms)
        edges = {*m.exp.values(), *(w.x for w in m.waiters.values())}
        edges |= {u for u in m.pauses.values() if u} | {u for _, u in m.caps.values() if u}
        for cls, (tokens, updated) in m.buckets.items():
            if tokens < 1:
                edges.add(updated + math.ceil((1 - tokens) / m.classes[cls].rate))
        future = sorted(e + delta_ms for e in edges if e + delta_ms > now)
        if future:
            self.clock.ms = future[n % len(future)]

    def step_back(self, ms: int) -> None:
        self.clock.ms -= ms

    def set_used(self, device: int, used: int) -> None:
        self.sim.set_used(device, used)
        self.used[device] = used

    def override(self, kind: str, cls: str, n: int = 0, duration: str | None = None) -> None:
        gate = self.gates[0]
        self.model.override(kind, cls, n, _duration_ms(duration), self.clock.ms)
        if kind == "pause":
            gate.pause(cls, duration=duration, reason="stateful test")
        elif kind == "cap":
            gate.cap(cls, n, duration=duration, reason="stateful test")
        elif kind == "resume":
            gate.resume(cls)
        else:
            gate.uncap(cls)

    def run(self, step: tuple[Any, ...]) -> None:
        """Apply one step of :func:`strategies.admission_steps`."""
        op, *args = step
        if op == "admit":
            self.try_admit(*args)
        elif op == "release":
            self.release(*args)
        elif op == "drop":
            self.drop(*args)
        elif op == "report":
            self.report(*args)
        elif op == "beat":
            self.beat(*args)
        elif op == "advance":
            self.advance(*args)
        elif op == "edge":
            self.advance_to_edge(*args)
        elif op == "back":
            self.step_back(*args)
        elif op == "used":
            self.set_used(*args)
        elif op in ("cap", "pause"):
            cls, *rest = args
            if op == "cap":
                self.override("cap", cls, rest[0], rest[1])
            else:
                self.override("pause", cls, 0, rest[0])
        else:
            self.override(op, *args)

    # -- the checks after every step ---------------------------------------------

    def check(self) -> None:
        m = self.model
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.state)
        pipe.zrange(self.keys.exp, 0, -1, withscores=True)
        pipe.hgetall(self.keys.waiters)
        pipe.hgetall(self.keys.buckets)
        for dev_uuid in m.uuids:
            pipe.hgetall(self.keys.device(dev_uuid))
        state, exp, waiters, buckets, *devs = pipe.execute()

        # Safety, from Redis alone: caps, and the memory every lease that a
        # decision now could still count was admitted against.
        now = max(self.clock.ms, int(state.get("clock", 0)))
        for cls, row in m.classes.items():
            n = int(state.get(f"n:{cls}", 0))
            assert n >= 0, (cls, n)
            assert row.cap < 0 or n <= row.cap, (cls, n)
            for dev_uuid in m.uuids:
                n_dev = int(state.get(f"d:{cls}:{dev_uuid}", 0))
                assert n_dev >= 0, (cls, dev_uuid, n_dev)
                assert row.dev_cap < 0 or n_dev <= row.dev_cap, (cls, dev_uuid, n_dev)
        for dev_uuid, records in zip(m.uuids, devs, strict=True):
            assert int(state.get(f"d::{dev_uuid}", 0)) <= m.shared_cap
            counted = 0
            for raw in records.values():
                e, _, _, r = (int(x) for x in raw.split()[:4])
                if r == 0 or r >= now:
                    counted += e
            assert counted <= DEVICE_TOTAL - m.margin, (dev_uuid, counted / GiB)

        # The model, field for field.
        for cls in m.classes:
            assert int(state.get(f"n:{cls}", 0)) == m.count(cls), cls
            for i, dev_uuid in enumerate(m.uuids):
                assert int(state.get(f"d:{cls}:{dev_uuid}", 0)) == m.count(cls, i), (cls, dev_uuid)
        for i, dev_uuid in enumerate(m.uuids):
            assert int(state.get(f"d::{dev_uuid}", 0)) == m.count(None, i), dev_uuid
        assert int(state.get("clock", 0)) == m.last
        assert int(state.get("seq", 0)) == m.seq
        assert {member: int(score) for member, score in exp} == {
            f"{m.uuids[m.leases[i].dev]}\t{i}": x for i, x in m.exp.items()
        }
        for i, (dev_uuid, records) in enumerate(zip(m.uuids, devs, strict=True)):
            got = {}
            for lease_id, raw in records.items():
                e, a, _, r, c = raw.split()[:5]
                got[lease_id] = (int(e), int(a), int(r), c)
            want = {
                rec.id: (rec.e, rec.a, rec.r, rec.cls) for rec in m.leases.values() if rec.dev == i
            }
            assert got == want, dev_uuid
        assert waiters == {wid: w.encode() for wid, w in m.waiters.items()}
        got_buckets = {}
        for cls, raw in buckets.items():
            tokens, updated = raw.split()
            got_buckets[cls] = (float(tokens), int(updated))
        assert got_buckets == m.buckets

        # What each gate holds.
        for g, gate in enumerate(self.gates):
            assert {lease.id for lease in gate.leases_held()} == m.held[g], g
        for lease_id, lease in self.objs.items():
            assert lease.lost is (lease_id in m.lost), lease
            if lease_id in m.exp and lease_id in m.held[self.owner_of[lease_id]]:
                assert lease.expires_ms == m.exp[lease_id], lease


# -- the state machine -------------------------------------------------------------

gate_indexes = st.integers(min_value=0, max_value=1)
classes = st.sampled_from(ADMISSION_CLASSES)


class GateMachine(RuleBasedStateMachine):
    """One pool, one or two gates (workers), the model predicting each decision.

    ``url`` is the Redis to use: the test binds it in a subclass.
    """

    url: str

    def __init__(self) -> None:
        super().__init__()
        self.h: Harness | None = None

    @initialize(
        n_gates=st.integers(min_value=1, max_value=2),
        placement=st.sampled_from(["best-fit", "spread"]),
        aging=st.sampled_from(["0/s", "2/s"]),
    )
    def build(self, n_gates: int, placement: str, aging: str) -> None:
        self.h = Harness(self.url, n_gates=n_gates, placement=placement, aging=aging)

    @property
    def harness(self) -> Harness:
        assert self.h is not None
        return self.h

    def holds_leases(self) -> bool:
        return self.h is not None and bool(self.h.objs)

    @rule(g=gate_indexes, cls=classes, vram=request_sizes(), fresh=st.booleans())
    def try_admit(self, g: int, cls: str, vram: int, fresh: bool) -> None:
        self.harness.try_admit(g, cls, vram, fresh)

    @rule(g=gate_indexes, cls=classes, vram=st.sampled_from([1 * GiB, 10 * GiB, 20 * GiB]))
    def try_admit_fitting(self, g: int, cls: str, vram: int) -> None:
        self.harness.try_admit(g, cls, vram, False)

    @rule(g=gate_indexes, vram=st.sampled_from([1 * GiB, 5 * GiB, 20 * GiB]))
    def try_admit_batch(self, g: int, vram: int) -> None:
        self.harness.try_admit(g, "batch", vram, False)

    @rule(
        g=gate_indexes,
        cls=classes,
        vram=st.sampled_from([1 * GiB, 5 * GiB, 10 * GiB, 20 * GiB]),
        k=st.integers(min_value=2, max_value=4),
    )
    def poll_in_a_loop(self, g: int, cls: str, vram: int, k: int) -> None:
        """A worker polling try_admit, trusting its fresh DEFERs (the local pre-check)."""
        for _ in range(k):
            self.harness.try_admit(g, cls, vram, True)

    @precondition(lambda self: self.h is not None and bool(self.h.deferred))
    @rule(n=st.integers(min_value=0, max_value=15), fresh=st.booleans())
    def poll_again(self, n: int, fresh: bool) -> None:
        self.harness.poll_again(n, fresh)

    @precondition(holds_leases)
    @rule(n=st.integers(min_value=0, max_value=15), outcome=st.sampled_from(["ok", "error", "oom"]))
    def release(self, n: int, outcome: str) -> None:
        self.harness.release(n, outcome)

    @precondition(holds_leases)
    @rule(n=st.integers(min_value=0, max_value=15))
    def drop(self, n: int) -> None:
        self.harness.drop(n)

    @precondition(holds_leases)
    @rule(n=st.integers(min_value=0, max_value=15), factor=st.sampled_from([0.5, 1.0, 2.0]))
    def report_vram(self, n: int, factor: float) -> None:
        self.harness.report(n, factor)

    @rule(g=gate_indexes)
    def beat(self, g: int) -> None:
        self.harness.beat(g)

    @rule(ms=clock_steps_ms())
    def advance(self, ms: int) -> None:
        self.harness.advance(ms)

    @rule(n=st.integers(min_value=0, max_value=7), delta_ms=st.sampled_from([-1, 0, 1]))
    def advance_to_edge(self, n: int, delta_ms: int) -> None:
        self.harness.advance_to_edge(n, delta_ms)

    @precondition(lambda self: self.h is not None and bool(self.h.deferred))
    @rule(n=st.integers(min_value=0, max_value=7), delta_ms=st.sampled_from([-1, 0, 1]))
    def advance_to_edge_and_poll_again(self, n: int, delta_ms: int) -> None:
        self.harness.advance_to_edge(n, delta_ms)
        self.harness.poll_again(n, False)

    @rule(ms=st.sampled_from([1, 700, 3000]))
    def clock_steps_back(self, ms: int) -> None:
        self.harness.step_back(ms)

    @rule(device=st.integers(min_value=0, max_value=N_DEVICES - 1), used=device_usages())
    def set_used(self, device: int, used: int) -> None:
        self.harness.set_used(device, used)

    @rule(used=device_usages())
    def set_used_everywhere(self, used: int) -> None:
        for device in range(N_DEVICES):
            self.harness.set_used(device, used)

    @rule(
        cls=classes,
        n=st.none() | st.integers(min_value=0, max_value=3),
        duration=override_durations(),
    )
    def cap_or_uncap(self, cls: str, n: int | None, duration: str | None) -> None:
        if n is None:
            self.harness.override("uncap", cls)
        else:
            self.harness.override("cap", cls, n, duration)

    @rule(cls=classes, pause=st.booleans(), duration=override_durations())
    def pause_or_resume(self, cls: str, pause: bool, duration: str | None) -> None:
        if pause:
            self.harness.override("pause", cls, 0, duration)
        else:
            self.harness.override("resume", cls)

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        if self.h is not None:
            self.h.check()

    def teardown(self) -> None:
        if self.h is not None:
            self.h.close()


class TestStateMachine:
    """Every decision, and the pool's state after it, is what the model says."""

    def test_gates_agree_with_the_model_step_by_step(self, redis_server: RedisProcess) -> None:
        class OnTheSessionRedis(GateMachine):
            url = redis_server.url

        run_state_machine_as_test(OnTheSessionRedis, settings=STEP_SETTINGS)


class TestModelAgreesOnRandomSequences:
    """Longer random runs of two workers, on the newest Redis and on Redis 6.2."""

    @staticmethod
    def _run(url: str, steps: list[tuple[Any, ...]], placement: str, aging: str) -> None:
        h = Harness(url, n_gates=2, placement=placement, aging=aging)
        try:
            h.check()
            for step in steps:
                note(f"step {step}")
                h.run(step)
                h.check()
        finally:
            h.close()

    @settings(STEP_SETTINGS, max_examples=15)
    @given(
        steps=admission_steps(min_size=30, max_size=80),
        placement=st.sampled_from(["best-fit", "spread"]),
        aging=st.sampled_from(["0/s", "2/s"]),
    )
    def test_on_the_newest_redis(
        self, redis_server: RedisProcess, steps: list[tuple[Any, ...]], placement: str, aging: str
    ) -> None:
        self._run(redis_server.url, steps, placement, aging)

    @settings(STEP_SETTINGS, max_examples=10)
    @given(
        steps=admission_steps(min_size=30, max_size=80),
        placement=st.sampled_from(["best-fit", "spread"]),
        aging=st.sampled_from(["0/s", "2/s"]),
    )
    def test_on_redis_62(
        self,
        redis_server_62: RedisProcess,
        steps: list[tuple[Any, ...]],
        placement: str,
        aging: str,
    ) -> None:
        self._run(redis_server_62.url, steps, placement, aging)


# -- focused cases, asserted as the design states them ------------------------------


@pytest.fixture
def harness(redis_server: RedisProcess) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kw: Any) -> Harness:
        h = Harness(redis_server.url, **{"n_gates": 1, **kw})
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


class TestPriorityHoldBack:
    """A device is held back by the highest waiter for it, whatever the order of the waiters."""

    def test_a_lower_waiter_never_hides_a_higher_one_on_the_same_device(
        self, harness: Callable[..., Harness]
    ) -> None:
        # Given an interactive waiter and batch waiters all waiting for memory
        # on device 0, when a notebook asks for memory there that would fit,
        # then it defers for priority. The waiters hash of a pool this size is
        # iterated in a random order, and the script once kept only the last
        # waiter listed per device: fresh pools give fresh orders.
        for _ in range(8):
            h = harness()
            gate = h.gates[0]
            h.set_used(1, 30 * GiB)  # device 1 has room for nobody here
            held = gate.try_admit("notebook", vram=20 * GiB)
            assert held.device == 0
            assert gate.try_admit("interactive", vram=20 * GiB).reason == "vram"  # 18 GiB left
            for gib in (13, 14, 15):
                assert gate.try_admit("batch", vram=gib * GiB).reason == "vram"  # 12 GiB for batch
            d = gate.try_admit("notebook", vram=5 * GiB)  # 14 GiB for notebook
            assert (d.outcome, d.reason) == (Outcome.DEFER, "priority")


class TestFoundByTheMachine:
    """Deviations from the design the machine found, fixed since; each test asserts the design."""

    def test_a_waiter_entry_past_its_ttl_gives_no_aging_credit(
        self, harness: Callable[..., Harness]
    ) -> None:
        # Given batch waited once, then stayed away far longer than the waiter
        # TTL, when it asks again it is a new waiter: its priority has not aged
        # by the time it was away, so interactive is not held back. The
        # scripts keep the old `since` unless some other request happened to
        # delete the expired entry in between.
        h = harness(aging="2/s")
        gate = h.gates[0]
        h.set_used(1, DEVICE_TOTAL)  # only device 0 counts
        held = [gate.try_admit("interactive", vram=18 * GiB) for _ in range(2)]
        assert [d.device for d in held] == [0, 0]
        assert gate.try_admit("batch", vram=20 * GiB).reason == "vram"  # waits on device 0
        for _ in range(12):  # 60 s, 15 waiter TTLs: batch would have aged 120 points
            h.clock.ms += 5_000
            gate.beat_now()  # the leases live on; nobody else asks meanwhile
        assert gate.try_admit("batch", vram=20 * GiB).reason == "vram"
        d = gate.try_admit("interactive", vram=1 * GiB)  # 2 GiB left on device 0
        assert (d.outcome, d.reason) == (Outcome.ADMIT, "ok")

    def test_an_override_lasts_exactly_its_duration(self, harness: Callable[..., Harness]) -> None:
        # Given a pause of "1005ms", a request right after it is told to come
        # back in exactly 1.005 s. Gate._override truncates duration * 1000
        # (1.005 * 1000 = 1004.99...) to 1004 ms; the policy rounds.
        h = harness()
        gate = h.gates[0]
        gate.pause("batch", duration="1005ms")
        d = gate.try_admit("batch", vram=GiB)
        assert (d.reason, d.retry_after) == ("paused", 1.005)
