"""The gpugate command: the demo, policy commands, and one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpugate.sim import run_demo
from gpugate.state._server import RedisProcess


def gpugate(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**(os.environ if env is None else env), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "gpugate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def gpugate_into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run gpugate with its stdout a pipe whose reader has gone (`gpugate … | head -1`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "gpugate", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    finally:
        os.close(write_end)


class TestDemo:
    """The demo runs on the embedded Redis and ends with an OOM-free summary."""

    def test_demo_on_the_embedded_redis_prints_decisions_and_a_summary(self) -> None:
        result = gpugate("demo", "--seconds", "4")
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "embedded Redis (this host only)" in out
        assert "DEFER" in out
        assert "PAUSE  batch" in out
        assert "paused" in out
        assert "RESUME batch: its pause expired" in out  # it reverted by itself, in the run
        assert "OOMs: 0" in out
        # Plain admits are not printed: an ADMIT line (a run this short may have
        # none) is one that waited first.
        admits = [line for line in out.splitlines() if " ADMIT " in line]
        assert all("after waiting" in line for line in admits), admits
        assert "jobs done" in out
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

    @pytest.mark.parametrize(("option", "value"), [("--workers", "0"), ("--seconds", "0s")])
    def test_a_demo_that_would_do_nothing_is_refused(self, option: str, value: str) -> None:
        result = gpugate("demo", option, value)
        assert result.returncode == 2
        assert result.stderr.startswith("gpugate demo: error:")
        assert value in result.stderr

    def test_demo_into_a_reader_that_stops_early_ends_quietly(self) -> None:
        # `gpugate demo | head -2`: the reader goes while the workers still print.
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpugate", "demo", "--seconds", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        for _ in range(2):
            proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.wait(60) == 141, err
        assert "Traceback" not in err, err

    def test_demo_on_a_redis_that_is_not_there_is_one_line(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
        env = {**os.environ, "GPUGATE_REDIS_URL": url}
        result = gpugate("demo", "--seconds", "2", env=env)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("gpugate:")]
        assert len(lines) == 1, result.stderr
        assert "unreachable" in lines[0]
        assert "Traceback" not in result.stderr


class TestPolicyCommands:
    """policy check/apply/show, and errors that are one line."""

    def test_policy_commands_never_start_the_embedded_redis(self, tmp_path: Path) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text("[classes.batch]\npriority = 10\n")
        home = tmp_path / "embedded"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("GPUGATE_REDIS_URL", "REDIS_URL", "GPUGATE_EMBEDDED_DIR")
        }
        env["GPUGATE_EMBEDDED_DIR"] = str(home)
        for args in (("policy", "show"), ("policy", "apply", str(f))):
            result = gpugate(*args, env=env)
            assert result.returncode == 2, result.stderr
            assert "embedded Redis of this host is not running" in result.stderr
        assert not (home / "redis.sock").exists()

    def test_check_accepts_a_good_file(self, tmp_path: Path) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text('[classes.batch]\npriority = 10\nrate = "5/s"\n')
        result = gpugate("policy", "check", str(f))
        assert result.returncode == 0
        assert "ok" in result.stdout

    def test_policy_check_says_what_config_check_says(self, tmp_path: Path) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text('[classes.batch]\npriority = 10\nrate = "5/s"\n')
        policy_check = gpugate("policy", "check", str(f))
        assert policy_check.stdout == gpugate("config", "check", str(f)).stdout
        assert "pool: lease_ttl" in policy_check.stdout
        assert "class batch: priority 10, rate 5/s" in policy_check.stdout

    def test_check_names_every_knob_the_file_sets(self, tmp_path: Path) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text(
            '[pool]\npriority_aging = "6/min"\nretry_max = "20s"\n'
            '[classes.interactive]\npriority = 100\nmax_duration = "1h"\n'
            'max_duration_contended = "10m"\n'
            '[classes.batch]\npriority = 10\nmax_fragmentation = 0.25\non_backend_error = "open"\n'
        )
        result = gpugate("config", "check", str(f))
        assert result.returncode == 0
        for shown in (
            "retry_max 20s",
            "priority_aging 6/min",
            "max_duration 1h, max_duration_contended 10m",
            "max_fragmentation 0.25",
            "on_backend_error open",
        ):
            assert shown in result.stdout

    def test_show_on_a_pool_without_a_policy_is_a_one_line_error(
        self, redis_server: RedisProcess, pool_name: str
    ) -> None:
        result = gpugate("--redis-url", redis_server.url, "--pool", pool_name, "policy", "show")
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            f"gpugate: error: pool {pool_name!r} has no policy yet: "
            "`gpugate policy apply FILE` sets one\n"
        )

    def test_where_options_may_follow_the_policy_action_too(
        self, redis_server: RedisProcess, pool_name: str, tmp_path: Path
    ) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text("[classes.batch]\npriority = 10\n")
        target = ("--redis-url", redis_server.url, "--pool", pool_name)
        assert gpugate("policy", "apply", str(f), *target).returncode == 0
        shown = gpugate("policy", "show", *target)
        assert shown.returncode == 0
        assert '"batch"' in shown.stdout

    def test_output_into_a_closed_pipe_ends_quietly(
        self, redis_server: RedisProcess, pool_name: str, tmp_path: Path
    ) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text("[classes.batch]\npriority = 10\n")
        target = ("--redis-url", redis_server.url, "--pool", pool_name)
        assert gpugate(*target, "policy", "apply", str(f)).returncode == 0
        for args in (("policy", "show"), ("status",), ("config", "check", str(f))):
            result = gpugate_into_a_closed_pipe(*target, *args)
            # As a command that SIGPIPE ended: 128 + 13, and nothing on stderr.
            assert (result.returncode, result.stderr) == (141, ""), args

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

    @pytest.mark.parametrize(
        "url",
        ["redis://:s3cret@127.0.0.1:1/0", "redis://:s3cret@127.0.0.1:1/0?cluster=1", "nope://x"],
    )
    def test_an_unreachable_or_bad_redis_is_one_line_without_the_password(self, url: str) -> None:
        result = gpugate("--redis-url", url, "policy", "show", timeout=60)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "s3cret" not in result.stderr
        assert "Traceback" not in result.stderr


class TestArguments:
    """Argument errors are one line that says how to fix them."""

    def test_a_value_starting_with_a_dash_is_shown_how_to_pass(self) -> None:
        result = gpugate("pause", "batch", "--for", "-5m", "--redis-url", "redis://127.0.0.1:1/0")
        assert result.returncode == 2
        assert "write --for=-5m" in result.stderr
        assert len(result.stderr.splitlines()) == 1

    def test_the_hint_reads_the_arguments_given_to_main_not_sys_argv(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from gpugate.cli import main

        with pytest.raises(SystemExit) as exc:
            main(["cap", "batch", "2", "--for", "-1h"])
        assert exc.value.code == 2
        assert "write --for=-1h" in capsys.readouterr().err

    def test_a_missing_value_gets_no_such_hint(self) -> None:
        result = gpugate("pause", "batch", "--for")
        assert result.returncode == 2
        assert "expected one argument" in result.stderr
        assert "write" not in result.stderr

    def test_a_bad_log_format_in_the_environment_is_one_line_naming_the_choices(
        self, tmp_path: Path
    ) -> None:
        f = tmp_path / "gpugate.toml"
        f.write_text("[classes.batch]\npriority = 10\n")
        result = gpugate("config", "check", str(f), env={**os.environ, "GPUGATE_LOG_FORMAT": "xml"})
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            'gpugate: error: GPUGATE_LOG_FORMAT: "xml" is not a log format; '
            'use "json", "console" or "auto" (or unset it)'
        ]
        # The option given on the command line wins over the variable.
        given = gpugate(
            "--log-format",
            "json",
            "config",
            "check",
            str(f),
            env={**os.environ, "GPUGATE_LOG_FORMAT": "xml"},
        )
        assert given.returncode == 0, given.stderr
