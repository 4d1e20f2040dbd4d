# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of :mod:`gpugate._fastpath_py`.

Same functions, same results for every input, faster. Import them through
:mod:`gpugate._speedups`, which picks this module or the twin at import time.

Integers are handled as C ``long long`` where they fit and as Python ints
where they do not, so results never depend on the width of a machine word.
"""

from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.limits cimport LLONG_MAX, LLONG_MIN
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset, strlen
from posix.types cimport pid_t
from posix.unistd cimport getpid

__all__ = ["NvmlLibrary", "pack_samples", "precheck_fits", "process_entry_bytes", "text_args"]


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


def text_args(tuple command):
    """``command`` with its ints and floats as text, as redis-py writes them
    (``repr``); everything else, bools included, as it is."""
    cdef Py_ssize_t n = len(command)
    cdef Py_ssize_t i
    cdef object value
    cdef list out = [None] * n
    for i in range(n):
        value = command[i]
        if type(value) is int:
            out[i] = _int_str(value)
        elif type(value) is float:
            out[i] = repr(value)
        else:
            out[i] = value
    return tuple(out)


# -- NVML ----------------------------------------------------------------------
#
# libnvidia-ml is opened at run time (dlopen), so building gpugate needs no
# CUDA toolkit and no NVIDIA header: the few structs used are declared here,
# and every layout that changed between drivers is chosen from the running
# driver. See docs/sampling.md.

cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* filename, int flag)
    void* dlsym(void* handle, const char* symbol)
    char* dlerror()
    int RTLD_NOW
    int RTLD_LOCAL

cdef struct NvmlMemory:
    unsigned long long total
    unsigned long long free
    unsigned long long used

cdef struct NvmlMemoryV2:
    unsigned int version
    unsigned long long total
    unsigned long long reserved
    unsigned long long free
    unsigned long long used

cdef struct NvmlUtilization:
    unsigned int gpu
    unsigned int memory

ctypedef int (*init_fn)() noexcept nogil
ctypedef int (*init_flags_fn)(unsigned int) noexcept nogil
ctypedef int (*count_fn)(unsigned int*) noexcept nogil
ctypedef int (*handle_by_index_fn)(unsigned int, void**) noexcept nogil
ctypedef int (*string_fn)(char*, unsigned int) noexcept nogil
ctypedef int (*device_string_fn)(void*, char*, unsigned int) noexcept nogil
ctypedef int (*memory_fn)(void*, NvmlMemory*) noexcept nogil
ctypedef int (*memory_v2_fn)(void*, NvmlMemoryV2*) noexcept nogil
ctypedef int (*utilization_fn)(void*, NvmlUtilization*) noexcept nogil
ctypedef int (*processes_fn)(void*, unsigned int*, void*) noexcept nogil
ctypedef int (*mig_mode_fn)(void*, unsigned int*, unsigned int*) noexcept nogil
ctypedef int (*device_uint_fn)(void*, unsigned int*) noexcept nogil
ctypedef int (*mig_handle_fn)(void*, unsigned int, void**) noexcept nogil

cdef enum:
    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_INSUFFICIENT_SIZE = 7
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_MEMORY = 20
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
    # nvmlMemory_v2: sizeof(nvmlMemory_v2_t) | 2 << 24; the literal 2 is refused
    NVML_MEMORY_V2_VERSION = 40 | (2 << 24)
    # first guess of the process list's length: one call in the common case
    PROCESS_CAPACITY = 64
    # retries after INSUFFICIENT_SIZE, and the most entries ever asked for
    PROCESS_GROWTH_TRIES = 4
    PROCESS_MAX_ENTRIES = 1 << 16
    STRING_BUFFER = 96

cdef unsigned long long VALUE_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFFULL
cdef unsigned int NO_INSTANCE = 0xFFFFFFFFU

cdef struct Slot:
    void* handle
    int memory_rc
    int memory_version
    unsigned long long total
    unsigned long long reserved
    unsigned long long used
    unsigned long long free
    int utilization_rc
    unsigned int utilization_gpu
    unsigned int utilization_memory
    int processes_rc
    unsigned int process_count
    unsigned int process_capacity
    unsigned char* process_buffer


def process_entry_bytes(driver_version, conf_compute, detail_list):
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


cdef inline str _text(const char* buffer):
    return buffer[:strlen(buffer)].decode("utf-8", "replace")


cdef class NvmlLibrary:
    """``libnvidia-ml`` opened with dlopen, sampled in one call without the GIL.

    ``path`` defaults to ``libnvidia-ml.so.1`` found by the dynamic loader.
    Raises ``OSError`` when the library cannot be loaded or lacks a call every
    driver has. NVML return codes are returned, never raised: the caller
    decides what each means (:mod:`gpugate.sampling._nvml`).

    :meth:`init` initialises NVML once per process (again in a forked child),
    :meth:`discover` enumerates the devices and caches their handles by UUID,
    :meth:`sample` reads every discovered device. Not thread-safe: one thread
    at a time (the sampler holds a lock).
    """

    cdef void* _lib
    cdef readonly str path
    cdef readonly str driver_version
    cdef readonly str memory_call
    cdef readonly str process_call
    cdef readonly int process_entry_bytes
    cdef pid_t _init_pid
    cdef Slot* _slots
    cdef Py_ssize_t _n_slots
    cdef list _uuids
    cdef init_fn _init_v2
    cdef init_flags_fn _init_flags
    cdef init_fn _shutdown
    cdef string_fn _driver
    cdef count_fn _count
    cdef handle_by_index_fn _handle_by_index
    cdef device_string_fn _uuid
    cdef device_string_fn _name
    cdef memory_fn _memory
    cdef memory_v2_fn _memory_v2
    cdef utilization_fn _utilization
    cdef processes_fn _processes
    cdef mig_mode_fn _mig_mode
    cdef device_uint_fn _max_mig
    cdef mig_handle_fn _mig_handle
    cdef bint _conf_compute
    cdef bint _detail_list

    def __cinit__(self, path=None):
        self._slots = NULL
        self._n_slots = 0
        self._uuids = []
        self._init_pid = 0

    def __init__(self, path=None):
        self.path = "libnvidia-ml.so.1" if path is None else str(path)
        encoded = self.path.encode()
        self._lib = dlopen(encoded, RTLD_NOW | RTLD_LOCAL)
        if self._lib == NULL:
            reason = dlerror()
            raise OSError(
                f"cannot load {self.path}: "
                f"{reason.decode(errors='replace') if reason != NULL else 'unknown reason'}"
            )
        self._init_v2 = <init_fn>self._symbol("nvmlInit_v2")
        self._init_flags = <init_flags_fn>self._symbol("nvmlInitWithFlags")
        self._shutdown = <init_fn>self._symbol("nvmlShutdown")
        self._driver = <string_fn>self._symbol("nvmlSystemGetDriverVersion")
        self._count = <count_fn>self._symbol("nvmlDeviceGetCount_v2")
        self._handle_by_index = <handle_by_index_fn>self._symbol("nvmlDeviceGetHandleByIndex_v2")
        self._uuid = <device_string_fn>self._symbol("nvmlDeviceGetUUID")
        self._name = <device_string_fn>self._symbol("nvmlDeviceGetName")
        self._memory = <memory_fn>self._symbol("nvmlDeviceGetMemoryInfo")
        self._memory_v2 = <memory_v2_fn>self._symbol("nvmlDeviceGetMemoryInfo_v2")
        self._utilization = <utilization_fn>self._symbol("nvmlDeviceGetUtilizationRates")
        self._mig_mode = <mig_mode_fn>self._symbol("nvmlDeviceGetMigMode")
        self._max_mig = <device_uint_fn>self._symbol("nvmlDeviceGetMaxMigDeviceCount")
        self._mig_handle = <mig_handle_fn>self._symbol("nvmlDeviceGetMigDeviceHandleByIndex")
        self._conf_compute = self._symbol("nvmlDeviceGetConfComputeMemSizeInfo") != NULL
        self._detail_list = self._symbol("nvmlDeviceGetRunningProcessDetailList") != NULL
        self.process_call = ""
        for name in (
            "nvmlDeviceGetComputeRunningProcesses_v3",
            "nvmlDeviceGetComputeRunningProcesses_v2",
            "nvmlDeviceGetComputeRunningProcesses",
        ):
            self._processes = <processes_fn>self._symbol(name)
            if self._processes != NULL:
                self.process_call = name
                break
        self.memory_call = (
            "nvmlDeviceGetMemoryInfo_v2" if self._memory_v2 != NULL else "nvmlDeviceGetMemoryInfo"
        )
        self.driver_version = ""
        self.process_entry_bytes = 0
        missing = [
            name
            for name, found in (
                ("nvmlInit_v2", self._init_v2 != NULL or self._init_flags != NULL),
                ("nvmlShutdown", self._shutdown != NULL),
                ("nvmlDeviceGetCount_v2", self._count != NULL),
                ("nvmlDeviceGetHandleByIndex_v2", self._handle_by_index != NULL),
                ("nvmlDeviceGetUUID", self._uuid != NULL),
                ("nvmlDeviceGetMemoryInfo", self._memory != NULL),
            )
            if not found
        ]
        if missing:
            raise OSError(
                f"{self.path} lacks {', '.join(missing)}: not an NVML library gpugate can use"
            )

    def __dealloc__(self):
        self._free_slots()

    cdef void* _symbol(self, str name):
        cdef bytes encoded = name.encode()
        return dlsym(self._lib, encoded)

    cdef void _free_slots(self) noexcept:
        cdef Py_ssize_t i
        if self._slots != NULL:
            for i in range(self._n_slots):
                free(self._slots[i].process_buffer)
            free(self._slots)
        self._slots = NULL
        self._n_slots = 0
        self._uuids = []

    @property
    def initialized(self):
        """Whether NVML is initialised in this process (a forked child must init again)."""
        return self._init_pid == getpid()

    def init(self):
        """Initialise NVML in this process, once; returns the NVML return code.

        On success the driver version is read and the process-entry layout
        chosen from it, and the device handles must be discovered again.
        """
        cdef int rc
        cdef char buffer[STRING_BUFFER]
        cdef pid_t pid = getpid()
        if self._init_pid == pid:
            return NVML_SUCCESS
        with nogil:
            if self._init_flags != NULL:
                rc = self._init_flags(0)
            else:
                rc = self._init_v2()
        if rc != NVML_SUCCESS:
            return rc
        self._init_pid = pid
        self._free_slots()
        self.driver_version = ""
        if self._driver != NULL:
            memset(buffer, 0, sizeof(buffer))
            if self._driver(buffer, sizeof(buffer)) == NVML_SUCCESS:
                self.driver_version = _text(buffer)
        if self.process_call == "nvmlDeviceGetComputeRunningProcesses":
            self.process_entry_bytes = 16
        elif self.process_call:
            self.process_entry_bytes = process_entry_bytes(
                self.driver_version, self._conf_compute, self._detail_list
            )
        return NVML_SUCCESS

    def shutdown(self):
        """Pair :meth:`init` with ``nvmlShutdown`` (NVML counts references)."""
        if self._init_pid != getpid():
            return NVML_SUCCESS
        self._init_pid = 0
        self._free_slots()
        return self._shutdown()

    cdef tuple _describe(self, void* handle, unsigned int index, object mig_index, str parent):
        cdef char uuid[STRING_BUFFER]
        cdef char name[STRING_BUFFER]
        cdef int rc
        memset(uuid, 0, sizeof(uuid))
        memset(name, 0, sizeof(name))
        rc = self._uuid(handle, uuid, sizeof(uuid))
        if self._name != NULL:
            self._name(handle, name, sizeof(name))
        return (index, mig_index, _text(uuid) if rc == NVML_SUCCESS else "", _text(name), parent, rc)

    def discover(self):
        """Enumerate the devices; returns ``(count_rc, devices)``.

        Each device is ``(index, mig_index, uuid, name, parent_uuid, rc)``;
        ``rc`` non-zero means it could not be reached (``uuid`` may then be
        empty). A GPU in MIG mode is replaced by its MIG instances
        (``mig_index`` set, ``parent_uuid`` the GPU's). The devices with
        ``rc == 0`` are the ones :meth:`sample` reads, in this order.
        """
        cdef unsigned int count = 0, index, current = 0, pending = 0, most = 0, j
        cdef void* handle = NULL
        cdef void* mig = NULL
        cdef int rc
        cdef list found = []
        cdef list handles = []
        cdef tuple described, parent
        if self._init_pid != getpid():
            raise RuntimeError("NvmlLibrary.discover() before init() in this process")
        self._free_slots()
        rc = self._count(&count)
        if rc != NVML_SUCCESS:
            return rc, []
        for index in range(count):
            rc = self._handle_by_index(index, &handle)
            if rc != NVML_SUCCESS:
                found.append((index, None, "", "", "", rc))
                continue
            parent = self._describe(handle, index, None, "")
            if (
                parent[5] == NVML_SUCCESS
                and self._mig_mode != NULL
                and self._mig_mode(handle, &current, &pending) == NVML_SUCCESS
                and current == 1
            ):
                if self._max_mig(handle, &most) != NVML_SUCCESS:
                    most = 0
                for j in range(most):
                    rc = self._mig_handle(handle, j, &mig)
                    if rc == NVML_ERROR_NOT_FOUND:
                        continue
                    if rc != NVML_SUCCESS:
                        found.append((index, j, "", "", parent[2], rc))
                        continue
                    described = self._describe(mig, index, j, parent[2])
                    found.append(described)
                    if described[5] == NVML_SUCCESS:
                        handles.append((described[2], <uintptr_t>mig))
                continue
            found.append(parent)
            if parent[5] == NVML_SUCCESS:
                handles.append((parent[2], <uintptr_t>handle))
        self._slots = <Slot*>malloc(max(1, len(handles)) * sizeof(Slot))
        if self._slots == NULL:
            raise MemoryError()
        memset(self._slots, 0, max(1, len(handles)) * sizeof(Slot))
        self._n_slots = len(handles)
        self._uuids = [uuid for uuid, _ in handles]
        for index in range(self._n_slots):
            self._slots[index].handle = <void*><uintptr_t>handles[index][1]
        return NVML_SUCCESS, found

    cdef void _read(self, Slot* s, bint with_processes) noexcept nogil:
        cdef NvmlMemoryV2 memory_v2
        cdef NvmlMemory memory
        cdef NvmlUtilization utilization
        cdef unsigned int count, want, tries = 0
        cdef unsigned char* grown
        cdef int rc = NVML_ERROR_FUNCTION_NOT_FOUND

        s.memory_version = 2
        if self._memory_v2 != NULL:
            memset(&memory_v2, 0, sizeof(memory_v2))
            memory_v2.version = NVML_MEMORY_V2_VERSION
            rc = self._memory_v2(s.handle, &memory_v2)
            if rc == NVML_SUCCESS:
                s.total, s.reserved = memory_v2.total, memory_v2.reserved
                s.used, s.free = memory_v2.used, memory_v2.free
        if rc in (
            NVML_ERROR_FUNCTION_NOT_FOUND,
            NVML_ERROR_NOT_SUPPORTED,
            NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
        ):
            # A driver before R510: v1 counts driver-reserved memory as used.
            s.memory_version = 1
            rc = self._memory(s.handle, &memory)
            if rc == NVML_SUCCESS:
                s.total, s.reserved, s.used, s.free = memory.total, 0, memory.used, memory.free
        s.memory_rc = rc

        if self._utilization == NULL:
            s.utilization_rc = NVML_ERROR_FUNCTION_NOT_FOUND
        else:
            s.utilization_rc = self._utilization(s.handle, &utilization)
            s.utilization_gpu, s.utilization_memory = utilization.gpu, utilization.memory

        s.process_count = 0
        if self._processes == NULL:
            s.processes_rc = NVML_ERROR_FUNCTION_NOT_FOUND
            return
        if not with_processes:
            s.processes_rc = NVML_ERROR_NOT_SUPPORTED
            return
        if s.process_buffer == NULL:
            s.process_buffer = <unsigned char*>malloc(PROCESS_CAPACITY * self.process_entry_bytes)
            s.process_capacity = PROCESS_CAPACITY if s.process_buffer != NULL else 0
        while True:
            count = s.process_capacity
            rc = self._processes(s.handle, &count, s.process_buffer)
            if rc != NVML_ERROR_INSUFFICIENT_SIZE or tries == PROCESS_GROWTH_TRIES:
                break
            tries += 1
            # Room for the processes that start before the next call, too.
            want = count + count // 2 + 8
            if want <= s.process_capacity:
                want = 2 * s.process_capacity
            if want > PROCESS_MAX_ENTRIES:
                break
            grown = <unsigned char*>realloc(s.process_buffer, want * self.process_entry_bytes)
            if grown == NULL:
                rc = NVML_ERROR_MEMORY
                break
            s.process_buffer, s.process_capacity = grown, want
        s.processes_rc = rc
        if rc == NVML_SUCCESS:
            s.process_count = count

    cdef tuple _processes_of(self, Slot* s):
        cdef unsigned int pid, gi, ci, k
        cdef unsigned long long used
        cdef unsigned char* entry
        cdef Py_ssize_t stride = self.process_entry_bytes
        cdef list out = []
        for k in range(s.process_count):
            entry = s.process_buffer + k * stride
            memcpy(&pid, entry, 4)
            memcpy(&used, entry + 8, 8)
            if stride >= 24:
                memcpy(&gi, entry + 16, 4)
                memcpy(&ci, entry + 20, 4)
                out.append((pid, None if used == VALUE_NOT_AVAILABLE else used, gi, ci))
            else:
                out.append((pid, None if used == VALUE_NOT_AVAILABLE else used, None, None))
        return tuple(out)

    def sample(self, processes=True):
        """Read every discovered device in one call, without the GIL.

        Returns one tuple per device, in :meth:`discover` order::

            (uuid, memory_rc, memory_version, total, reserved, used, free,
             utilization_rc, utilization_gpu, utilization_memory,
             processes_rc, processes)

        Memory in bytes (``None`` unless ``memory_rc`` is 0; ``reserved`` is
        0 with ``memory_version`` 1, whose ``used`` includes it); utilisation
        in percent (``None`` unless its rc is 0); ``processes`` a tuple of
        ``(pid, used_bytes or None, gpu_instance, compute_instance)``
        (instances ``None`` with 16-byte entries), ``None`` unless its rc is 0.
        With ``processes=False`` the list is not read (rc NOT_SUPPORTED).
        """
        cdef Py_ssize_t i
        cdef Slot* s
        cdef bint with_processes = bool(processes)
        cdef list out = []
        if self._init_pid != getpid():
            raise RuntimeError("NvmlLibrary.sample() before init() in this process")
        with nogil:
            for i in range(self._n_slots):
                self._read(&self._slots[i], with_processes)
        for i in range(self._n_slots):
            s = &self._slots[i]
            memory_ok = s.memory_rc == NVML_SUCCESS
            utilization_ok = s.utilization_rc == NVML_SUCCESS
            out.append((
                self._uuids[i],
                s.memory_rc,
                s.memory_version,
                s.total if memory_ok else None,
                s.reserved if memory_ok else None,
                s.used if memory_ok else None,
                s.free if memory_ok else None,
                s.utilization_rc,
                s.utilization_gpu if utilization_ok else None,
                s.utilization_memory if utilization_ok else None,
                s.processes_rc,
                self._processes_of(s) if s.processes_rc == NVML_SUCCESS else None,
            ))
        return out
