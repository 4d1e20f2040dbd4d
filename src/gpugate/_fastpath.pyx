# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of :mod:`gpugate._fastpath_py`.

Same functions, same results for every input, faster. Import them through
:mod:`gpugate._speedups`, which picks this module or the twin at import time.

Integers are handled as C ``long long`` where they fit and as Python ints
where they do not, so results never depend on the width of a machine word.
"""

from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.limits cimport LLONG_MAX, LLONG_MIN

__all__ = ["pack_samples", "precheck_fits"]


cdef inline list _as_list(object values):
    if type(values) is list:
        return <list>values
    return list(values)


cdef inline bint _holds(object free, long long need) except -1:
    # Exact "free >= need" for any int free, with need known to fit in 64 bits.
    cdef int overflow = 0
    cdef long long value = PyLong_AsLongLongAndOverflow(free, &overflow)
    if overflow > 0:
        return True
    if overflow < 0:
        return False
    return value >= need


cdef inline bint _sum_fits(long long a, long long b) noexcept:
    # Whether a + b stays within long long, checked without overflowing.
    if b > 0:
        return a <= LLONG_MAX - b
    return a >= LLONG_MIN - b


def precheck_fits(free_bytes, vram, margin):
    """Tell whether a request for ``vram`` bytes could fit on any device.

    ``free_bytes`` holds the free memory of each device, in bytes, and
    ``margin`` the bytes every device must keep free. True when some device
    has ``free - margin >= vram``. A False lets the caller answer DEFER without
    asking Redis; a True decides nothing, Redis still has the last word.
    """
    cdef int overflow_v = 0, overflow_m = 0
    cdef long long c_vram = PyLong_AsLongLongAndOverflow(vram, &overflow_v)
    cdef long long c_margin = PyLong_AsLongLongAndOverflow(margin, &overflow_m)
    cdef object need_obj
    cdef long long need
    cdef list values
    cdef Py_ssize_t i, n

    if overflow_v or overflow_m or not _sum_fits(c_vram, c_margin):
        need_obj = vram + margin
        return any(free >= need_obj for free in free_bytes)
    need = c_vram + c_margin

    values = _as_list(free_bytes)
    n = len(values)
    for i in range(n):
        if _holds(values[i], need):
            return True
    return False


cdef inline str _int_str(object value):
    # Exactly str(value): the C formatting is only taken for plain ints that fit.
    cdef int overflow = 0
    cdef long long c_value
    if type(value) is int:
        c_value = PyLong_AsLongLongAndOverflow(value, &overflow)
        if not overflow:
            return f"{c_value}"
    return str(value)


def pack_samples(uuids, totals, useds, ages_ms):
    """Flatten per-device samples into the ARGV layout the Lua scripts read.

    Returns ``[uuid0, str(total0), str(used0), str(age0), uuid1, ...]``: four
    entries per device, memory in bytes and sample age in milliseconds.
    Raises ``ValueError`` when the four sequences differ in length.
    """
    cdef list u = _as_list(uuids)
    cdef list t = _as_list(totals)
    cdef list us = _as_list(useds)
    cdef list a = _as_list(ages_ms)
    cdef Py_ssize_t n = len(u)
    cdef Py_ssize_t i, j
    cdef list out

    if len(t) != n or len(us) != n or len(a) != n:
        raise ValueError(
            "pack_samples needs one value per device in each sequence, got "
            f"{n} uuids, {len(t)} totals, {len(us)} useds, {len(a)} ages_ms"
        )
    out = [None] * (4 * n)
    for i in range(n):
        j = 4 * i
        out[j] = u[i]
        out[j + 1] = _int_str(t[i])
        out[j + 2] = _int_str(us[i])
        out[j + 3] = _int_str(a[i])
    return out
