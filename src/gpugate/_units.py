"""Sizes, durations and rates: the only place gpugate parses units.

Everything a person writes as a quantity -- a policy file, a ``vram=`` argument,
a CLI flag -- comes through here, so ``"4GiB"`` or ``"1h30m"`` mean the same
thing everywhere and every mistake is explained the same way.  Code past this
module sees bytes (``int``), seconds (``float``) and events per second
(``float``); the conversion to the integer milliseconds the Lua scripts take
happens once, in :meth:`gpugate.policy.Policy.to_wire`.

Sizes: a number of bytes, or a number and a unit: ``B``, ``KB``, ``MB``,
``GB``, ``TB``, ``PB`` (powers of 1000) or ``KiB``, ``MiB``, ``GiB``,
``TiB``, ``PiB`` (powers of 1024), in any letter case, up to 1PiB.  A bare
``K``, ``M``, ``G``, ``T`` or ``P`` is refused: it is 7% apart between the two
readings at ``G``.

Durations: a number of seconds, or parts like ``"500ms"``, ``"30s"``, ``"5m"``
(or ``"5min"``), ``"2h"``, ``"1d"``, largest first: ``"1h30m"``.

Rates: a count per duration, ``"20/s"``, ``"100/min"``, ``"1/500ms"``,
``"3/2s"``; a plain number is per second.
"""

from __future__ import annotations

import functools
import json
import math
import re
from fractions import Fraction

from ._exceptions import ConfigError

_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_NUMBER_RE = re.compile(_NUMBER)
_SIZE_RE = re.compile(rf"(?P<number>{_NUMBER})\s*(?P<unit>[A-Za-z]*)")
# "ms" and "min" come before "m" so that the longest unit wins.
_DURATION_PART_RE = re.compile(rf"(?P<number>{_NUMBER})\s*(?P<unit>ms|min|s|m|h|d)\s*")

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}
_AMBIGUOUS_SIZE_UNITS = frozenset("kmgtp")
_BINARY_UNITS: tuple[tuple[str, int], ...] = (
    ("TiB", 1024**4),
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
)

_DURATION_UNITS: dict[str, Fraction] = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "min": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}
_DURATION_PARTS_MS: tuple[tuple[str, int], ...] = (
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
)
_RATE_UNITS: tuple[tuple[str, int], ...] = (("s", 1), ("min", 60), ("h", 3600))
# Past this many of a unit, an exact size stops being easier to read.
_EXACT_BELOW = 100_000

_SIZE_HINT = 'write it like "4GiB", "512MB" or a number of bytes'

# Upper bounds: far past any GPU or any sensible setting, and within what the
# Lua scripts hold exactly (their numbers are doubles, exact below 2**53, and
# their records are written with %d, which stops at 2**63).
MAX_SIZE = 2**50  # 1PiB
MAX_DURATION_S = 3650 * 86400.0  # 3650d, ten years
MAX_RATE = 1e6  # a million per second
_DURATION_HINT = 'write it like "30s", "500ms", "5m", "1h30m" or a number of seconds'
_RATE_HINT = 'write it like "20/s", "100/min", "1/500ms" or a number per second'


def quote(value: object) -> str:
    """Show *value* in an error message the way its author would have typed it.

    Strings get double quotes (as in TOML), everything else its ``repr``.
    """
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


class _Invalid(Exception):
    """Why a quantity does not parse; the public functions add key and source."""


def parse_size(
    value: str | int | float, *, key: str | None = None, source: str | None = None
) -> int:
    """Return the number of bytes *value* stands for.

    *value* is a whole number of bytes (``4294967296``), a string of digits
    (``"1024"``) or a number and a unit (``"4GiB"``, ``"1.5 GB"``, ``"512MiB"``),
    at most 1PiB (:data:`MAX_SIZE`); a fraction of a byte counts as a whole
    one (every size gpugate reads is memory to keep or to need).  *key* and
    *source* name where the value came from in the :class:`~gpugate.ConfigError`
    raised when it is not a size.
    """
    # The hot path: callers that already hold bytes pay one type check.
    if type(value) is int and 0 <= value <= MAX_SIZE:
        return value
    try:
        size = _size_from_text(value) if isinstance(value, str) else _size_from_number(value)
        if size > MAX_SIZE:
            raise _Invalid(
                f"{quote(value)} is more than 1PiB, larger than any device; {_SIZE_HINT}"
            )
        return size
    except _Invalid as err:
        raise ConfigError(str(err), source=source, key=key, value=value) from None


