"""Pure-Python twin of the compiled ``gpugate._fastpath``.

Both modules define the same functions with the same results for every input
(``tests/test_packaging.py`` checks that property). Import them through
:mod:`gpugate._speedups`, which picks one at import time.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["NvmlLibrary", "pack_samples", "precheck_fits", "process_entry_bytes", "text_args"]


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


def text_args(command: tuple[Any, ...]) -> tuple[Any, ...]:
    """``command`` with its ints and floats as text, as redis-py writes them
    (``repr``); everything else, bools included, as it is."""
    return tuple(repr(a) if a.__class__ is int or a.__class__ is float else a for a in command)


# -- NVML ----------------------------------------------------------------------
#
# The twin of the compiled NvmlLibrary, on nvidia-ml-py (``pynvml``): the same
# calls, fallbacks, buffer growth and results. nvidia-ml-py keeps one library
# per process (``pynvml.nvmlLib``); the twin points it at ``path``, so a
# process uses one NVML library path at a time. nvidia-ml-py's own process
# query cannot choose the entry layout at run time, so that one call goes
# through its function pointer with a buffer laid out here.

_SUCCESS = 0
_NOT_SUPPORTED = 3
_NOT_FOUND = 6
_INSUFFICIENT_SIZE = 7
_FUNCTION_NOT_FOUND = 13
_ARGUMENT_VERSION_MISMATCH = 25
_MEMORY_V2_VERSION = 40 | (2 << 24)
_PROCESS_CAPACITY = 64
_PROCESS_GROWTH_TRIES = 4
_PROCESS_MAX_ENTRIES = 1 << 16
_VALUE_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFF
_V1_FALLBACK = (_FUNCTION_NOT_FOUND, _NOT_SUPPORTED, _ARGUMENT_VERSION_MISMATCH)
_PROCESS_CALLS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)
# pid, (padding), used, then gpu/compute instance ids where the layout has them
_ENTRY_FORMATS = {
    16: struct.Struct("<I4xQ"),
    24: struct.Struct("<I4xQII"),
    32: struct.Struct("<I4xQII8x"),
}


def process_entry_bytes(driver_version: str, conf_compute: bool, detail_list: bool) -> int:
    """Size of one compute-process entry on this driver: 24 or 32 bytes.

    Drivers 535.43 to 535.86 gave ``nvmlProcessInfo_t`` an extra 8-byte field
    (32 bytes); every other driver uses 24. When the version cannot be read,
    nvitop's test decides: ``nvmlDeviceGetConfComputeMemSizeInfo`` present
    (``conf_compute``) and ``nvmlDeviceGetRunningProcessDetailList`` absent
    (``detail_list``) means 32.
    """
    parts = str(driver_version).split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return 32 if conf_compute and not detail_list else 24
    if major == 535 and 43 <= minor < 98:
        return 32
    return 24


class NvmlLibrary:
    """``libnvidia-ml`` through nvidia-ml-py; the twin of the compiled class.

    ``path`` defaults to ``libnvidia-ml.so.1`` found by the dynamic loader.
    Raises ``OSError`` when the library (or nvidia-ml-py) cannot be loaded or
    lacks a call every driver has. NVML return codes are returned, never
    raised: the caller decides what each means.

    :meth:`init` initialises NVML once per process (again in a forked child),
    :meth:`discover` enumerates the devices and caches their handles by UUID,
    :meth:`sample` reads every discovered device. Not thread-safe: one thread
    at a time (the sampler holds a lock).
    """

    def __init__(self, path: str | None = None) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise OSError(
                f"nvidia-ml-py is not installed ({exc}); pip install nvidia-ml-py"
            ) from None
        self._nv: Any = pynvml
        self.path = "libnvidia-ml.so.1" if path is None else str(path)
        with pynvml.libLoadLock:
            # Loaded the way nvidia-ml-py itself would (same name, same
            # flags), so a library it already loaded is simply shared.
            if getattr(pynvml.nvmlLib, "_name", None) != self.path:
                try:
                    library = ctypes.CDLL(self.path)
                except OSError as exc:
                    raise OSError(f"cannot load {self.path}: {exc}") from None
                pynvml.nvmlLib = library
                pynvml._nvmlGetFunctionPointer_cache.clear()
        self._init_pid = 0
        self._slots: list[list[Any]] = []
        self.driver_version = ""
        self.process_entry_bytes = 0
        self._memory_v2 = self._has("nvmlDeviceGetMemoryInfo_v2")
        self._utilization = self._has("nvmlDeviceGetUtilizationRates")
        self._mig = self._has("nvmlDeviceGetMigMode")
        self._conf_compute = self._has("nvmlDeviceGetConfComputeMemSizeInfo")
        self._detail_list = self._has("nvmlDeviceGetRunningProcessDetailList")
        self.process_call = next((name for name in _PROCESS_CALLS if self._has(name)), "")
        self._processes: Any = (
            pynvml._nvmlGetFunctionPointer(self.process_call) if self.process_call else None
        )
        self.memory_call = (
            "nvmlDeviceGetMemoryInfo_v2" if self._memory_v2 else "nvmlDeviceGetMemoryInfo"
        )
        missing = [
            name
            for name, found in (
                ("nvmlInit_v2", self._has("nvmlInitWithFlags") or self._has("nvmlInit_v2")),
                ("nvmlShutdown", self._has("nvmlShutdown")),
                ("nvmlDeviceGetCount_v2", self._has("nvmlDeviceGetCount_v2")),
                ("nvmlDeviceGetHandleByIndex_v2", self._has("nvmlDeviceGetHandleByIndex_v2")),
                ("nvmlDeviceGetUUID", self._has("nvmlDeviceGetUUID")),
                ("nvmlDeviceGetMemoryInfo", self._has("nvmlDeviceGetMemoryInfo")),
            )
            if not found
        ]
        if missing:
            raise OSError(
                f"{self.path} lacks {', '.join(missing)}: not an NVML library gpugate can use"
            )

    def _has(self, name: str) -> bool:
        try:
            self._nv._nvmlGetFunctionPointer(name)
        except self._nv.NVMLError:
            return False
        return True

    def _call(self, function: Any, *args: Any) -> tuple[int, Any]:
        try:
            return _SUCCESS, function(*args)
        except self._nv.NVMLError as exc:
            return int(exc.value), None

    @property
    def initialized(self) -> bool:
        """Whether NVML is initialised in this process (a forked child must init again)."""
        return self._init_pid == os.getpid()

    def init(self) -> int:
        """Initialise NVML in this process, once; returns the NVML return code.

        On success the driver version is read and the process-entry layout
        chosen from it, and the device handles must be discovered again.
        """
        pid = os.getpid()
        if self._init_pid == pid:
            return _SUCCESS
        if self._has("nvmlInitWithFlags"):
            rc, _ = self._call(self._nv.nvmlInit)
        else:
            rc = self._nv._nvmlGetFunctionPointer("nvmlInit_v2")()
        if rc != _SUCCESS:
            return rc
        self._init_pid = pid
        self._slots = []
        rc, version = self._call(self._nv.nvmlSystemGetDriverVersion)
        self.driver_version = version if rc == _SUCCESS else ""
        if self.process_call == "nvmlDeviceGetComputeRunningProcesses":
            self.process_entry_bytes = 16
        elif self.process_call:
            self.process_entry_bytes = process_entry_bytes(
                self.driver_version, self._conf_compute, self._detail_list
            )
        return _SUCCESS

    def shutdown(self) -> int:
        """Pair :meth:`init` with ``nvmlShutdown`` (NVML counts references)."""
        if self._init_pid != os.getpid():
            return _SUCCESS
        self._init_pid = 0
        self._slots = []
        rc, _ = self._call(self._nv.nvmlShutdown)
        return rc

    def _describe(
        self, handle: Any, index: int, mig_index: int | None, parent: str
    ) -> tuple[int, int | None, str, str, str, int]:
        rc, uuid = self._call(self._nv.nvmlDeviceGetUUID, handle)
        name_rc, name = self._call(self._nv.nvmlDeviceGetName, handle)
        return (
            index,
            mig_index,
            uuid if rc == _SUCCESS else "",
            name if name_rc == _SUCCESS else "",
            parent,
            rc,
        )

    def discover(self) -> tuple[int, list[tuple[int, int | None, str, str, str, int]]]:
        """Enumerate the devices; returns ``(count_rc, devices)``.

        Each device is ``(index, mig_index, uuid, name, parent_uuid, rc)``;
        ``rc`` non-zero means it could not be reached (``uuid`` may then be
        empty). A GPU in MIG mode is replaced by its MIG instances
        (``mig_index`` set, ``parent_uuid`` the GPU's). The devices with
        ``rc == 0`` are the ones :meth:`sample` reads, in this order.
        """
        nv = self._nv
        if self._init_pid != os.getpid():
            raise RuntimeError("NvmlLibrary.discover() before init() in this process")
        self._slots = []
        rc, count = self._call(nv.nvmlDeviceGetCount)
        if rc != _SUCCESS:
            return rc, []
        found: list[tuple[int, int | None, str, str, str, int]] = []
        for index in range(count):
            rc, handle = self._call(nv.nvmlDeviceGetHandleByIndex, index)
            if rc != _SUCCESS:
                found.append((index, None, "", "", "", rc))
                continue
            parent = self._describe(handle, index, None, "")
            if parent[5] == _SUCCESS and self._mig:
                rc, mode = self._call(nv.nvmlDeviceGetMigMode, handle)
                if rc == _SUCCESS and mode[0] == 1:
                    rc, most = self._call(nv.nvmlDeviceGetMaxMigDeviceCount, handle)
                    for j in range(most if rc == _SUCCESS else 0):
                        rc, mig = self._call(nv.nvmlDeviceGetMigDeviceHandleByIndex, handle, j)
                        if rc == _NOT_FOUND:
                            continue
                        if rc != _SUCCESS:
                            found.append((index, j, "", "", parent[2], rc))
                            continue
                        described = self._describe(mig, index, j, parent[2])
                        found.append(described)
                        if described[5] == _SUCCESS:
                            self._slots.append([described[2], mig, None, 0])
                    continue
            found.append(parent)
            if parent[5] == _SUCCESS:
                self._slots.append([parent[2], handle, None, 0])
        return _SUCCESS, found

    def _read_memory(self, handle: Any) -> tuple[int, int, Any, Any, Any, Any]:
        nv = self._nv
        rc = _FUNCTION_NOT_FOUND
        if self._memory_v2:
            rc, m = self._call(nv.nvmlDeviceGetMemoryInfo, handle, _MEMORY_V2_VERSION)
            if rc == _SUCCESS:
                return rc, 2, m.total, m.reserved, m.used, m.free
        if rc in _V1_FALLBACK:
            # A driver before R510: v1 counts driver-reserved memory as used.
            rc, m = self._call(nv.nvmlDeviceGetMemoryInfo, handle)
            if rc == _SUCCESS:
                return rc, 1, m.total, 0, m.used, m.free
            return rc, 1, None, None, None, None
        return rc, 2, None, None, None, None

    def _read_processes(self, slot: list[Any]) -> tuple[int, Any]:
        stride = self.process_entry_bytes
        if slot[2] is None:
            slot[2], slot[3] = (
                ctypes.create_string_buffer(_PROCESS_CAPACITY * stride),
                _PROCESS_CAPACITY,
            )
        count = ctypes.c_uint(0)
        tries = 0
        while True:
            count.value = slot[3]
            rc = self._processes(slot[1], ctypes.byref(count), slot[2])
            if rc != _INSUFFICIENT_SIZE or tries == _PROCESS_GROWTH_TRIES:
                break
            tries += 1
            # Room for the processes that start before the next call, too.
            want = count.value + count.value // 2 + 8
            if want <= slot[3]:
                want = 2 * slot[3]
            if want > _PROCESS_MAX_ENTRIES:
                break
            slot[2], slot[3] = ctypes.create_string_buffer(want * stride), want
        if rc != _SUCCESS:
            return rc, None
        layout = _ENTRY_FORMATS[stride]
        raw = memoryview(slot[2])[: count.value * stride]
        out = []
        for entry in layout.iter_unpack(raw):
            used = None if entry[1] == _VALUE_NOT_AVAILABLE else entry[1]
            if stride >= 24:
                out.append((entry[0], used, entry[2], entry[3]))
            else:
                out.append((entry[0], used, None, None))
        return rc, tuple(out)

    def sample(self, processes: bool = True) -> list[tuple[Any, ...]]:
        """Read every discovered device; the same tuples as the compiled twin.

        ``(uuid, memory_rc, memory_version, total, reserved, used, free,
        utilization_rc, utilization_gpu, utilization_memory, processes_rc,
        processes)``: see ``gpugate._fastpath.NvmlLibrary.sample``. ctypes
        releases the GIL around each NVML call.
        """
        nv = self._nv
        if self._init_pid != os.getpid():
            raise RuntimeError("NvmlLibrary.sample() before init() in this process")
        out: list[tuple[Any, ...]] = []
        for slot in self._slots:
            handle = slot[1]
            memory = self._read_memory(handle)
            if self._utilization:
                util_rc, util = self._call(nv.nvmlDeviceGetUtilizationRates, handle)
            else:
                util_rc, util = _FUNCTION_NOT_FOUND, None
            if self._processes is None:
                proc_rc, procs = _FUNCTION_NOT_FOUND, None
            elif not processes:
                proc_rc, procs = _NOT_SUPPORTED, None
            else:
                proc_rc, procs = self._read_processes(slot)
            out.append(
                (
                    slot[0],
                    *memory,
                    util_rc,
                    util.gpu if util_rc == _SUCCESS else None,
                    util.memory if util_rc == _SUCCESS else None,
                    proc_rc,
                    procs,
                )
            )
        return out
