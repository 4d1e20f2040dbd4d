"""Reading policy data: TOML files and text into tables, written units into numbers.

Errors raised while a policy is read carry the dotted key but no source;
:func:`with_source` adds the file name in one place, where the whole policy is
read, so no check deep inside needs to know where the data came from.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from .._exceptions import ConfigError
from .._units import parse_duration, parse_rate, parse_size, quote

Kind = Literal["size", "duration", "rate", "plain"]
"""How a knob is written: a size, a duration, a rate, or a plain TOML value."""

_CONVERTERS: dict[Kind, Callable[..., object]] = {
    "size": parse_size,
    "duration": parse_duration,
    "rate": parse_rate,
}


def read_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Return the text of the policy file at *path* and the name to report it by."""
    name = os.fsdecode(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ConfigError(
            f"no policy file at {quote(name)}; check the path, or start from "
            "gpugate.policy.DEFAULT_POLICY_TOML",
            source=name,
            value=name,
        ) from None
    except OSError as err:
        raise ConfigError(
            f"cannot read policy file {quote(name)}: {err.strerror}", source=name, value=name
        ) from None
    try:
        # A byte order mark (some editors write one) is not part of the TOML.
        return data.decode("utf-8-sig"), name
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"not valid TOML: not UTF-8 text ({err.reason} at byte {err.start})", source=name
        ) from None


def parse_toml(text: str, *, source: str) -> dict[str, Any]:
    """Return the tables of TOML *text*, or raise :class:`ConfigError` naming the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib's message already ends in "(at line L, column C)".
        raise ConfigError(f"not valid TOML: {err}", source=source) from None


def as_table(value: object, *, key: str | None, example: str) -> Mapping[str, object]:
    """Return *value* as a table, or raise :class:`ConfigError` showing *example*."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{quote(value)} is not a table; {example}", key=key, value=value)
    return value


def read_knobs(
    table: Mapping[str, object], kinds: Mapping[str, Kind], *, where: str
) -> dict[str, object]:
    """Return the knobs set in *table*, keyed as in TOML, with units converted.

    Unknown keys raise before any value is looked at: a misspelt key is the
    likelier cause of whatever else looks wrong.  ``None`` (which Python
    callers may use) means "not set".
    """
    for key, value in table.items():
        if key not in kinds:
            raise unknown_key(key, value, known=kinds, where=where)
    return {
        key: _convert(kinds[key], value, key=f"{where}.{key}")
        for key, value in table.items()
        if value is not None
    }


def unknown_key(
    name: str, value: object, *, known: Iterable[str], where: str | None
) -> ConfigError:
    """Return the error for key *name*, suggesting the closest of the *known* keys."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        hint = f"did you mean {quote(close[0])}?"
    else:
        hint = "known keys are " + ", ".join(quote(k) for k in known)
    return ConfigError(
        f"unknown key {quote(name)}; {hint}",
        key=f"{where}.{name}" if where else name,
        value=value,
    )


def with_source(err: ConfigError, source: str) -> ConfigError:
    """Return *err* with *source* named, unless it names one already."""
    if err.source is not None:
        return err
    # ConfigError folds the key into its message; unfold it to fold both in.
    message = str(err)
    if err.key:
        message = message.removeprefix(f"{err.key}: ")
    return ConfigError(message, source=source, key=err.key, value=err.value)


def _convert(kind: Kind, value: object, *, key: str) -> object:
    converter = _CONVERTERS.get(kind)
    # The converters also turn away arrays, tables and dates, saying what
    # would do instead.
    return value if converter is None else converter(value, key=key)
