"""The gpugate command: the demo, policy commands, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpugate.sim import run_demo
from gpugate.state._server import RedisProcess


def gpugate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "gpugate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class TestDemo:
    """The demo runs on the embedded Redis and ends with an OOM-free summary."""

    def test_demo_on_the_embedded_redis_prints_decisions_and_a_summary(self) -> None:
        result = gpugate("demo", "--seconds", "4")
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "embedded Redis (this host only)" in out
        assert "ADMIT" in out
        assert "DEFER" in out
        assert "PAUSE  batch" in out
        assert "paused" in out
        assert "OOMs: 0" in out
        # The embedded Redis stays up for the host's other processes until stopped.
        assert gpugate("embedded", "status").returncode == 0
        assert gpugate("embedded", "stop").stdout.strip() == "stopped"
        assert gpugate("embedded", "status").returncode == 1

    def test_demo_report_counts_every_class(self, redis_url: str) -> None:
        lines: list[str] = []
        report = run_demo(redis_url=redis_url, seconds=3, workers=4, echo=lines.append)
        assert report.ooms == 0
        assert report.jobs_done["interactive"] > 0
        assert report.jobs_done["batch"] > 0
        assert any(reason == "paused" for (_, _, reason) in report.decisions)
        for dev, peak in report.peak_used.items():
            assert peak <= report.totals[dev]


class TestPolicyCommands:
    """policy check/apply/show, and errors that are one line."""

    def test_check_accepts_a_good_file(self, tmp_path: Path) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text('[classes.batch]\npriority = 10\nrate = "5/s"\n')
        result = gpugate("policy", "check", str(f))
        assert result.returncode == 0
        assert "ok" in result.stdout

    def test_a_bad_file_is_one_line_naming_file_key_and_value(self, tmp_path: Path) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text('[classes.batch]\npriority = 10\nrate = "5/xs"\n')
        result = gpugate("policy", "check", str(f))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert str(f) in lines[0]
        assert "classes.batch.rate" in lines[0]
        assert "5/xs" in lines[0]
        assert "Traceback" not in result.stderr

    def test_apply_then_show_round_trips(
        self, redis_server: RedisProcess, pool_name: str, tmp_path: Path
    ) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text("[classes.batch]\npriority = 10\nmax_concurrent = 2\n")
        target = ("--redis-url", redis_server.url, "--pool", pool_name)
        applied = gpugate(*target, "policy", "apply", str(f))
        assert applied.returncode == 0, applied.stderr
        shown = gpugate(*target, "policy", "show")
        doc = json.loads(shown.stdout)
        assert doc["policy"]["classes"]["batch"]["max_concurrent"] == 2

    @pytest.mark.parametrize("url", ["redis://:s3cret@127.0.0.1:1/0", "nope://x"])
    def test_an_unreachable_or_bad_redis_is_one_line_without_the_password(self, url: str) -> None:
        result = gpugate("--redis-url", url, "policy", "show", timeout=60)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "s3cret" not in result.stderr
        assert "Traceback" not in result.stderr