def parse_duration(
    value: str | int | float,
    *,
    key: str | None = None,
    source: str | None = None,
    positive: bool = False,
) -> float:
    """Return the number of seconds *value* stands for.

    *value* is a number of seconds (``30``, ``0.5``), or a string of parts each
    made of a number and a unit -- ``ms``, ``s``, ``m`` or ``min``, ``h``, ``d``
    -- largest first: ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``.  A string
    of digits alone is seconds, at most ten years.  With *positive*, zero is
    refused too (a lifetime or an interval).  *key* and *source* name where the
    value came from in the :class:`~gpugate.ConfigError` raised when it is not a
    duration.
    """
    try:
        if isinstance(value, str):
            seconds = _duration_from_text(value)
        else:
            seconds = float(_non_negative(value, "duration", _DURATION_HINT))
        if positive and seconds == 0:
            raise _Invalid(f"{quote(value)} is zero; it must be longer than that")
        if seconds > MAX_DURATION_S:
            raise _Invalid(f'{quote(value)} is longer than ten years ("3650d"); {_DURATION_HINT}')
        return seconds
    except _Invalid as err:
        raise ConfigError(str(err), source=source, key=key, value=value) from None


def to_ms(seconds: float) -> int:
    """Seconds as the scripts' whole milliseconds, rounded to the nearest: every
    conversion of a policy's durations goes through here, so what status shows
    is what the scripts enforce."""
    return round(seconds * 1000)


def lifetime_ms(duration: str | int | float | None, *, key: str = "duration") -> int:
    """How long a setting that reverts by itself lasts, in whole milliseconds.

    ``None`` is 0, the scripts' "no expiry" (until lifted). Any other value
    is a duration longer than zero (zero would read as "no expiry", the
    opposite of what it says), rounded up so that it never becomes 0.
    """
    if duration is None:
        return 0
    seconds = parse_duration(duration, key=key)
    if seconds == 0:
        raise ConfigError(
            f"{quote(duration)} is zero: a setting that reverts by itself lasts longer than "
            "that; leave the duration out for one that lasts until lifted",
            key=key,
            value=duration,
        )
    return max(1, math.ceil(seconds * 1000))


def parse_rate(
    value: str | int | float, *, key: str | None = None, source: str | None = None
) -> float:
    """Return the number of events per second *value* stands for.

    *value* is ``"COUNT/DURATION"`` -- ``"20/s"``, ``"100/min"``, ``"5/h"``,
    ``"1/500ms"``, ``"3/2s"`` -- where the duration follows
    :func:`parse_duration` and a bare unit means one of it; or a plain number
    (or string of digits) of events per second, at most a million.  Zero
    (``"0/s"``) is a valid rate, "never"; negative rates are not.  *key* and
    *source* name where the value came from in the :class:`~gpugate.ConfigError`
    raised otherwise.
    """
    try:
        if isinstance(value, str):
            rate = _rate_from_text(value)
        else:
            rate = float(_non_negative(value, "rate", _RATE_HINT))
        if rate > MAX_RATE:
            raise _Invalid(f"{quote(value)} is more than a million per second; {_RATE_HINT}")
        return rate
    except _Invalid as err:
        raise ConfigError(str(err), source=source, key=key, value=value) from None


def format_size(n: int) -> str:
    """Return *n* bytes as a short human string in binary units.

    Sizes that a unit says exactly stay exact: ``"0B"``, ``"512MiB"``,
    ``"1.5GiB"``, ``"1025KiB"`` (below 100000 of a unit).  Any other gets one
    decimal in the largest unit it reaches (``"4.3GiB"``), which
    :func:`parse_size` reads back to within 5%.
    """
    if n < 0:
        return "-" + format_size(-n)
    if n < 1024:
        return f"{n}B"
    index, (name, unit) = next((i, named) for i, named in enumerate(_BINARY_UNITS) if n >= named[1])
    if n % unit == 0:
        return f"{n // unit}{name}"
    if n * 10 % unit == 0:
        return f"{n / unit:.1f}{name}"
    for smaller_name, smaller in (*_BINARY_UNITS[index + 1 :], ("B", 1)):
        if n % smaller == 0 and n // smaller < _EXACT_BELOW:
            return f"{n // smaller}{smaller_name}"
    text = f"{n / unit:.1f}"
    if text == "1024.0" and index > 0:
        # 1023.96KiB rounds to "1024.0KiB"; the next unit up reads better.
        name, text = _BINARY_UNITS[index - 1][0], "1.0"
    return f"{text}{name}"


def format_duration(seconds: float) -> str:
    """Return *seconds* as a short human string: ``"250ms"``, ``"30s"``, ``"1h30m"``.

    Durations of a millisecond or more are shown to the millisecond, in parts
    from days down to seconds; shorter ones to three significant digits.
    :func:`parse_duration` reads every result back.
    """
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    ms = round(seconds * 1000)
    if ms == 0:
        return f"{_three_digits(seconds * 1000)}ms"
    if ms < 1000:
        return f"{ms}ms"
    parts = []
    for name, size in _DURATION_PARTS_MS:
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{name}")
    if ms:
        parts.append(f"{ms / 1000:g}s")
    return "".join(parts)


