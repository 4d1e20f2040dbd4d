"""The NVML sampler: the GPUs of this host as the NVIDIA driver sees them.

:class:`NvmlSampler` keeps a snapshot of every device fresh from a background
thread (every ``period_s``, 100 ms by default); :meth:`NvmlSampler.sample`
returns it, refreshing synchronously only when it is older than ``max_age_s``.
The NVML calls themselves live in ``NvmlLibrary`` (the compiled
``gpugate._fastpath`` or its nvidia-ml-py twin, chosen by
:mod:`gpugate._speedups`); this module decides what each NVML answer means
for admission (docs/sampling.md):

* GPU_IS_LOST / RESET_REQUIRED: that device is quarantined (nothing is
  admitted there) until it has answered normally for ``quarantine_s``; the
  other devices carry on. One lost before its uuid could ever be read is
  quarantined under :func:`lost_device_id` (``LOST-gpu<index>@<host>``).
* NOT_SUPPORTED (utilisation under MIG, processes on some boards): unknown,
  ``None``, never 0.
* Library or driver missing: :class:`NvmlUnavailable`; :func:`default_sampler`
  then falls back to :class:`NoGpuSampler` (each class's ``no_gpu`` policy).
* LIB_RM_VERSION_MISMATCH (driver upgraded without a reboot): :class:`NvmlError`
  from :meth:`NvmlSampler.sample`, loudly.
* Anything else on one device (or on the device count): that device (or
  every device) keeps its last good reading, with its own older time, for up
  to ``max_age_s``, then drops out until it answers again.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from .. import _fastpath_py, _speedups
from .._exceptions import ConfigError, NvmlError, NvmlUnavailable, UsageError
from .._logging import Throttle
from ._nogpu import NoGpuSampler
from ._sample import (
    DeviceFault,
    DeviceSample,
    GpuProcess,
    Sampler,
    Snapshot,
    hostname,
    lost_device_id,
)

if TYPE_CHECKING:
    from ..metrics import Metrics

log = structlog.get_logger(__name__)

LIBRARY_ENV = "GPUGATE_NVML_LIBRARY"

# nvmlReturn_t values gpugate gives a meaning to, and their names.
ERROR_NAMES = {
    0: "SUCCESS",
    1: "UNINITIALIZED",
    2: "INVALID_ARGUMENT",
    3: "NOT_SUPPORTED",
    4: "NO_PERMISSION",
    6: "NOT_FOUND",
    7: "INSUFFICIENT_SIZE",
    9: "DRIVER_NOT_LOADED",
    10: "TIMEOUT",
    12: "LIBRARY_NOT_FOUND",
    13: "FUNCTION_NOT_FOUND",
    15: "GPU_IS_LOST",
    16: "RESET_REQUIRED",
    18: "LIB_RM_VERSION_MISMATCH",
    20: "MEMORY",
    25: "ARGUMENT_VERSION_MISMATCH",
    999: "UNKNOWN",
}
_SUCCESS, _UNINITIALIZED, _NOT_SUPPORTED, _FUNCTION_NOT_FOUND = 0, 1, 3, 13
_LOST = frozenset({15, 16})
_UNAVAILABLE = frozenset({9, 12})
_FATAL = frozenset({18})
# A handle that no longer names a device (a MIG instance destroyed, a GPU gone).
_STALE_HANDLE = frozenset({2, 6})
# "This metric does not exist here": not an error worth counting.
_ABSENT = frozenset({_NOT_SUPPORTED, _FUNCTION_NOT_FOUND})

_FIXES = {
    9: "load the NVIDIA kernel driver (nvidia-smi must work)",
    12: f"install the NVIDIA driver, or set {LIBRARY_ENV} to libnvidia-ml.so.1's path",
    15: "reset the GPU (nvidia-smi -r) or reboot; nothing is admitted there meanwhile",
    16: "reset the GPU (nvidia-smi -r); nothing is admitted there meanwhile",
    18: "the driver was upgraded without a reboot: reboot the host",
}


def error_name(code: int) -> str:
    """The NVML name of a return code (``"GPU_IS_LOST"``), or ``"ERROR_<n>"``."""
    return ERROR_NAMES.get(code, f"ERROR_{code}")


def _fail(cls: type[NvmlError], code: int, call: str, library: str) -> NvmlError:
    fix = _FIXES.get(code, "see docs/sampling.md")
    return cls(
        f"{call} failed on {library}: {error_name(code)} ({code}); {fix}", code=code, call=call
    )


def _library_class(implementation: str | None) -> tuple[Any, str]:
    """The NvmlLibrary class to use, and which twin it is."""
    if implementation is None:
        return _speedups.NvmlLibrary, _speedups.IMPLEMENTATION
    if implementation == "python":
        return _fastpath_py.NvmlLibrary, "python"
    if implementation == "cython":
        try:
            return importlib.import_module("gpugate._fastpath").NvmlLibrary, "cython"
        except ImportError as exc:
            raise ConfigError(
                f"the compiled fast path is not installed ({exc}); "
                "reinstall gpugate with a C compiler, or use implementation='python'",
                key="implementation",
                value=implementation,
            ) from None
    raise ConfigError(
        "implementation is 'cython', 'python' or None (the one gpugate._speedups chose)",
        key="implementation",
        value=implementation,
    )


class NvmlSampler:
    """Every NVIDIA device of this host (MIG instances as devices of their own).

    ``library``: the path of ``libnvidia-ml.so.1`` (default:
    ``$GPUGATE_NVML_LIBRARY``, else the dynamic loader's search).
    ``period_s``: how often the background thread refreshes the snapshot.
    ``max_age_s``: :meth:`sample` refreshes synchronously when the snapshot
    is older (the background thread normally keeps it younger); give the
    policy's ``sample_max_age`` or less. ``processes``: read each device's
    compute processes too. ``quarantine_s``: how long a lost device must
    answer normally before it admits again. ``rediscover_s``: how often the
    device list is read again (MIG changes, recovered GPUs).
    ``background``: run the refresh thread (started by the first
    :meth:`sample`). ``implementation``: ``"cython"`` or ``"python"`` to
    force one twin (default: :mod:`gpugate._speedups`' choice).
    ``metrics``: the instruments to update (default: the process's).

    Raises :class:`NvmlUnavailable` when NVML cannot be loaded or its driver
    is missing, :class:`NvmlError` when it cannot be initialised. Thread-safe
    and fork-safe: a forked child initialises NVML again on its first sample.
    """

    backend = "nvml"

    def __init__(
        self,
        library: str | None = None,
        *,
        period_s: float = 0.1,
        max_age_s: float = 1.0,
        processes: bool = True,
        quarantine_s: float = 60.0,
        rediscover_s: float = 10.0,
        background: bool = True,
        implementation: str | None = None,
        metrics: Metrics | None = None,
        _clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for key, value in (("period_s", period_s), ("max_age_s", max_age_s)):
            if not value > 0:
                raise ConfigError("must be a positive number of seconds", key=key, value=value)
        library_class, self.implementation = _library_class(implementation)
        path = library if library is not None else (os.environ.get(LIBRARY_ENV) or None)
        if path is not None and path.strip().lower() == "none":
            raise NvmlUnavailable(f"{LIBRARY_ENV}=none turns NVML off", code=12, call="dlopen")
        self.period_s = float(period_s)
        self.max_age_s = float(max_age_s)
        self.quarantine_s = float(quarantine_s)
        self.rediscover_s = float(rediscover_s)
        self._processes = processes
        self._background = background
        self._clock = _clock
        self._host = hostname()
        if metrics is None:
            from ..metrics import default_metrics

            metrics = default_metrics()
        self._metrics: Metrics = metrics
        self._seconds = metrics.sampler_seconds.labels(self.backend)
        try:
            self._lib = library_class(path)
        except OSError as exc:
            raise NvmlUnavailable(
                f"NVML is not available: {exc}; {_FIXES[12]}",
                code=12,
                call="dlopen",
            ) from None
        self.library = self._lib.path
        self._lock = threading.Lock()
        self._throttle = Throttle(60.0)
        self._snapshot: Snapshot | None = None
        self._refreshed = float("-inf")
        self._failure: NvmlError | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._pid = os.getpid()
        # Per device: (index, mig_index, name, parent_uuid), from the last discovery.
        self._info: dict[str, tuple[int, int | None, str, str]] = {}
        self._uuid_at: dict[tuple[int, int | None], str] = {}
        self._discovery_faults: list[DeviceFault] = []
        self._discovery_failed = False
        self._next_discovery = float("-inf")
        # Quarantined devices: when they last answered lost, and with which code.
        self._lost: dict[str, tuple[float, int]] = {}
        self._last_good: dict[str, DeviceSample] = {}
        # Each device's usable memory when it last answered (for its faults).
        self._totals: dict[str, int] = {}
        self._last_processes: dict[str, tuple[Any, tuple[GpuProcess, ...] | None]] = {}
        with self._lock:
            self._start_nvml(raise_errors=True)
        _live.add(self)
        log.info(
            "nvml_sampler_ready",
            implementation=self.implementation,
            library=self.library,
            driver_version=self._lib.driver_version,
            memory_call=self._lib.memory_call,
            process_call=self._lib.process_call or None,
            process_entry_bytes=self._lib.process_entry_bytes,
            devices=len(self._info),
            period_s=self.period_s,
        )

    # -- reading -----------------------------------------------------------------

    def sample(self, max_age_s: float | None = None) -> Snapshot:
        """The current snapshot: the background thread's, or a fresh one when
        it is older than ``max_age_s`` (default: the sampler's ``max_age_s``).

        Raises :class:`NvmlError` once NVML failed for good (e.g. the driver
        was upgraded under a running process).
        """
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise UsageError("this NvmlSampler is closed; make a new one")
        self._ensure_thread()
        limit = self.max_age_s if max_age_s is None else max_age_s
        snapshot = self._snapshot
        if snapshot is not None and self._clock() - self._refreshed <= limit:
            return snapshot
        return self._refresh(limit)

    def refresh(self) -> Snapshot:
        """Read every device now, in this thread."""
        return self._refresh(None)

    def _refresh(self, limit: float | None) -> Snapshot:
        with self._lock:
            # Another thread may have refreshed while this one waited.
            if (
                limit is not None
                and self._snapshot is not None
                and self._clock() - self._refreshed <= limit
            ):
                return self._snapshot
            started = time.perf_counter()
            snapshot = self._read()
            self._seconds.observe(time.perf_counter() - started)
            self._snapshot, self._refreshed = snapshot, self._clock()
            return snapshot

    def _start_nvml(self, *, raise_errors: bool) -> bool:
        """Initialise NVML in this process and discover; False when it cannot."""
        rc = self._lib.init()
        if rc == _SUCCESS:
            self._discover()
            return True
        cls = NvmlUnavailable if rc in _UNAVAILABLE else NvmlError
        error = _fail(cls, rc, "nvmlInit", self.library)
        if raise_errors or rc in _FATAL:
            raise error
        if self._throttle.allow(("init", rc)) is not None:
            log.warning("nvml_init_failed", error=str(error), code=rc)
        self._count_error("nvmlInit")
        return False

    def _discover(self) -> None:
        now = self._clock()
        self._next_discovery = now + self.rediscover_s
        rc, found = self._lib.discover()
        self._info = {}
        self._discovery_faults = []
        self._discovery_failed = rc != _SUCCESS
        if rc != _SUCCESS:
            # Try again on the next refresh; meanwhile the last readings stand in.
            self._next_discovery = float("-inf")
            self._count_error("nvmlDeviceGetCount_v2")
            if self._throttle.allow(("count", rc)) is not None:
                log.warning("nvml_count_failed", code=rc, error=error_name(rc))
            return
        for index, mig_index, uuid, name, parent, code in found:
            if code == _SUCCESS:
                self._info[uuid] = (index, mig_index, name, parent)
                self._uuid_at[(index, mig_index)] = uuid
                # Lost under its stand-in id: its quarantine carries over.
                stand_in = self._lost.pop(lost_device_id(self._host, index, mig_index), None)
                if stand_in is not None and uuid not in self._lost:
                    self._lost[uuid] = stand_in
                continue
            # A device that cannot say who it is may be one seen before; a lost
            # one never seen gets an id from where it is, so that it shows as
            # quarantined (status, metrics, alerts) and not only in admission.
            uuid = uuid or self._uuid_at.get((index, mig_index), "")
            if not uuid and code in _LOST:
                uuid = lost_device_id(self._host, index, mig_index)
            self._count_error("nvmlDeviceGetHandleByIndex_v2")
            if code in _LOST:
                self._mark_lost(uuid, index, code, now)
            self._discovery_faults.append(
                DeviceFault(
                    uuid=uuid,
                    index=index,
                    code=code,
                    error=error_name(code),
                    quarantined=code in _LOST,
                    mig_index=mig_index,
                    total=self._totals.get(uuid),
                )
            )

    def _read(self) -> Snapshot:
        if os.getpid() != self._pid or not self._lib.initialized:
            self._pid = os.getpid()
            if not self._start_nvml(raise_errors=False):
                return Snapshot((), self._clock(), self._host, self.backend)
        elif self._clock() >= self._next_discovery:
            self._discover()
        records = self._lib.sample(self._processes)
        now = self._clock()
        devices: list[DeviceSample] = []
        if self._discovery_failed:
            devices = [d for d in self._last_good.values() if self._recent(d, now)]
        faults = list(self._discovery_faults)
        for record in records:
            seen = self._device(record, now)
            if isinstance(seen, DeviceFault):
                faults.append(seen)
            else:
                devices.append(seen)
        oldest = min((d.taken_mono for d in devices if d.taken_mono is not None), default=now)
        return Snapshot(tuple(devices), oldest, self._host, self.backend, tuple(faults))

    def _device(self, record: tuple[Any, ...], now: float) -> DeviceSample | DeviceFault:
        """What one ``NvmlLibrary.sample`` record means for admission."""
        (uuid, memory_rc, memory_version, total, reserved, used, _free,
         util_rc, util_gpu, util_memory, processes_rc, processes) = record  # fmt: skip
        index, mig_index, name, parent = self._info[uuid]
        self._note_errors(uuid, index, memory_rc, util_rc, processes_rc, now)
        lost = self._lost.get(uuid)
        if lost is not None and self._quarantined(uuid, now):
            return DeviceFault(
                uuid, index, lost[1], error_name(lost[1]), True, mig_index, self._totals.get(uuid)
            )
        if memory_rc != _SUCCESS:
            # A handle that names nothing any more has no last reading to stand in.
            kept = None if memory_rc in _STALE_HANDLE else self._last_good.get(uuid)
            if kept is not None and self._recent(kept, now):
                return kept
            return DeviceFault(
                uuid,
                index,
                memory_rc,
                error_name(memory_rc),
                False,
                mig_index,
                self._totals.get(uuid),
            )
        usable = total - reserved
        sample = DeviceSample(
            uuid=uuid,
            index=index,
            total=usable,
            used=min(used, usable),
            name=name,
            utilization=None if util_gpu is None else util_gpu / 100,
            memory_utilization=None if util_memory is None else util_memory / 100,
            reserved=reserved if memory_version == 2 else None,
            processes=self._processes_of(uuid, processes),
            parent_uuid=parent,
            mig_index=mig_index,
            taken_mono=now,
        )
        self._last_good[uuid] = sample
        self._totals[uuid] = usable
        return sample

    def _recent(self, sample: DeviceSample, now: float) -> bool:
        """Whether a last good reading may still stand in for its device."""
        return sample.taken_mono is not None and now - sample.taken_mono <= self.max_age_s

    def _processes_of(
        self, uuid: str, raw: tuple[tuple[Any, ...], ...] | None
    ) -> tuple[GpuProcess, ...] | None:
        # The list seldom changes between refreshes: reuse the last one built.
        last = self._last_processes.get(uuid)
        if last is not None and last[0] == raw:
            return last[1]
        built = None if raw is None else tuple(map(GpuProcess._make, raw))
        self._last_processes[uuid] = (raw, built)
        return built

    def _note_errors(
        self, uuid: str, index: int, memory_rc: int, util_rc: int, processes_rc: int, now: float
    ) -> None:
        """Count and log one device's errors; act on those that change what it is.

        A lost device is logged once, as ``gpu_quarantined``, not once per call
        that says so (every call on it does); the metric counts every call."""
        for call, code in (
            (self._lib.memory_call, memory_rc),
            ("nvmlDeviceGetUtilizationRates", util_rc),
            (self._lib.process_call, processes_rc),
        ):
            if code != _SUCCESS and code not in _ABSENT:
                self._count_error(call)
                if code not in _LOST:
                    self._log_device_error(uuid, index, call, code)
        lost = next((c for c in (memory_rc, util_rc, processes_rc) if c in _LOST), None)
        if lost is not None:
            self._mark_lost(uuid, index, lost, now)
        if memory_rc == _UNINITIALIZED:
            # Someone shut NVML down under us: initialise again next time.
            self._lib.shutdown()
        elif memory_rc in _STALE_HANDLE:
            self._next_discovery = float("-inf")

    # -- quarantine ----------------------------------------------------------------

    def _mark_lost(self, uuid: str, index: int, code: int, now: float) -> None:
        if uuid not in self._lost:
            log.error(
                "gpu_quarantined",
                uuid=uuid,
                index=index,
                error=error_name(code),
                quarantine_s=self.quarantine_s,
                fix=_FIXES.get(code, ""),
            )
        self._lost[uuid] = (now, code)
        self._last_good.pop(uuid, None)

    def _quarantined(self, uuid: str, now: float) -> bool:
        lost = self._lost.get(uuid)
        if lost is None:
            return False
        if now - lost[0] < self.quarantine_s:
            return True
        del self._lost[uuid]
        log.warning("gpu_quarantine_lifted", uuid=uuid, healthy_for_s=round(now - lost[0], 3))
        return False

    # -- errors --------------------------------------------------------------------

    def _count_error(self, call: str) -> None:
        self._metrics.nvml_errors.labels(call).inc()

    def _log_device_error(self, uuid: str, index: int, call: str, code: int) -> None:
        dropped = self._throttle.allow((uuid, call, code))
        if dropped is not None:
            log.warning(
                "nvml_device_error",
                uuid=uuid,
                index=index,
                call=call,
                error=error_name(code),
                code=code,
                similar_events_suppressed=dropped,
            )

    # -- the background thread -------------------------------------------------------

    def _ensure_thread(self) -> None:
        if not self._background or self._closed:
            return
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="gpugate-sampler", daemon=True
            )
            self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.period_s):
            try:
                self.refresh()
            except NvmlError as exc:
                self._failure = exc
                log.error("nvml_sampler_stopped", error=str(exc), code=exc.code)
                return
            except Exception as exc:  # keep sampling; sample() refreshes anyway
                if self._throttle.allow(("thread", type(exc))) is not None:
                    log.exception("nvml_sampler_error", error=str(exc))

    def _after_fork_in_child(self) -> None:
        # Whatever another thread held at fork time stays held in the child.
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()

    # -- status and lifetime -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What runs and what it sees, for ``gpugate status`` and logs."""
        snapshot = self._snapshot
        return {
            "backend": self.backend,
            "implementation": self.implementation,
            "library": self.library,
            "driver_version": self._lib.driver_version,
            "memory_call": self._lib.memory_call,
            "process_call": self._lib.process_call,
            "process_entry_bytes": self._lib.process_entry_bytes,
            "period_s": self.period_s,
            "max_age_s": self.max_age_s,
            "devices": len(snapshot.devices) if snapshot is not None else None,
            "quarantined": sorted(snapshot.quarantined) if snapshot is not None else [],
            "snapshot_age_s": round(snapshot.age_s(), 6) if snapshot is not None else None,
        }

    def close(self) -> None:
        """Stop the background thread and release NVML (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._lock:
            self._lib.shutdown()
        _live.discard(self)

    def __enter__(self) -> NvmlSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<NvmlSampler {self.implementation} library={self.library!r} "
            f"devices={len(self._info)} period_s={self.period_s}>"
        )


_live: weakref.WeakSet[NvmlSampler] = weakref.WeakSet()
_default: Sampler | None = None
_default_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for sampler in list(_live):
        sampler._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def default_sampler() -> Sampler:
    """This process's sampler: NVML when it is present, else no GPU.

    Made once per process and shared (one background thread however many
    gates). ``GPUGATE_NVML_LIBRARY`` names the library (``none`` turns NVML
    off). Without NVML the result is a :class:`NoGpuSampler`, so every class
    gets its ``no_gpu`` behaviour; that is logged once, with the reason.
    Raises :class:`NvmlError` when NVML is there but unusable (e.g. a driver
    upgraded without a reboot): that must not pass for a host without GPUs.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = _make_default()
        return _default


def _make_default() -> Sampler:
    try:
        return NvmlSampler()
    except NvmlUnavailable as exc:
        log.info(
            "nvml_unavailable",
            error=str(exc),
            note="no-GPU mode: each class's no_gpu behaviour applies",
        )
        return NoGpuSampler()
