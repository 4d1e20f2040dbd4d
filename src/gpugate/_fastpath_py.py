"""Pure-Python twin of the compiled ``gpugate._fastpath``.

Both modules define the same functions with the same results for every input
(``tests/test_packaging.py`` checks that property). Import them through
:mod:`gpugate._speedups`, which picks one at import time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["pack_samples", "precheck_fits"]


def precheck_fits(free_bytes: Iterable[int], vram: int, margin: int) -> bool:
    """Tell whether a request for ``vram`` bytes could fit on any device.

    ``free_bytes`` holds the free memory of each device, in bytes, and
    ``margin`` the bytes every device must keep free. True when some device
    has ``free - margin >= vram``. A False lets the caller answer DEFER without
    asking Redis; a True decides nothing, Redis still has the last word.
    """
    need = vram + margin
    return any(free >= need for free in free_bytes)


def pack_samples(
    uuids: Sequence[str],
    totals: Sequence[int],
    useds: Sequence[int],
    ages_ms: Sequence[int],
) -> list[str]:
    """Flatten per-device samples into the ARGV layout the Lua scripts read.

    Returns ``[uuid0, str(total0), str(used0), str(age0), uuid1, ...]``: four
    entries per device, memory in bytes and sample age in milliseconds.
    Raises ``ValueError`` when the four sequences differ in length.
    """
    n = len(uuids)
    if len(totals) != n or len(useds) != n or len(ages_ms) != n:
        raise ValueError(
            "pack_samples needs one value per device in each sequence, got "
            f"{n} uuids, {len(totals)} totals, {len(useds)} useds, {len(ages_ms)} ages_ms"
        )
    out: list[str] = [""] * (4 * n)
    out[0::4] = uuids
    out[1::4] = [str(v) for v in totals]
    out[2::4] = [str(v) for v in useds]
    out[3::4] = [str(v) for v in ages_ms]
    return out