def format_rate(per_second: float) -> str:
    """Return a rate in events per second as a short human string: ``"20/s"``, ``"6/min"``.

    A whole count per second, minute or hour is preferred, in that order,
    unless a decimal per second is shorter (``"2.5/s"``, not ``"150/min"``);
    :func:`parse_rate` reads those back to float precision.  Rates with
    neither get about three significant digits.
    """
    if not math.isfinite(per_second) or per_second < 0:
        return f"{per_second}/s"
    if per_second == 0:
        return "0/s"
    whole = None
    for name, seconds in _RATE_UNITS:
        count = per_second * seconds
        # Float error turns 0.1/s into 6.000000000000001/min; that is still 6.
        if round(count) >= 1 and abs(count - round(count)) <= 4 * math.ulp(count):
            whole = f"{round(count)}/{name}"
            break
    shown = f"{per_second:g}"
    decimal = f"{shown}/s" if "e" not in shown and float(shown) == per_second else None
    if whole is not None and (decimal is None or len(whole) <= len(decimal)):
        return whole
    if decimal is not None:
        return decimal
    # The smallest unit in which at least one event happens; hours at the least.
    name, seconds = next(((n, s) for n, s in _RATE_UNITS if per_second * s >= 1), _RATE_UNITS[-1])
    return f"{_three_digits(per_second * seconds)}/{name}"


def _three_digits(x: float) -> str:
    """*x* > 0 to about three significant digits, never in exponent form."""
    if x >= 100:
        return str(round(x))
    decimals = 2 - math.floor(math.log10(x))
    return f"{x:.{decimals}f}".rstrip("0").rstrip(".")


@functools.lru_cache(maxsize=512)
def _size_from_text(text: str) -> int:
    # Cached: the admission hot path parses the same "4GiB" on every call.
    stripped = text.strip()
    match = _SIZE_RE.fullmatch(stripped)
    if match is None:
        if _SIZE_RE.fullmatch(_is_negated(text)):
            raise _Invalid(f"{quote(text)} is negative; {_SIZE_HINT}")
        raise _Invalid(f"{quote(text)} is not a size; {_SIZE_HINT}")
    number, unit = match["number"], match["unit"]
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        if unit.lower() in _AMBIGUOUS_SIZE_UNITS:
            letter = unit.upper()
            raise _Invalid(
                f'{quote(text)} is ambiguous; write "{number}{letter}iB" '
                f'(powers of 1024) or "{number}{letter}B" (powers of 1000)'
            )
        raise _Invalid(f"{quote(text)} is not a size; {_SIZE_HINT}")
    return math.ceil(Fraction(number) * multiplier)


def _size_from_number(value: object) -> int:
    number = _non_negative(value, "size", _SIZE_HINT)
    return math.ceil(number)


def _non_negative(value: object, what: str, hint: str) -> int | float:
    # bool is an int to Python but never a quantity to a person.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"{quote(value)} is not a {what}; {hint}")
    if math.isnan(value) or math.isinf(value):
        raise _Invalid(f"{quote(value)} is not a {what}; {hint}")
    if value < 0:
        raise _Invalid(f"{quote(value)} is negative; {hint}")
    return value


@functools.lru_cache(maxsize=512)
def _duration_from_text(text: str) -> float:
    seconds = _duration_fraction(text)
    if seconds is None:
        negative = _is_negated(text) and _duration_fraction(_is_negated(text)) is not None
        wrong = "is negative" if negative else "is not a duration"
        raise _Invalid(f"{quote(text)} {wrong}; {_DURATION_HINT}")
    return float(seconds)


def _duration_fraction(text: str) -> Fraction | None:
    """Exact seconds in *text*, or ``None`` when it is not a duration."""
    stripped = text.strip().lower()
    if _NUMBER_RE.fullmatch(stripped):
        return Fraction(stripped)
    total = Fraction(0)
    position = 0
    previous_unit = None
    while position < len(stripped):
        match = _DURATION_PART_RE.match(stripped, position)
        if match is None:
            return None
        unit = _DURATION_UNITS[match["unit"]]
        # Largest first, each unit once: "30m1h" or "5m5m" is more likely a
        # typo than a sum.
        if previous_unit is not None and unit >= previous_unit:
            return None
        previous_unit = unit
        total += Fraction(match["number"]) * unit
        position = match.end()
    return total if previous_unit is not None else None


@functools.lru_cache(maxsize=512)
def _rate_from_text(text: str) -> float:
    stripped = text.strip().lower()
    if _NUMBER_RE.fullmatch(stripped):
        return float(Fraction(stripped))
    count_text, slash, per_text = stripped.partition("/")
    count_text, per_text = count_text.strip(), per_text.strip()
    if not slash or not _NUMBER_RE.fullmatch(count_text):
        wrong = "is negative" if _NUMBER_RE.fullmatch(count_text.lstrip("-")) else "is not a rate"
        raise _Invalid(f"{quote(text)} {wrong}; {_RATE_HINT}")
    per = _DURATION_UNITS.get(per_text)
    if per is None:
        per = _duration_fraction(per_text)
    if per is None:
        raise _Invalid(f"{quote(text)} is not a rate; {_RATE_HINT}")
    if per == 0:
        raise _Invalid(f"{quote(text)} counts per zero time; {_RATE_HINT}")
    return float(Fraction(count_text) / per)


def _is_negated(text: str) -> str:
    """What follows a leading minus sign in *text*, or ``""`` when there is none."""
    stripped = text.strip()
    return stripped[1:].lstrip() if stripped.startswith("-") else ""
