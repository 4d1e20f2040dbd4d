"""The policy model: pool settings, class policies, and the policy holding both.

All three are frozen: a policy is published to Redis under a version computed
from its contents, so an object that could change after publishing would lie
about what the pool enforces.  Each checks its own values when built, so a
policy made in Python is held to the same rules as one read from a file.

Python attributes are in base units (bytes, seconds, events per second); the
TOML keys drop the ``_s`` suffix and take human strings (``"30s"``,
``"4GiB"``, ``"10/s"``); :meth:`Policy.to_wire` is the one place they become
the integer milliseconds and bytes the Lua scripts read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, NamedTuple, Self

from .._exceptions import ConfigError, UsageError
from .._units import (
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
    quote,
    to_ms,
)
from ..asynq._keys import check_queue_name
from ._load import Kind, as_table, parse_toml, read_file, read_knobs, unknown_key, with_source

Placement = Literal["best-fit", "spread"]
NoGpu = Literal["defer", "reject", "cpu"]
OnBackendError = Literal["closed", "open"]

_PLACEMENTS: tuple[Placement, ...] = ("best-fit", "spread")
_NO_GPU: tuple[NoGpu, ...] = ("defer", "reject", "cpu")
_ON_BACKEND_ERROR: tuple[OnBackendError, ...] = ("closed", "open")

_MAX_PRIORITY = 1_000_000
# Caps and bursts: far past any pool, and exact in the scripts' numbers.
_MAX_COUNT = 1_000_000
# A lease is renewed every lease_ttl / 3: shorter leases would be lost to a
# slow round trip or a garbage collection pause.
_SHORTEST_LEASE_TTL_S = 1.0
# A deferred poller is told to come back after at least 100 ms, +50 % jitter:
# it must be back within 3/4 of the waiter TTL to keep counting as a waiter.
_SHORTEST_WAITER_TTL_S = 0.2
# The floor of an estimated retry_after (admit_job.lua): a cap below it
# would break the floor the docs and the waiter TTL's minimum rest on.
_SHORTEST_RETRY_S = 0.1
# (attribute, its least value, why and the fix): one check serves each.
_LEAST_DURATIONS = (
    (
        "lease_ttl_s",
        _SHORTEST_LEASE_TTL_S,
        'a lease is renewed every third of it; use at least "1s", like "30s"',
    ),
    (
        "waiter_ttl_s",
        _SHORTEST_WAITER_TTL_S,
        'a deferred request is told to retry after 100ms or more; use at least "200ms", like "5s"',
    ),
    (
        "retry_max_s",
        _SHORTEST_RETRY_S,
        'an estimated retry_after is 100ms or more; use at least "100ms", like "30s"',
    ),
)
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# The Lua scripts count in whole milliseconds; anything shorter would reach
# them as 0, which means "already expired".
_SHORTEST_S = 0.001


class _Knob(NamedTuple):
    attr: str
    kind: Kind


# TOML key -> attribute; the order here is the order of to_dict() and of checks.
_POOL_KNOBS: dict[str, _Knob] = {
    "safety_margin": _Knob("safety_margin", "size"),
    "lease_ttl": _Knob("lease_ttl_s", "duration"),
    "placement": _Knob("placement", "plain"),
    "sample_max_age": _Knob("sample_max_age_s", "duration"),
    "waiter_ttl": _Knob("waiter_ttl_s", "duration"),
    "priority_aging": _Knob("priority_aging", "rate"),
    "retry_max": _Knob("retry_max_s", "duration"),
    "max_per_device": _Knob("max_per_device", "plain"),
}
_CLASS_KNOBS: dict[str, _Knob] = {
    "priority": _Knob("priority", "plain"),
    "max_concurrent": _Knob("max_concurrent", "plain"),
    "max_per_device": _Knob("max_per_device", "plain"),
    "rate": _Knob("rate", "rate"),
    "burst": _Knob("burst", "plain"),
    "reserve": _Knob("reserve", "size"),
    "max_duration": _Knob("max_duration_s", "duration"),
    "max_duration_contended": _Knob("max_duration_contended_s", "duration"),
    "max_fragmentation": _Knob("max_fragmentation", "plain"),
    "no_gpu": _Knob("no_gpu", "plain"),
    "on_backend_error": _Knob("on_backend_error", "plain"),
    "queues": _Knob("queues", "plain"),
}
_TOP_KEYS = ("pool", "classes")

_NO_CLASSES = "no classes are defined; add at least one, like [classes.batch] with priority = 10"


@dataclasses.dataclass(frozen=True, slots=True)
class PoolSettings:
    """How the whole pool behaves, whatever the class: the ``[pool]`` table.

    ``safety_margin``
        Bytes kept free on every device (TOML ``safety_margin``, a size).
    ``lease_ttl_s``
        Seconds a lease lives without renewal; a dead worker's slot is free
        again within this time (``lease_ttl``, a duration, at least 1s).
    ``placement``
        ``"best-fit"`` puts a job on the device with the least room that fits
        it, keeping whole devices free for big jobs; ``"spread"`` on the one
        with the most room.
    ``sample_max_age_s``
        A GPU memory sample older than this is not trusted (``sample_max_age``).
    ``waiter_ttl_s``
        A deferred request counts as waiting this long after its last try
        (``waiter_ttl``, at least 200ms).
    ``priority_aging``
        Priority points a waiting request gains per second of waiting
        (``priority_aging``, a rate such as ``"6/min"``; 0 turns aging off).
    ``retry_max_s``
        The cap on an estimated ``retry_after`` (``retry_max``, at least 100ms).
    ``max_per_device``
        Leases of all classes together on one device, at least 1; ``None``
        for no cap.
    """

    safety_margin: int = 0
    lease_ttl_s: float = 30.0
    placement: Placement = "best-fit"
    sample_max_age_s: float = 2.0
    waiter_ttl_s: float = 5.0
    priority_aging: float = 0.0
    retry_max_s: float = 30.0
    max_per_device: int | None = None

    def __post_init__(self) -> None:
        key = _dotted_keys("pool", _POOL_KNOBS)
        _set(self, "safety_margin", parse_size(self.safety_margin, key=key["safety_margin"]))
        for attr in ("lease_ttl_s", "sample_max_age_s", "waiter_ttl_s", "retry_max_s"):
            _set(self, attr, _positive_seconds(getattr(self, attr), key=key[attr]))
        for attr, shortest, why in _LEAST_DURATIONS:
            seconds = getattr(self, attr)
            if seconds < shortest:
                raise ConfigError(
                    f"{quote(format_duration(seconds))} is too short: {why}",
                    key=key[attr],
                    value=seconds,
                )
        _check_choice(self.placement, _PLACEMENTS, key=key["placement"])
        _set(self, "priority_aging", parse_rate(self.priority_aging, key=key["priority_aging"]))
        # 0 would admit nothing on any device: stopping work is what a pause is for.
        _check_whole(self.max_per_device, key=key["max_per_device"], low=1, optional=True)


@dataclasses.dataclass(frozen=True, slots=True)
class ClassPolicy:
    """How one class of jobs is admitted: a ``[classes.NAME]`` table.

    ``name``
        Lowercase letters, digits, ``_`` and ``-``, starting with a letter,
        at most 32 characters.
    ``priority``
        Higher wins when requests compete; a whole number from 0 to 1000000.
        Ties are allowed.
    ``max_concurrent``, ``max_per_device``
        Leases of this class at once, in the whole pool and on one device;
        ``None`` for no cap.
    ``rate``, ``burst``
        A token bucket: admissions per second (TOML ``rate``, like ``"10/s"``)
        and how many may come at once after a quiet spell (default
        ``max(1, ceil(rate))``).  No rate, no bucket; ``burst`` needs ``rate``.
    ``reserve``
        Bytes kept free on every device for this class and the classes above
        it: a request of a lower class cannot use them (see
        :meth:`Policy.reserve_above`).
    ``max_duration_s``
        Lease renewal stops after this long (``max_duration``); ``None`` for
        no bound.
    ``max_duration_contended_s``
        A shorter bound that applies while a request of higher effective
        priority waits for memory on the device (``max_duration_contended``);
        no longer than ``max_duration_s``.
    ``max_fragmentation``
        The fraction of a device's memory, from 0 to 1, that may be held but
        unused by allocators before this class stops being placed there.
    ``no_gpu``
        With no GPU visible: ``"defer"``, ``"reject"``, or ``"cpu"`` (admit to
        run on the CPU).
    ``on_backend_error``
        With Redis unreachable: ``"closed"`` defers, ``"open"`` admits within
        this process's own caps and room (its local leases, the safety margin,
        the reserves above; docs/admission.md).
    ``queues``
        The Asynq queues whose tasks this class's workers run (TOML a list,
        like ``["ocr:bulk"]``; any text but blank, as Asynq names queues).
        ``gpugate pause``/``drain`` of the class pause them too, and status
        and metrics report them. A queue belongs to at most one class.
    """

    name: str
    priority: int
    max_concurrent: int | None = None
    max_per_device: int | None = None
    rate: float | None = None
    burst: int | None = None
    reserve: int = 0
    max_duration_s: float | None = None
    max_duration_contended_s: float | None = None
    max_fragmentation: float | None = None
    no_gpu: NoGpu = "defer"
    on_backend_error: OnBackendError = "closed"
    queues: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name)
        key = _dotted_keys(f"classes.{self.name}", _CLASS_KNOBS)
        _check_whole(self.priority, key=key["priority"], high=_MAX_PRIORITY)
        _check_whole(self.max_concurrent, key=key["max_concurrent"], optional=True)
        _check_whole(self.max_per_device, key=key["max_per_device"], optional=True)
        self._check_bucket(key)
        _set(self, "reserve", parse_size(self.reserve, key=key["reserve"]))
        for attr in ("max_duration_s", "max_duration_contended_s"):
            value = getattr(self, attr)
            if value is not None:
                _set(self, attr, _positive_seconds(value, key=key[attr]))
        self._check_contended(key["max_duration_contended_s"])
        if self.max_fragmentation is not None:
            _set(
                self,
                "max_fragmentation",
                _fraction(self.max_fragmentation, key=key["max_fragmentation"]),
            )
        _check_choice(self.no_gpu, _NO_GPU, key=key["no_gpu"])
        _check_choice(self.on_backend_error, _ON_BACKEND_ERROR, key=key["on_backend_error"])
        _set(self, "queues", _queue_names(self.queues, key=key["queues"]))

    def lowered_by(self, n: int) -> bool:
        """Whether a runtime cap of ``n`` lowers this class's pool-wide cap
        (a runtime cap never raises the policy's)."""
        return self.max_concurrent is None or n < self.max_concurrent

    def _check_bucket(self, key: Mapping[str, str]) -> None:
        if self.rate is None:
            if self.burst is not None:
                raise ConfigError(
                    f'burst {quote(self.burst)} is set without a rate; add a rate like "10/s", '
                    "or leave burst out",
                    key=key["burst"],
                    value=self.burst,
                )
            return
        rate = parse_rate(self.rate, key=key["rate"])
        if rate == 0:
            # The scripts read a zero rate as "no bucket", the opposite of what
            # "0/s" says; stopping a class is what a pause is for.
            raise ConfigError(
                f"{quote(format_rate(rate))} would never admit; leave rate out for no limit, "
                "or pause the class (gpugate pause) to stop it",
                key=key["rate"],
                value=self.rate,
            )
        _set(self, "rate", rate)
        if self.burst is None:
            _set(self, "burst", max(1, math.ceil(rate)))
        else:
            _check_whole(self.burst, key=key["burst"], low=1)

    def _check_contended(self, key: str) -> None:
        bound, contended = self.max_duration_s, self.max_duration_contended_s
        if bound is not None and contended is not None and contended > bound:
            raise ConfigError(
                f"{quote(format_duration(contended))} is longer than max_duration "
                f"{quote(format_duration(bound))}; the bound while others wait must be "
                "the shorter one",
                key=key,
                value=contended,
            )


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """A pool's settings and its classes: everything the admission scripts enforce.

    ``classes`` maps each name to its :class:`ClassPolicy`, read-only, highest
    priority first (ties by name).  Build one with :meth:`from_file`,
    :meth:`from_toml`, :meth:`from_dict` or :meth:`default`, or directly from
    a :class:`PoolSettings` and a mapping of classes.  Policies compare equal
    when their settings are equal, however they were written.
    """

    pool: PoolSettings
    classes: Mapping[str, ClassPolicy]
    _version: str = dataclasses.field(init=False, repr=False, compare=False)
    _highest: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.pool, PoolSettings):
            raise ConfigError(
                f"{quote(self.pool)} is not a PoolSettings", key="pool", value=self.pool
            )
        if not isinstance(self.classes, Mapping) or not self.classes:
            raise ConfigError(_NO_CLASSES, key="classes", value=self.classes)
        for name, class_policy in self.classes.items():
            if not isinstance(class_policy, ClassPolicy):
                raise ConfigError(
                    f"{quote(class_policy)} is not a ClassPolicy",
                    key=f"classes.{name}",
                    value=class_policy,
                )
            if class_policy.name != name:
                raise ConfigError(
                    f"the class filed under {quote(name)} is named {quote(class_policy.name)}; "
                    "use the same name for both",
                    key=f"classes.{name}",
                    value=class_policy.name,
                )
        ordered = sorted(self.classes.items(), key=lambda item: (-item[1].priority, item[0]))
        _check_queues_unshared(ordered)
        _set(self, "classes", types.MappingProxyType(dict(ordered)))
        _set(self, "_version", _digest(self.to_wire()))
        top = ordered[0][1].priority
        _set(self, "_highest", tuple(name for name, c in ordered if c.priority == top))

    def __hash__(self) -> int:
        return hash((self.pool, tuple(self.classes.values())))

    def __reduce__(self) -> tuple[type[Policy], tuple[PoolSettings, dict[str, ClassPolicy]]]:
        # A mappingproxy does not pickle; Gates travel to worker processes.
        return (type(self), (self.pool, dict(self.classes)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> Self:
        """Return the policy described by *data*, shaped like the TOML file.

        *data* holds an optional ``pool`` table and a ``classes`` table with
        at least one class, for example::

            {"pool": {"lease_ttl": "5s"},
             "classes": {"interactive": {"priority": 100, "reserve": "8GiB"},
                         "batch": {"priority": 10, "rate": "10/s", "burst": 5}}}

        Sizes, durations and rates may be numbers (bytes, seconds, per second)
        or strings.  Any mistake raises :class:`~gpugate.ConfigError` naming
        *source*, the dotted key, the value and the fix.
        """
        try:
            pool, classes = _read_policy(data)
            return cls(pool, classes)
        except ConfigError as err:
            raise with_source(err, source) from None

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> Self:
        """Return the policy in TOML *text*; see :data:`DEFAULT_POLICY_TOML` for the format."""
        return cls.from_dict(parse_toml(text, source=source), source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Return the policy in the TOML file at *path*.

        Raises :class:`~gpugate.ConfigError` naming the file when it is
        missing, unreadable, not TOML (with the line) or not a valid policy
        (with the key).
        """
        text, source = read_file(path)
        return cls.from_toml(text, source=source)

    @classmethod
    def default(cls) -> Self:
        """Return the policy in :data:`DEFAULT_POLICY_TOML`.

        Classes ``interactive`` (priority 100), ``notebook`` (50, leases of at
        most 8 hours) and ``batch`` (10), pool settings at their defaults.
        """
        return cls.from_toml(DEFAULT_POLICY_TOML, source="DEFAULT_POLICY_TOML")

    @property
    def version(self) -> str:
        """16 hex digits identifying what the scripts enforce.

        The start of the SHA-256 of :meth:`to_wire` as canonical JSON: equal
        policies have equal versions however they were written.
        """
        return self._version

    @property
    def highest_classes(self) -> tuple[str, ...]:
        """The classes that share the highest priority (usually one), in order.

        ``drain`` keeps them all running, and status holds them all to the
        highest class's wait limits.
        """
        return self._highest

    @property
    def highest_class(self) -> str:
        """The first of :attr:`highest_classes` (the only one, unless priorities tie)."""
        return self._highest[0]

    def class_policy(self, name: str) -> ClassPolicy:
        """Return the policy of class *name*.

        Raises :class:`~gpugate.UsageError` naming the known classes when this
        policy defines no such class.
        """
        try:
            return self.classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.classes, n=1)
            hint = f"did you mean {quote(close[0])}? " if close else ""
            known = ", ".join(quote(n) for n in self.classes)
            raise UsageError(
                f"unknown class {quote(name)}; {hint}this policy defines {known}"
            ) from None

    def queue_classes(self) -> dict[str, str]:
        """Every Asynq queue of the policy's classes -> its class, in class order."""
        return {q: name for name, c in self.classes.items() for q in c.queues}

    def strictest_max_fragmentation(self) -> float | None:
        """The lowest ``max_fragmentation`` of the classes (``None`` if none sets one):
        the share of a device's memory one allocator may hold unused before
        its worker is told to recycle."""
        bounds = [
            c.max_fragmentation for c in self.classes.values() if c.max_fragmentation is not None
        ]
        return min(bounds) if bounds else None

    def reserve_above(self, name: str) -> int:
        """Return the bytes a request of class *name* may not use on any device.

        Each class's ``reserve`` is headroom kept free on every device for that
        class and the classes above it.  So a request of class X cannot use
        the sum of the reserves of the classes whose priority is strictly
        higher than X's; classes tied with X do not hold memory back from it.
        Raises :class:`~gpugate.UsageError` for an unknown class.
        """
        priority = self.class_policy(name).priority
        return sum(c.reserve for c in self.classes.values() if c.priority > priority)

    def to_dict(self) -> dict[str, Any]:
        """Return this policy as plain data shaped like the TOML file.

        Sizes, durations and rates are human strings (``"4GiB"``, ``"30s"``,
        ``"10/s"``) where one says the value exactly, numbers otherwise; unset
        knobs are left out.  ``Policy.from_dict(p.to_dict()) == p``.
        """
        return {
            "pool": _knobs_as_dict(self.pool, _POOL_KNOBS),
            "classes": {name: _knobs_as_dict(c, _CLASS_KNOBS) for name, c in self.classes.items()},
        }

    def to_wire(self) -> dict[str, Any]:
        """Return this policy as the Lua scripts read it: JSON-ready, in ms and bytes.

        ``-1`` stands for "no cap" or "no bound"; a class without a rate has
        ``rate_per_ms`` and ``burst`` 0.  Rates (``aging_per_ms``,
        ``rate_per_ms``) and ``max_frag`` (a fraction) are the only floats.
        A class's ``queues`` (a list of names) are there only when it has
        some, so that a policy without queues keeps its version.
        """
        pool = self.pool
        return {
            "pool": {
                "margin": pool.safety_margin,
                "ttl_ms": to_ms(pool.lease_ttl_s),
                "placement": pool.placement,
                "max_age_ms": to_ms(pool.sample_max_age_s),
                "waiter_ttl_ms": to_ms(pool.waiter_ttl_s),
                "aging_per_ms": pool.priority_aging / 1000,
                "retry_max_ms": to_ms(pool.retry_max_s),
                "max_per_device": _or_none(pool.max_per_device),
            },
            "classes": {name: _class_wire(c) for name, c in self.classes.items()},
        }


def _class_wire(c: ClassPolicy) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "prio": c.priority,
        "cap": _or_none(c.max_concurrent),
        "dev_cap": _or_none(c.max_per_device),
        "rate_per_ms": 0.0 if c.rate is None else c.rate / 1000,
        "burst": 0 if c.burst is None else c.burst,
        "reserve": c.reserve,
        "max_ms": -1 if c.max_duration_s is None else to_ms(c.max_duration_s),
        "max_contended_ms": (
            -1 if c.max_duration_contended_s is None else to_ms(c.max_duration_contended_s)
        ),
        "no_gpu": c.no_gpu,
        "max_frag": -1 if c.max_fragmentation is None else c.max_fragmentation,
    }
    if c.queues:
        # The scripts never read it; it is here so that the version changes with it.
        wire["queues"] = list(c.queues)
    return wire


def _read_policy(data: object) -> tuple[PoolSettings, dict[str, ClassPolicy]]:
    top = as_table(
        data, key=None, example="give it a pool table and a classes table, like the TOML file"
    )
    for key, value in top.items():
        if key not in _TOP_KEYS:
            raise unknown_key(key, value, known=_TOP_KEYS, where=None)
    raw_pool = top.get("pool")
    pool_table = as_table(
        {} if raw_pool is None else raw_pool,
        key="pool",
        example='write it like [pool] with lease_ttl = "30s"',
    )
    with _reporting_written_values(pool_table, where="pool"):
        knobs = read_knobs(pool_table, _kinds(_POOL_KNOBS), where="pool")
        pool = PoolSettings(**_attrs(knobs, _POOL_KNOBS))

    raw_classes = top.get("classes")
    if raw_classes is None or (isinstance(raw_classes, Mapping) and not raw_classes):
        raise ConfigError(_NO_CLASSES, key="classes", value=raw_classes)
    classes_table = as_table(
        raw_classes, key="classes", example="write one table per class, like [classes.batch]"
    )
    classes: dict[str, ClassPolicy] = {}
    for name, raw_class in classes_table.items():
        _check_name(name)
        where = f"classes.{name}"
        table = as_table(
            raw_class, key=where, example=f"write it like [{where}] with priority = 10"
        )
        with _reporting_written_values(table, where=where):
            knobs = read_knobs(table, _kinds(_CLASS_KNOBS), where=where)
            if "priority" not in knobs:
                raise ConfigError(
                    "priority is required; higher wins, like priority = 10",
                    key=f"{where}.priority",
                )
            classes[name] = ClassPolicy(name=name, **_attrs(knobs, _CLASS_KNOBS))
    return pool, classes


@contextlib.contextmanager
def _reporting_written_values(table: Mapping[str, object], *, where: str) -> Iterator[None]:
    """Make a ConfigError about a knob of *table* carry the value as written.

    The dataclasses check numbers already converted from "30s" or "4GiB";
    whoever catches the error wants what the file said.
    """
    try:
        yield
    except ConfigError as err:
        knob = (err.key or "").removeprefix(f"{where}.")
        if knob in table:
            err.value = table[knob]
        raise


def _kinds(knobs: Mapping[str, _Knob]) -> dict[str, Kind]:
    return {key: knob.kind for key, knob in knobs.items()}


def _attrs(values: Mapping[str, Any], knobs: Mapping[str, _Knob]) -> dict[str, Any]:
    return {knobs[key].attr: value for key, value in values.items()}


def _dotted_keys(where: str, knobs: Mapping[str, _Knob]) -> dict[str, str]:
    """Attribute -> the dotted TOML key that error messages name."""
    return {knob.attr: f"{where}.{key}" for key, knob in knobs.items()}


_HUMAN: dict[Kind, tuple[Callable[[Any], str], Callable[[Any], object]]] = {
    "size": (format_size, parse_size),
    "duration": (format_duration, parse_duration),
    "rate": (format_rate, parse_rate),
}


def _knobs_as_dict(obj: object, knobs: Mapping[str, _Knob]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, knob in knobs.items():
        value = getattr(obj, knob.attr)
        if value is None or value == ():
            continue
        if isinstance(value, tuple):
            value = list(value)
        elif knob.kind in _HUMAN:
            format_, parse = _HUMAN[knob.kind]
            text = format_(value)
            # The human string only where it reads back as the same number, so
            # that to_dict() round-trips.
            if parse(text) == value:
                value = text
        out[key] = value
    return out


def _set(obj: object, attr: str, value: object) -> None:
    # Frozen dataclasses normalise their own fields in __post_init__ this way.
    object.__setattr__(obj, attr, value)


def _or_none(cap: int | None) -> int:
    return -1 if cap is None else cap


def _digest(wire: Mapping[str, Any]) -> str:
    canonical = json.dumps(wire, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"class name {quote(name)} is not allowed; use lowercase letters, digits, "
            '"_" or "-", starting with a letter, at most 32 characters, like "batch"',
            key=f"classes.{name}",
            value=name,
        )


def _check_whole(
    value: object, *, key: str, low: int = 0, high: int = _MAX_COUNT, optional: bool = False
) -> None:
    if value is None and optional:
        return
    leave_out = "; or leave it out for no cap" if optional else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{quote(value)} is not a whole number; write one like {max(low, 4)}{leave_out}",
            key=key,
            value=value,
        )
    if value < low or value > high:
        raise ConfigError(
            f"{quote(value)} is out of range; use a whole number from {low} to {high}{leave_out}",
            key=key,
            value=value,
        )


def _positive_seconds(value: float, *, key: str) -> float:
    seconds = parse_duration(value, key=key)
    if seconds < _SHORTEST_S:
        raise ConfigError(
            f'{quote(format_duration(seconds))} is too short; use at least "1ms", like "30s"',
            key=key,
            value=value,
        )
    return seconds


def _fraction(value: object, *, key: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 1  # also turns away NaN
    ):
        raise ConfigError(
            f"{quote(value)} is not a fraction from 0 to 1; write one like 0.3",
            key=key,
            value=value,
        )
    return float(value)


def _queue_names(value: object, *, key: str) -> tuple[str, ...]:
    """A class's Asynq queues as a tuple, each a name Asynq accepts, none twice."""
    example = 'write a list of Asynq queue names, like queues = ["ocr:bulk", "ocr:retry"]'
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"{quote(value)} is not a list; {example}", key=key, value=value)
    seen: set[str] = set()
    for i, queue in enumerate(value):
        try:
            check_queue_name(queue)
        except ConfigError:
            raise ConfigError(
                f"{quote(queue)} is not an Asynq queue name; a queue name is text with at least "
                'one character other than white space, like "ocr:bulk"',
                key=f"{key}[{i}]",
                value=queue,
            ) from None
        if queue in seen:
            raise ConfigError(
                f"queue {quote(queue)} is listed twice; list each queue once",
                key=f"{key}[{i}]",
                value=queue,
            )
        seen.add(queue)
    return tuple(value)


def _check_queues_unshared(classes: list[tuple[str, ClassPolicy]]) -> None:
    """A queue feeds one class: its pause and its verdicts must say which."""
    owner: dict[str, str] = {}
    for name, c in classes:
        for i, queue in enumerate(c.queues):
            first = owner.setdefault(queue, name)
            if first != name:
                raise ConfigError(
                    f"queue {quote(queue)} is already a queue of class {quote(first)}; "
                    "a queue belongs to at most one class: remove it from one of them",
                    key=f"classes.{name}.queues[{i}]",
                    value=queue,
                )


def _check_choice(value: object, choices: tuple[str, ...], *, key: str) -> None:
    if value in choices:
        return
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    hint = (
        f"did you mean {quote(close[0])}?" if close else "use " + " or ".join(map(quote, choices))
    )
    raise ConfigError(f"{quote(value)} is not one of the choices; {hint}", key=key, value=value)


DEFAULT_POLICY_TOML = """\
# A gpugate policy: which jobs get a GPU, when, and how much of it.
#
# Sizes are bytes or strings like "4GiB" or "512MB" (GiB = 1024**3 bytes,
# GB = 1000**3). Durations are seconds or strings like "500ms", "30s", "5m",
# "1h30m". Rates are a count per time: "20/s", "100/min", "1/500ms".
# Every knob shown here is optional except each class's priority.

[pool]
# Bytes kept free on every GPU whatever the class: room for what the memory
# samples cannot see coming (CUDA contexts, allocator growth).
safety_margin = "0B"

# How long a lease lives without being renewed. A worker killed mid-job frees
# its slot within this time; its heartbeat renews the lease meanwhile.
lease_ttl = "30s"

# Which GPU a job goes to when several fit: "best-fit" takes the one with the
# least room left (keeping whole GPUs free for big jobs), "spread" the one
# with the most (less contention between jobs).
placement = "best-fit"

# A GPU memory sample older than this is not trusted for a decision.
sample_max_age = "2s"

# A deferred request still counts as waiting (and holds lower classes back)
# this long after its last try, so a client that gave up stops counting soon.
waiter_ttl = "5s"

# Priority points a request gains per unit of waiting, so low classes are not
# starved forever: "6/min" adds one point every 10 seconds. "0/s" is off.
priority_aging = "0/s"

# The longest retry_after a deferred request is told to wait.
retry_max = "30s"

# Jobs of all classes together on one GPU. Leave it out for no cap.
# max_per_device = 4

# One table per class of job. A class name is lowercase letters, digits, "_"
# or "-", starting with a letter, at most 32 characters.

[classes.interactive]
# Higher wins when requests compete for the same memory or slot; a whole
# number from 0 to 1000000. Classes may tie.
priority = 100

# Leases of this class at once in the whole pool, and on one GPU. Leave them
# out for no cap.
# max_concurrent = 8
# max_per_device = 2

# A token bucket: admissions per time, and how many may come at once after a
# quiet spell (default: the rate per second, rounded up). Leave rate out for no
# limit; burst needs a rate.
# rate = "10/s"
# burst = 20

# Memory kept free on every GPU for this class and the classes above it:
# requests of lower classes cannot use it.
reserve = "0B"

# Lease renewal stops after max_duration; while others wait for the GPU the
# shorter max_duration_contended applies. Leave them out for no bound.
# max_duration = "1h"
# max_duration_contended = "15m"

# Stop placing this class on a GPU once this fraction of its memory (0 to 1)
# is held by its jobs' allocators but not in use (what the jobs report with
# their heartbeat; see docs/sampling.md). Such a GPU gets none of this class.
# max_fragmentation = 0.3

# With no GPU visible: "defer" until one is, "reject", or "cpu" (admit to run
# on the CPU).
no_gpu = "defer"

# With Redis unreachable: "closed" defers every request, "open" admits within
# local per-process caps.
on_backend_error = "closed"

# The Asynq queues whose tasks this class's workers run. `gpugate pause` and
# `gpugate drain` of the class pause them the Asynq way too (with the same
# expiry), `gpugate resume` lifts gpugate's own pauses of them, and status and
# metrics show their backlog. A queue belongs to at most one class.
# queues = ["ocr:interactive"]

[classes.notebook]
priority = 50
# Notebooks hold a GPU for hours; their leases end after a working day.
max_duration = "8h"

[classes.batch]
priority = 10
"""
"""A documented example policy, every knob explained; :meth:`Policy.default` reads it."""
