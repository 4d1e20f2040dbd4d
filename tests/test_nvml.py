"""The NVML sampler, proven without a GPU against a stand-in libnvidia-ml.so.1.

The stand-in (``tests/nvml_stub/fake_nvml.c``) is compiled by this session
with the C compiler and loaded through ``GPUGATE_NVML_LIBRARY``'s path, so
the real code runs: the Cython twin's dlopen/dlsym calls and nvidia-ml-py's
ctypes calls. Its "hardware" is a state file, re-read on every NVML call.
Old drivers are builds of the stand-in without some symbols. Every test that
samples runs on both twins, ``[c]`` and ``[py]``; ``TestTwinsAgree`` checks
them against each other. ``TestRealGpu`` runs only where NVML finds a GPU.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from gpugate import Gate, NoGpuSampler, Outcome, Policy, _fastpath_py, _speedups
from gpugate.metrics import Metrics, PoolCollector
from gpugate.sampling import (
    GpuProcess,
    NvmlError,
    NvmlSampler,
    NvmlUnavailable,
    Snapshot,
    _nvml,
    default_sampler,
)
from gpugate.sampling._sample import hostname
from gpugate.state._connect import connect
from gpugate.state._inspect import read_pool
from gpugate.state._server import RedisProcess
from gpugate.state._verdict import assess

GiB = 1 << 30
MiB = 1 << 20
STUB_SOURCE = Path(__file__).resolve().parent / "nvml_stub" / "fake_nvml.c"
CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Werror")

_compiled: ModuleType | None
try:
    _compiled = importlib.import_module("gpugate._fastpath")
except ImportError:
    _compiled = None

needs_compiled = pytest.mark.skipif(
    _compiled is None, reason="gpugate._fastpath is not compiled in this install"
)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


# -- the stand-in driver ------------------------------------------------------------


@pytest.fixture(scope="session")
def build_stub(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Compile the stand-in once per set of -D flags; returns its path."""
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler (gcc or cc) to build the stand-in libnvidia-ml.so.1")
    built: dict[tuple[str, ...], str] = {}
    root = tmp_path_factory.mktemp("nvml_stub")

    def build(*defines: str) -> str:
        key = tuple(sorted(defines))
        if key not in built:
            out = root / ("-".join(key) or "base")
            out.mkdir()
            target = out / "libnvidia-ml.so.1"
            flags = [f"-D{d}" for d in key]
            result = subprocess.run(
                [compiler, *CFLAGS, *flags, "-o", str(target), str(STUB_SOURCE), "-lpthread"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, f"building the stand-in failed:\n{result.stderr}"
            built[key] = str(target)
        return built[key]

    return build


def gpu(
    uuid: str,
    total: int = 80 * GiB,
    used: int = 0,
    reserved: int = 0,
    *,
    procs: tuple[tuple[Any, ...], ...] = (),
    migs: tuple[dict[str, Any], ...] = (),
    **fields: Any,
) -> dict[str, Any]:
    """One device line of the state file (with its processes and MIG instances)."""
    return {
        "uuid": uuid,
        "name": "Fake-GPU",
        "total": total,
        "used": used,
        "reserved": reserved,
        "procs": procs,
        "migs": migs,
        **fields,
    }


def mig(
    slot: int, uuid: str, total: int = 10 * GiB, used: int = 0, **fields: Any
) -> dict[str, Any]:
    """One MIG instance of a device."""
    return {
        "slot": slot,
        "uuid": uuid,
        "name": "Fake-MIG",
        "total": total,
        "used": used,
        "procs": (),
        **fields,
    }


def _fields(record: dict[str, Any], skip: tuple[str, ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in record.items() if k not in skip)


def _procs(procs: tuple[tuple[Any, ...], ...]) -> list[str]:
    lines = []
    for p in procs:
        gi, ci = (p[2], p[3]) if len(p) > 2 else (0xFFFFFFFF, 0xFFFFFFFF)
        used = "na" if p[1] is None else p[1]
        lines.append(f"proc pid={p[0]} used={used} gi={gi} ci={ci}")
    return lines


class FakeNvml:
    """The stand-in's state file (what the "hardware" looks like) and call counters."""

    def __init__(self, state: Path) -> None:
        self.state = state

    def set(self, *devices: dict[str, Any], **globals_: Any) -> None:
        """Replace the state: ``devices`` (see :func:`gpu`), and globals such as
        ``driver="535.54.03"``, ``entry_bytes=32``, ``init_rc=9``."""
        lines = [f"{k} {v}" for k, v in {"driver": "550.54.15", **globals_}.items()]
        for d in devices:
            lines.append("device " + _fields(d, ("procs", "migs")))
            lines += _procs(d["procs"])
            for m in d["migs"]:
                lines.append(f"mig slot={m['slot']} " + _fields(m, ("slot", "procs")))
                lines += _procs(m["procs"])
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.state)  # the stand-in never reads half a file

    @staticmethod
    def calls(library: str, name: str) -> int:
        """How often this process called ``name`` in the stand-in at ``library``."""
        fn = ctypes.CDLL(library).fakeNvmlCalls
        fn.restype = ctypes.c_ulong
        return int(fn(name.encode()))


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """An empty-handed driver (no devices) whose state this test writes."""
    state = tmp_path / "nvml-state.txt"
    monkeypatch.setenv("FAKE_NVML_STATE", str(state))
    monkeypatch.delenv("FAKE_NVML_STATIC", raising=False)
    f = FakeNvml(state)
    f.set()
    return f


@pytest.fixture
def stub(build_stub: Callable[..., str]) -> str:
    """The stand-in of a current driver (every call present)."""
    return build_stub()


class Clock:
    """An injectable monotonic clock: tests move time instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(
    params=[pytest.param("cython", id="c", marks=needs_compiled), pytest.param("python", id="py")]
)
def impl(request: pytest.FixtureRequest) -> str:
    """Each twin in turn: the compiled one (``[c]``) and nvidia-ml-py (``[py]``)."""
    return str(request.param)


def _module(implementation: str) -> ModuleType:
    if implementation == "cython":
        assert _compiled is not None
        return _compiled
    return _fastpath_py


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_sampler(
    impl: str, stub: str, fake: FakeNvml, clock: Clock
) -> Iterator[Callable[..., NvmlSampler]]:
    """NvmlSamplers on the stand-in (no background thread unless asked); closed after."""
    made: list[NvmlSampler] = []

    def make(library: str | None = None, **kw: Any) -> NvmlSampler:
        kw.setdefault("background", False)
        kw.setdefault("metrics", Metrics(CollectorRegistry()))
        if not kw.get("background"):
            kw.setdefault("_clock", clock)
        s = NvmlSampler(library or stub, implementation=impl, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def only(snapshot: Snapshot) -> Any:
    (device,) = snapshot.devices
    return device


# -- the tests ------------------------------------------------------------------------


class TestMemory:
    """Memory comes from nvmlDeviceGetMemoryInfo_v2; v1 only on drivers without it."""

    def test_v2_reports_used_without_the_driver_reserved_memory(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", total=80 * GiB, used=10 * GiB, reserved=480 * MiB))
        d = only(make_sampler().sample())
        assert (d.uuid, d.index, d.used, d.reserved) == ("GPU-a", 0, 10 * GiB, 480 * MiB)
        # What processes can use: the reserved memory is nobody's to take.
        assert d.total == 80 * GiB - 480 * MiB
        assert d.free == 80 * GiB - 480 * MiB - 10 * GiB

    def test_the_struct_version_is_sizeof_with_version_2(
        self, fake: FakeNvml, stub: str, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        # The stand-in refuses any other version with ARGUMENT_VERSION_MISMATCH.
        fake.set(gpu("GPU-a", used=1 * GiB, reserved=1 * MiB))
        s = make_sampler()
        assert only(s.sample()).reserved == 1 * MiB
        assert s.describe()["memory_call"] == "nvmlDeviceGetMemoryInfo_v2"
        assert FakeNvml.calls(stub, "nvmlDeviceGetMemoryInfo") == 0

    def test_a_driver_without_v2_falls_back_to_v1_which_counts_reserved_as_used(
        self,
        fake: FakeNvml,
        build_stub: Callable[..., str],
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a", total=80 * GiB, used=10 * GiB, reserved=480 * MiB))
        s = make_sampler(build_stub("NO_MEMORY_V2"))
        d = only(s.sample())
        assert s.describe()["memory_call"] == "nvmlDeviceGetMemoryInfo"
        assert (d.total, d.used, d.reserved) == (80 * GiB, 10 * GiB + 480 * MiB, None)
        assert d.free == 80 * GiB - 10 * GiB - 480 * MiB

    @pytest.mark.parametrize(
        "code",
        [3, 13, 25],
        ids=["not_supported", "function_not_found", "argument_version_mismatch"],
    )
    def test_v2_refused_at_run_time_falls_back_to_v1(
        self, code: int, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", used=2 * GiB, reserved=1 * GiB, memory_rc=code))
        d = only(make_sampler().sample())
        assert (d.used, d.reserved) == (3 * GiB, None)


class TestUtilization:
    """Utilisation is a fraction, or None when unknown: never 0 for unknown."""

    def test_percentages_become_fractions(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", util_gpu=37, util_mem=5))
        d = only(make_sampler().sample())
        assert (d.utilization, d.memory_utilization) == (0.37, 0.05)

    @pytest.mark.parametrize("code", [3, 4, 999], ids=["not_supported", "no_permission", "unknown"])
    def test_an_error_is_unknown_and_the_device_stays_usable(
        self, code: int, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", used=1 * GiB, util_gpu=50, util_rc=code))
        d = only(make_sampler().sample())
        assert (d.utilization, d.memory_utilization, d.used) == (None, None, 1 * GiB)

    def test_a_driver_without_the_call_gives_unknown(
        self,
        fake: FakeNvml,
        build_stub: Callable[..., str],
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a", util_gpu=50))
        assert only(make_sampler(build_stub("NO_UTILIZATION")).sample()).utilization is None

    def test_only_real_errors_are_counted(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        registry = CollectorRegistry()
        fake.set(gpu("GPU-a", util_rc=3), gpu("GPU-b", util_rc=999))
        make_sampler(metrics=Metrics(registry)).sample()
        count = registry.get_sample_value
        assert count("gpugate_nvml_errors_total", {"call": "nvmlDeviceGetUtilizationRates"}) == 1


class TestProcesses:
    """The compute process list: _v3, its entry layout from the driver, a growing buffer."""

    def test_processes_and_unknown_sizes(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", procs=((100, 612 * MiB), (101, None))))
        procs = only(make_sampler().sample()).processes
        assert [(p.pid, p.used) for p in procs] == [(100, 612 * MiB), (101, None)]

    def test_no_process_is_an_empty_list_not_unknown(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a"))
        assert only(make_sampler().sample()).processes == ()

    @pytest.mark.parametrize(
        ("driver", "entry_bytes"),
        [
            ("550.54.15", 24),
            ("535.43.02", 32),
            ("535.54.03", 32),
            ("535.86.10", 32),
            ("535.98", 24),
            ("535.104.05", 24),
            ("470.82.01", 24),
        ],
    )
    def test_the_entry_layout_follows_the_running_driver(
        self,
        driver: str,
        entry_bytes: int,
        fake: FakeNvml,
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        # The stand-in writes the layout the driver would; a wrong guess
        # reads garbage pids and sizes from the second entry on.
        fake.set(
            gpu("GPU-a", procs=((7, 1 * GiB, 1, 2), (8, 2 * GiB, 3, 4))),
            driver=driver,
            entry_bytes=entry_bytes,
        )
        s = make_sampler()
        assert s.describe()["process_entry_bytes"] == entry_bytes
        procs = only(s.sample()).processes
        assert [(p.pid, p.used) for p in procs] == [(7, 1 * GiB), (8, 2 * GiB)]

    def test_an_unreadable_driver_version_uses_the_symbol_heuristic(
        self,
        fake: FakeNvml,
        build_stub: Callable[..., str],
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a", procs=((7, 1 * GiB), (8, 2 * GiB))), driver_rc=999, entry_bytes=32)
        s = make_sampler(build_stub("CONF_COMPUTE"))
        assert s.describe()["process_entry_bytes"] == 32
        assert [p.pid for p in only(s.sample()).processes] == [7, 8]

    def test_process_entry_bytes_rule(self, impl: str) -> None:
        rule = _module(impl).process_entry_bytes
        assert rule("535.54.03", False, False) == 32
        assert rule("535.104.05", True, False) == 24
        assert rule("garbage", True, False) == 32
        assert rule("", True, True) == 24
        assert rule("", False, False) == 24

    @pytest.mark.parametrize(
        ("defines", "call"),
        [
            (("NO_PROCS_V3",), "nvmlDeviceGetComputeRunningProcesses_v2"),
            (("NO_PROCS_V3", "NO_PROCS_V2"), "nvmlDeviceGetComputeRunningProcesses"),
        ],
    )
    def test_old_drivers_fall_back_to_older_calls(
        self,
        defines: tuple[str, ...],
        call: str,
        fake: FakeNvml,
        build_stub: Callable[..., str],
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a", procs=((7, 1 * GiB), (8, 2 * GiB))))
        s = make_sampler(build_stub(*defines))
        assert s.describe()["process_call"] == call
        assert [(p.pid, p.used) for p in only(s.sample()).processes] == [(7, 1 * GiB), (8, 2 * GiB)]

    def test_the_buffer_grows_on_insufficient_size_and_is_kept(
        self, fake: FakeNvml, stub: str, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        call = "nvmlDeviceGetComputeRunningProcesses_v3"
        fake.set(gpu("GPU-a", procs=tuple((1000 + i, i * MiB) for i in range(200))))
        s = make_sampler()
        before = FakeNvml.calls(stub, call)
        assert [p.pid for p in only(s.refresh()).processes] == list(range(1000, 1200))
        assert FakeNvml.calls(stub, call) - before == 2  # too small once, then fits
        assert len(only(s.refresh()).processes) == 200
        assert FakeNvml.calls(stub, call) - before == 3  # the grown buffer is kept
        fake.set(gpu("GPU-a", procs=tuple((i, 0) for i in range(1, 2001))))
        assert len(only(s.refresh()).processes) == 2000

    def test_a_list_that_never_fits_gives_up_as_unknown(
        self, fake: FakeNvml, stub: str, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", used=1 * GiB, proc_rc=7))
        s = make_sampler()
        before = FakeNvml.calls(stub, "nvmlDeviceGetComputeRunningProcesses_v3")
        d = only(s.refresh())
        assert (d.processes, d.used) == (None, 1 * GiB)
        assert FakeNvml.calls(stub, "nvmlDeviceGetComputeRunningProcesses_v3") - before == 5

    def test_no_permission_is_unknown_and_the_device_stays_usable(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", used=1 * GiB, proc_rc=4))
        d = only(make_sampler().sample())
        assert (d.processes, d.used) == (None, 1 * GiB)

    def test_processes_can_be_left_out(
        self, fake: FakeNvml, stub: str, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", procs=((1, 1),)))
        before = FakeNvml.calls(stub, "nvmlDeviceGetComputeRunningProcesses_v3")
        assert only(make_sampler(processes=False).sample()).processes is None
        assert FakeNvml.calls(stub, "nvmlDeviceGetComputeRunningProcesses_v3") == before


class TestQuarantine:
    """GPU_IS_LOST and RESET_REQUIRED quarantine one device; the others carry on."""

    @pytest.mark.parametrize(
        ("state", "error"),
        [
            ({"lost": 1}, "GPU_IS_LOST"),
            ({"memory_rc": 15}, "GPU_IS_LOST"),
            ({"memory_rc": 16}, "RESET_REQUIRED"),
            ({"util_rc": 15}, "GPU_IS_LOST"),
            ({"proc_rc": 15}, "GPU_IS_LOST"),
        ],
    )
    def test_a_lost_device_is_quarantined_and_the_others_stay(
        self,
        state: dict[str, int],
        error: str,
        fake: FakeNvml,
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        s = make_sampler()
        s.refresh()
        fake.set(gpu("GPU-a", **state), gpu("GPU-b"))
        snap = s.refresh()
        assert [d.uuid for d in snap.devices] == ["GPU-b"]
        assert snap.quarantined == {"GPU-a"}
        (fault,) = snap.faults
        assert (fault.index, fault.error, fault.quarantined) == (0, error, True)
        assert fault.total == 80 * GiB  # as it last answered: a request it could hold waits

    def test_a_lost_device_is_logged_once_as_quarantined(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        s = make_sampler()
        s.refresh()
        fake.set(gpu("GPU-a", lost=1), gpu("GPU-b"))
        with capture_logs() as logs:
            s.refresh()
            s.refresh()
        events = [(e["event"], e.get("uuid")) for e in logs if e["log_level"] != "debug"]
        # Every call on the lost device fails; it is one event, not one per call.
        assert ("gpu_quarantined", "GPU-a") in events
        assert [e for e in events if e[1] == "GPU-a"] == [("gpu_quarantined", "GPU-a")]

    def test_quarantine_holds_until_the_device_answered_for_quarantine_s(
        self, fake: FakeNvml, clock: Clock, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", memory_rc=15), gpu("GPU-b"))
        s = make_sampler(quarantine_s=30.0, max_age_s=0.5)
        assert s.refresh().quarantined == {"GPU-a"}
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        clock.advance(29.0)
        assert s.refresh().quarantined == {"GPU-a"}
        clock.advance(1.0)
        snap = s.refresh()
        assert (snap.quarantined, [d.uuid for d in snap.devices]) == (set(), ["GPU-a", "GPU-b"])

    def test_a_gpu_lost_before_discovery_is_quarantined_under_an_id_from_its_index(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        # Given a GPU whose handle and uuid answer GPU_IS_LOST from the start,
        fake.set(gpu("GPU-a", lost=1), gpu("GPU-b"))
        with capture_logs() as logs:
            s = make_sampler()
            s.refresh()
            snap = s.refresh()
        # then it is quarantined under the stand-in id of its host and index,
        stand_in = f"LOST-gpu0@{hostname()}"
        assert [d.uuid for d in snap.devices] == ["GPU-b"]
        (fault,) = snap.faults
        assert (fault.uuid, fault.index, fault.error, fault.quarantined) == (
            stand_in,
            0,
            "GPU_IS_LOST",
            True,
        )
        assert fault.total is None  # never seen: its size is unknown
        assert snap.quarantined == {stand_in}
        assert s.describe()["quarantined"] == [stand_in]
        # and logged once, like a GPU lost later.
        quarantined = [e for e in logs if e["event"] == "gpu_quarantined"]
        assert [(e["uuid"], e["index"]) for e in quarantined] == [(stand_in, 0)]

    def test_a_gpu_lost_before_discovery_stays_quarantined_once_it_answers(
        self, fake: FakeNvml, clock: Clock, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", lost=1), gpu("GPU-b"))
        s = make_sampler(quarantine_s=30.0, rediscover_s=1.0)
        s.refresh()
        # When it answers again with its uuid, its quarantine carries over to it
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        clock.advance(1.0)
        snap = s.refresh()
        assert snap.quarantined == {"GPU-a"}
        assert [d.uuid for d in snap.devices] == ["GPU-b"]
        # and lifts once it has answered for quarantine_s.
        clock.advance(29.0)
        assert s.refresh().quarantined == set()

    def test_a_gpu_lost_before_discovery_shows_in_status_and_metrics(
        self,
        fake: FakeNvml,
        redis_server: RedisProcess,
        pool_name: str,
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a", lost=1), gpu("GPU-b"))
        sampler = make_sampler(background=True)
        stand_in = f"LOST-gpu0@{hostname()}"
        policy = Policy.from_dict({"classes": {"batch": {"priority": 10}}})
        with Gate(redis_server.url, pool=pool_name, policy=policy, sampler=sampler) as gate:
            pinned = gate.try_admit("batch", vram=1 * GiB, device=stand_in)
            gate.beat_now()  # publishes the host's snapshot
            client = connect(redis_server.url)
            try:
                view = read_pool(client, pool_name)
                registry = CollectorRegistry()
                registry.register(PoolCollector(client, pool_name))
                quarantined = {
                    s.labels["device"]: s.value
                    for family in registry.collect()
                    if family.name == "gpugate_gpu_quarantined"
                    for s in family.samples
                }
            finally:
                client.close()
        assert (pinned.outcome, pinned.reason) == (Outcome.DEFER, "gpu_lost")
        assert {d.uuid: d.quarantined for d in view.devices} == {"GPU-b": False, stand_in: True}
        verdict = assess(view)
        assert verdict.level == "DEGRADED"
        assert f"GPU {stand_in} lost (quarantined)" in verdict.line
        assert quarantined == {"GPU-b": 0, stand_in: 1}

    def test_a_gpu_lost_between_discoveries_keeps_its_uuid(
        self, fake: FakeNvml, clock: Clock, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        s = make_sampler(rediscover_s=10.0)
        s.refresh()
        fake.set(gpu("GPU-a", handle_rc=15), gpu("GPU-b"))
        clock.advance(10.0)  # the next refresh enumerates again
        snap = s.refresh()
        assert snap.quarantined == {"GPU-a"}
        assert [d.uuid for d in snap.devices] == ["GPU-b"]

    def test_the_gate_never_admits_on_a_quarantined_device(
        self,
        fake: FakeNvml,
        redis_server: RedisProcess,
        pool_name: str,
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a", used=0), gpu("GPU-b", used=70 * GiB, lost=1))
        sampler = make_sampler(background=True)
        policy = Policy.from_dict(
            {"pool": {"safety_margin": 0}, "classes": {"batch": {"priority": 10}}}
        )
        with Gate(redis_server.url, pool=pool_name, policy=policy, sampler=sampler) as gate:
            first = gate.try_admit("batch", vram=60 * GiB)
            second = gate.try_admit("batch", vram=30 * GiB)
        assert (first.outcome, first.device_uuid) == (Outcome.ADMIT, "GPU-a")
        assert (second.outcome, second.reason) == (Outcome.DEFER, "vram")

    def test_a_request_pinned_to_a_quarantined_device_waits(
        self,
        fake: FakeNvml,
        redis_server: RedisProcess,
        pool_name: str,
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        sampler = make_sampler(background=True)
        fake.set(gpu("GPU-a"), gpu("GPU-b", lost=1))
        sampler.refresh()
        policy = Policy.from_dict(
            {"pool": {"safety_margin": 0}, "classes": {"batch": {"priority": 10}}}
        )
        with Gate(redis_server.url, pool=pool_name, policy=policy, sampler=sampler) as gate:
            d = gate.try_admit("batch", vram=1 * GiB, device="GPU-b")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "gpu_lost")


class TestIdleMemory:
    """A gate on the stand-in finds its own pid in NVML's process list: what it
    holds idle above its warm baseline fragments the device."""

    def test_cache_kept_after_a_job_counts_until_emptied(
        self,
        fake: FakeNvml,
        redis_server: RedisProcess,
        pool_name: str,
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        import redis

        from gpugate.state._keys import PoolKeys

        # The gate stands for a pid of its own: every gate of a process counts
        # the process busy while any of them holds a lease, and gates other
        # tests left open in this process may hold some.
        me = 4_000_000 + os.getpid() % 1_000_000
        uuid = f"GPU-{pool_name}"  # this process's warm baseline is kept per device
        fake.set(gpu(uuid, used=10 * GiB, procs=((me, 10 * GiB), (1, 5 * GiB))))
        sampler = make_sampler(background=True)
        policy = Policy.from_dict(
            {
                "pool": {"safety_margin": 0},
                "classes": {
                    "interactive": {"priority": 100},
                    "batch": {"priority": 10, "max_fragmentation": 0.1},
                },
            }
        )
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        with Gate(
            redis_server.url, pool=pool_name, policy=policy, sampler=sampler, _gpu_pid=me
        ) as gate:
            job = gate.try_admit("interactive", vram=20 * GiB)  # warm at 10 GiB
            assert job.lease is not None
            job.lease.release()
            fake.set(gpu(uuid, used=25 * GiB, procs=((me, 25 * GiB), (1, 5 * GiB))))
            sampler.refresh()
            gate.beat_now()
            assert gate.idle_memory == {uuid: 15 * GiB}
            memory = client.hget(PoolKeys(pool_name).state, f"m:{uuid}") or ""
            assert int(memory.split()[3]) == 15 * GiB
            assert gate.try_admit("batch", vram=1 * GiB).reason == "fragmented"
            fake.set(gpu(uuid, used=10 * GiB, procs=((me, 10 * GiB), (1, 5 * GiB))))
            sampler.refresh()
            gate.beat_now()
            assert gate.idle_memory == {}
            assert gate.try_admit("batch", vram=1 * GiB).outcome is Outcome.ADMIT
        client.close()


class TestTransientErrors:
    """Any other error on one device: its last reading, with its own age, for max_age_s."""

    def test_the_last_good_reading_stands_in_with_its_own_time(
        self, fake: FakeNvml, clock: Clock, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", used=1 * GiB), gpu("GPU-b", used=2 * GiB))
        s = make_sampler(max_age_s=1.0)
        first = s.refresh()
        clock.advance(0.5)
        fake.set(gpu("GPU-a", used=5 * GiB, memory_rc=999), gpu("GPU-b", used=3 * GiB))
        snap = s.refresh()
        a, b = snap.devices
        assert (a.used, a.taken_mono, b.used, b.taken_mono) == (
            1 * GiB,
            first.taken_mono,
            3 * GiB,
            clock.now,
        )
        # The snapshot is as old as its oldest reading: the gate errs on the safe side.
        assert snap.taken_mono == first.taken_mono
        assert snap.faults == ()

    def test_past_max_age_the_device_drops_out_unquarantined_and_returns(
        self, fake: FakeNvml, clock: Clock, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        s = make_sampler(max_age_s=1.0)
        s.refresh()
        fake.set(gpu("GPU-a", memory_rc=999), gpu("GPU-b"))
        clock.advance(1.5)
        snap = s.refresh()
        assert [d.uuid for d in snap.devices] == ["GPU-b"]
        (fault,) = snap.faults
        assert (fault.uuid, fault.error, fault.quarantined) == ("GPU-a", "UNKNOWN", False)
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        assert [d.uuid for d in s.refresh().devices] == ["GPU-a", "GPU-b"]

    def test_a_failed_device_count_is_retried_and_readings_stand_in(
        self, fake: FakeNvml, clock: Clock, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", used=1 * GiB))
        s = make_sampler(max_age_s=1.0, rediscover_s=0.5)
        first = s.refresh()
        fake.set(gpu("GPU-a", used=2 * GiB), count_rc=999)
        clock.advance(0.6)  # the next refresh enumerates again, and fails
        kept = s.refresh()
        assert (only(kept).used, kept.taken_mono) == (1 * GiB, first.taken_mono)
        clock.advance(0.5)
        assert s.refresh().devices == ()  # 1.1 s old: past max_age_s
        fake.set(gpu("GPU-a", used=2 * GiB))
        assert only(s.refresh()).used == 2 * GiB  # enumerated again at once

    def test_a_vanished_handle_triggers_discovery_at_once(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", mig=1, migs=(mig(0, "MIG-0"), mig(1, "MIG-1"))))
        s = make_sampler(rediscover_s=3600.0)
        assert [d.uuid for d in s.refresh().devices] == ["MIG-0", "MIG-1"]
        fake.set(gpu("GPU-a", mig=1, migs=(mig(0, "MIG-0"),)))  # instance 1 destroyed
        snap = s.refresh()
        assert [(f.uuid, f.error) for f in snap.faults] == [("MIG-1", "INVALID_ARGUMENT")]
        snap = s.refresh()
        assert ([d.uuid for d in snap.devices], snap.faults) == (["MIG-0"], ())


class TestMig:
    """MIG instances are devices of their own; their GPU is not."""

    def test_instances_replace_their_gpu(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(
            gpu("GPU-a", used=1 * GiB, mig=0),
            gpu(
                "GPU-b",
                total=40 * GiB,
                mig=1,
                migs=(
                    mig(0, "MIG-b0", total=20 * GiB, used=3 * GiB, procs=((9, 3 * GiB, 1, 0),)),
                    mig(3, "MIG-b3", total=5 * GiB),
                ),
            ),
        )
        snap = make_sampler().sample()
        rows = [
            (d.uuid, d.index, d.mig_index, d.parent_uuid, d.total, d.used, d.utilization)
            for d in snap.devices
        ]
        assert rows == [
            ("GPU-a", 0, None, "", 80 * GiB, 1 * GiB, 0.0),
            ("MIG-b0", 1, 0, "GPU-b", 20 * GiB, 3 * GiB, None),
            ("MIG-b3", 1, 3, "GPU-b", 5 * GiB, 0, None),
        ]
        assert snap.devices[1].processes == (GpuProcess(9, 3 * GiB, 1, 0),)

    def test_a_driver_without_mig_calls_sees_whole_gpus(
        self,
        fake: FakeNvml,
        build_stub: Callable[..., str],
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        fake.set(gpu("GPU-a", mig=0))
        assert [d.uuid for d in make_sampler(build_stub("NO_MIG")).sample().devices] == ["GPU-a"]


class TestInitialisation:
    """NVML is initialised once per process; no library or driver means no GPU."""

    def test_init_once_and_handles_cached_across_samples(
        self, fake: FakeNvml, stub: str, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a"), gpu("GPU-b"))
        inits = FakeNvml.calls(stub, "nvmlInitWithFlags")
        handles = FakeNvml.calls(stub, "nvmlDeviceGetHandleByIndex_v2")
        s = make_sampler()
        for _ in range(20):
            s.refresh()
        assert FakeNvml.calls(stub, "nvmlInitWithFlags") - inits == 1
        assert FakeNvml.calls(stub, "nvmlDeviceGetHandleByIndex_v2") - handles == 2

    def test_a_driver_without_init_with_flags_uses_init_v2(
        self,
        fake: FakeNvml,
        build_stub: Callable[..., str],
        make_sampler: Callable[..., NvmlSampler],
    ) -> None:
        library = build_stub("NO_INIT_WITH_FLAGS")
        fake.set(gpu("GPU-a"))
        before = FakeNvml.calls(library, "nvmlInit_v2")
        assert [d.uuid for d in make_sampler(library).sample().devices] == ["GPU-a"]
        assert FakeNvml.calls(library, "nvmlInit_v2") - before == 1

    def test_a_missing_library_is_unavailable(
        self, tmp_path: Path, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        with pytest.raises(NvmlUnavailable, match="cannot load") as caught:
            make_sampler(str(tmp_path / "libnvidia-ml.so.1"))
        assert caught.value.code == 12

    def test_a_missing_driver_is_unavailable(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(init_rc=9)
        with pytest.raises(NvmlUnavailable, match="DRIVER_NOT_LOADED") as caught:
            make_sampler()
        assert caught.value.code == 9

    def test_a_driver_upgraded_without_reboot_is_loud(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(init_rc=18)
        with pytest.raises(NvmlError, match="reboot") as caught:
            make_sampler()
        assert not isinstance(caught.value, NvmlUnavailable)

    def test_a_forked_child_initialises_again(self, fake: FakeNvml, stub: str, impl: str) -> None:
        fake.set(gpu("GPU-a", used=1 * GiB))
        script = textwrap.dedent(f"""
            import ctypes, os, sys
            from gpugate.sampling import NvmlSampler
            calls = ctypes.CDLL({stub!r}).fakeNvmlCalls
            s = NvmlSampler({stub!r}, implementation={impl!r}, background=False)
            assert s.sample().devices[0].used == 1 << 30
            pid = os.fork()
            if pid == 0:
                ok = s.refresh().devices[0].used == 1 << 30 and calls(b"nvmlInitWithFlags") == 2
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
        """)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


class TestFreshness:
    """Decisions read the snapshot; it is refreshed by a thread, or when too old."""

    def test_a_fresh_snapshot_costs_no_nvml_call(
        self, fake: FakeNvml, stub: str, clock: Clock, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", used=1 * GiB))
        s = make_sampler(max_age_s=0.5)
        first = s.sample()
        before = FakeNvml.calls(stub, "nvmlDeviceGetMemoryInfo_v2")
        clock.advance(0.5)
        assert s.sample() is first
        assert FakeNvml.calls(stub, "nvmlDeviceGetMemoryInfo_v2") == before
        clock.advance(0.01)
        assert s.sample() is not first
        assert s.sample(max_age_s=0.0) is not first

    def test_the_background_thread_keeps_it_fresh(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        fake.set(gpu("GPU-a", used=1 * GiB))
        s = make_sampler(background=True, period_s=0.01, max_age_s=3600.0)
        assert only(s.sample()).used == 1 * GiB
        fake.set(gpu("GPU-a", used=2 * GiB))
        deadline = time.monotonic() + 10
        while only(s.sample()).used != 2 * GiB:
            assert time.monotonic() < deadline, "the background thread never refreshed"
            time.sleep(0.005)
        assert any(t.name == "gpugate-sampler" for t in threading.enumerate())

    def test_sampling_releases_the_gil(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        # The stand-in's memory call waits until the state file lets it go;
        # only this thread, running Python, can write that.
        fake.set(gpu("GPU-a", used=1 * GiB))
        s = make_sampler()
        fake.set(gpu("GPU-a", used=1 * GiB), block_memory=1)
        result: list[Snapshot] = []
        worker = threading.Thread(target=lambda: result.append(s.refresh()))
        worker.start()
        fake.set(gpu("GPU-a", used=1 * GiB), block_memory=0)
        worker.join(timeout=30)
        assert only(result[0]).used == 1 * GiB  # not a TIMEOUT from the stand-in

    def test_a_closed_sampler_refuses(
        self, fake: FakeNvml, make_sampler: Callable[..., NvmlSampler]
    ) -> None:
        s = make_sampler()
        s.close()
        with pytest.raises(Exception, match="closed"):
            s.sample()


class TestDefaultSampler:
    """default_sampler(): NVML when present, else no GPU (each class's no_gpu policy)."""

    @pytest.fixture(autouse=True)
    def _fresh_default(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Each test makes its own default sampler; the process's is put back after."""
        monkeypatch.setattr(_nvml, "_default", None)
        yield
        if isinstance(_nvml._default, NvmlSampler):
            _nvml._default.close()

    def test_the_library_named_by_the_environment_is_used(
        self, fake: FakeNvml, stub: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake.set(gpu("GPU-a"))
        monkeypatch.setenv("GPUGATE_NVML_LIBRARY", stub)
        s = default_sampler()
        assert isinstance(s, NvmlSampler)
        assert s is default_sampler()
        assert s.describe()["implementation"] == _speedups.IMPLEMENTATION
        assert [d.uuid for d in s.sample().devices] == ["GPU-a"]

    @pytest.mark.parametrize("value", ["none", "NONE", "/nonexistent/libnvidia-ml.so.1"])
    def test_no_library_means_no_gpu(self, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPUGATE_NVML_LIBRARY", value)
        s = default_sampler()
        assert isinstance(s, NoGpuSampler)
        assert s.sample().devices == ()

    def test_an_unusable_driver_is_not_mistaken_for_no_gpu(
        self, fake: FakeNvml, stub: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake.set(init_rc=18)
        monkeypatch.setenv("GPUGATE_NVML_LIBRARY", stub)
        with pytest.raises(NvmlError):
            default_sampler()


# -- C and Python twins agree ----------------------------------------------------------

_codes = st.sampled_from([0, 0, 0, 0, 3, 4, 13, 15, 25, 999])
_procs_st = st.lists(
    st.tuples(
        st.integers(1, 1 << 22),
        st.one_of(st.none(), st.integers(0, 1 << 40)),
        st.integers(0, 7),
        st.integers(0, 7),
    ),
    max_size=80,
)


@st.composite
def _devices(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 4))
    devices = []
    for i in range(n):
        total = draw(st.integers(1 << 30, 1 << 37))
        fields = {
            "used": draw(st.integers(0, total)),
            "reserved": draw(st.integers(0, 1 << 30)),
            "util_gpu": draw(st.integers(0, 100)),
            "util_mem": draw(st.integers(0, 100)),
            "memory_rc": draw(_codes),
            "util_rc": draw(_codes),
            "proc_rc": draw(st.sampled_from([0, 0, 4, 7])),
            "lost": draw(st.sampled_from([0, 0, 0, 1])),
        }
        migs: tuple[dict[str, Any], ...] = ()
        if draw(st.booleans()):
            fields["mig"] = 1
            slots = draw(st.sets(st.integers(0, 6), max_size=3))
            migs = tuple(
                mig(
                    j,
                    f"MIG-{i}-{j}",
                    used=draw(st.integers(0, 1 << 33)),
                    procs=tuple(draw(_procs_st)[:5]),
                )
                for j in sorted(slots)
            )
        devices.append(gpu(f"GPU-{i}", total, procs=tuple(draw(_procs_st)), migs=migs, **fields))
    driver, entry_bytes = draw(st.sampled_from([("550.54.15", 24), ("535.54.03", 32)]))
    return {"devices": devices, "driver": driver, "entry_bytes": entry_bytes}


@needs_compiled
class TestTwinsAgree:
    """The compiled NvmlLibrary and its nvidia-ml-py twin return the same for every state."""

    def test_both_define_the_same_names(self) -> None:
        assert _compiled is not None
        assert set(_compiled.__all__) == set(_fastpath_py.__all__)
        public = {n for n in dir(_fastpath_py.NvmlLibrary) if not n.startswith("_")}
        assert public <= set(dir(_compiled.NvmlLibrary))

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(state=_devices(), processes=st.booleans())
    def test_discovery_and_samples(
        self, state: dict[str, Any], processes: bool, fake: FakeNvml, stub: str
    ) -> None:
        assert _compiled is not None
        fake.set(*state["devices"], driver=state["driver"], entry_bytes=state["entry_bytes"])
        results = []
        for module in (_compiled, _fastpath_py):
            lib = module.NvmlLibrary(stub)
            assert lib.init() == 0
            try:
                found = lib.discover()
                layout = (
                    lib.driver_version,
                    lib.memory_call,
                    lib.process_call,
                    lib.process_entry_bytes,
                )
                results.append((layout, found, lib.sample(processes)))
            finally:
                lib.shutdown()
        assert results[0] == results[1]


# -- a real GPU --------------------------------------------------------------------------


def _real_nvml() -> Any:
    """An initialised NvmlLibrary on this host's driver, or None without a GPU."""
    try:
        lib = _speedups.NvmlLibrary()
    except OSError:
        return None
    if lib.init() != 0:
        return None
    rc, found = lib.discover()
    if rc != 0 or not found:
        lib.shutdown()
        return None
    return lib


@pytest.mark.gpu
class TestRealGpu:
    """On a host with an NVIDIA GPU: the same answers from the real driver."""

    @pytest.fixture
    def real(self) -> Iterator[Any]:
        lib = _real_nvml()
        if lib is None:
            pytest.skip("no NVIDIA GPU here: libnvidia-ml.so.1 does not load or sees no device")
        yield lib
        lib.shutdown()

    def test_v2_memory_adds_up_to_the_total(self, real: Any) -> None:
        for record in real.sample():
            _, memory_rc, version, total, reserved, used, free, *_ = record
            assert (memory_rc, version) == (0, 2)
            assert used + free + reserved == pytest.approx(total, rel=0.01)

    def test_the_sampler_sees_every_device(self, real: Any) -> None:
        with NvmlSampler(
            "libnvidia-ml.so.1", background=False, metrics=Metrics(CollectorRegistry())
        ) as s:
            snap = s.sample()
        _, found = real.discover()
        assert {d.uuid for d in snap.devices} == {f[2] for f in found if f[5] == 0}
        assert all(d.total > 0 and 0 <= d.used <= d.total for d in snap.devices)

    @needs_compiled
    def test_twins_agree_on_devices_and_totals(self, real: Any) -> None:
        assert _compiled is not None
        views = []
        for module in (_compiled, _fastpath_py):
            lib = module.NvmlLibrary()
            lib.init()
            _, found = lib.discover()
            views.append((found, [(r[0], r[3]) for r in lib.sample(False)]))
            lib.shutdown()
        assert views[0] == views[1]
