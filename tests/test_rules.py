"""The shipped alert rules and dashboard, checked by promtool and a real Prometheus.

promtool and prometheus come from Debian's ``prometheus`` package
(``apt-get install prometheus``); the tests that need them skip, saying so,
where they are not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from conftest import notebook_gate, spawn_gpugate_metrics
from gpugate import Gate, Outcome, Policy, SimulatedSampler
from gpugate.metrics import Metrics, PoolCollector
from gpugate.state._connect import connect
from gpugate.state._server import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "gpugate-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "gpugate-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gpugate.json"
OPERATIONS = ROOT / "docs" / "operations.md"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed: apt-get install prometheus (Debian) puts it on PATH")
    return path


def alerts() -> list[dict[str, str]]:
    """Each alert's name, severity and annotation keys, read from the rules file's text.

    (No YAML parser is a dependency; promtool checks the syntax.)
    """
    text = RULES.read_text()
    blocks = re.split(r"\n\s+- alert: ", text)[1:]
    out = []
    for block in blocks:
        name = block.split("\n", 1)[0].strip()
        severity = re.search(r"\n\s+severity: (\S+)", block)
        keys = set(re.findall(r"\n\s{10}(\w+): ", block.split("annotations:", 1)[-1]))
        out.append(
            {
                "name": name,
                "severity": severity.group(1) if severity else "",
                "keys": ",".join(sorted(keys)),
            }
        )
    return out


def exported_names() -> set[str]:
    """Every metric family name gpugate exports: the pool collector's and the instruments'."""
    src = (ROOT / "src" / "gpugate" / "metrics" / "_collector.py").read_text()
    src += (ROOT / "src" / "gpugate" / "metrics" / "_instruments.py").read_text()
    names = set(re.findall(r'"(gpugate_[a-z_]+)"', src))
    # What Prometheus sees: counters get _total, histograms _bucket/_sum/_count, info _info.
    families = set(names)
    for n in names:
        families |= {n + "_total", n + "_bucket", n + "_sum", n + "_count", n + "_info"}
    return families


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(gpugate_[a-z_]+)\b(?!\*)", expr))


def rule_exprs() -> list[str]:
    """The ``expr`` of each rule: one line, or a ``|`` block."""
    text = RULES.read_text()
    exprs = re.findall(r"\n\s+expr: \|\n((?:\s{10}.*\n)+)", text)
    exprs += [e for e in re.findall(r"\n\s+expr: (.+)", text) if e.strip() != "|"]
    return exprs


class TestRulesFile:
    """Each alert has a severity, a summary, a runbook line and a documented section."""

    def test_every_alert_has_a_severity_a_runbook_and_a_docs_section(self) -> None:
        found = alerts()
        assert len(found) >= 12
        docs = OPERATIONS.read_text().lower()
        for a in found:
            assert a["severity"] in ("critical", "warning"), a
            assert set(a["keys"].split(",")) >= {"summary", "description", "runbook", "docs"}, a
            assert f"### {a['name'].lower()}" in docs, f"docs/operations.md lacks ### {a['name']}"

    def test_the_runbook_situations_are_all_covered(self) -> None:
        names = {a["name"] for a in alerts()}
        assert names >= {
            "GpugateGPUUnavailable",
            "GpugateHighGPUMemory",
            "GpugateGPULost",  # one GPU of several lost: the pool runs on, DEGRADED
            "GpugateGPUFragmentation",
            "GpugateHighDeferRate",
            "GpugateRejecting",
            "GpugateInteractiveWaiting",
            "GpugateQueueBacklogGrowing",
            "GpugateWorkerHeartbeatsMissing",
            "GpugateEmergencyOverrideActive",
            "GpugateExporterDown",  # without the exporter every pool alert is silent
        }

    def test_rules_use_only_metrics_that_exist(self) -> None:
        exprs = rule_exprs()
        assert len(exprs) == len(alerts())
        unknown = set().union(*(metric_names(e) for e in exprs)) - exported_names()
        assert not unknown

    def test_the_decision_time_alert_threshold_is_a_bucket_bound_of_the_workers(self) -> None:
        # histogram_quantile interpolates within a bucket: without a bound at the
        # threshold, a p99 just above the bound below it reads as over the threshold.
        text = RULES.read_text()
        block = text.split("- alert: GpugateHighDecisionLatency", 1)[1].split("- alert:", 1)[0]
        found = re.search(r"gpugate_decision_duration_seconds_bucket.*\)\s*>\s*([0-9.]+)", block)
        assert found, block
        threshold = float(found.group(1))
        metrics = Metrics(CollectorRegistry()).for_pool("a")
        metrics.decisions.record("batch", Outcome.ADMIT, "ok", 0.001)
        bounds = {
            float(s.labels["le"])
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name == "gpugate_decision_duration_seconds_bucket"
        }
        assert threshold in bounds, sorted(bounds)

    def test_promtool_accepts_the_rules(self) -> None:
        result = subprocess.run(
            [tool("promtool"), "check", "rules", str(RULES)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_promtool_unit_tests_pass(self) -> None:
        result = subprocess.run(
            [tool("promtool"), "test", "rules", str(RULE_TESTS)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=RULE_TESTS.parent,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout


def _lease_series(registry: CollectorRegistry) -> dict[str, float]:
    """The exporter's lease counters and gauges, as promtool series names."""
    wanted = {
        "gpugate_pool_leases_expired_total",
        "gpugate_pool_lease_releases_total",
        "gpugate_leases_overdue",
    }
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name in wanted:
                labels = {**s.labels, "instance": "exporter:9470", "job": "gpugate"}
                inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                out[f"{s.name}{{{inner}}}"] = s.value
    return out


class TestRulesOnTheExportersSeries:
    """What the pool exporter exports after a real sequence of events, fed to promtool."""

    def test_a_lease_its_max_duration_ended_does_not_fire_heartbeats_missing(
        self, redis_url: str, pool_name: str, tmp_path: Path
    ) -> None:
        promtool = tool("promtool")
        now = [1_700_000_000_000]
        gate = notebook_gate(redis_url, pool_name, lambda: now[0])
        client = connect(redis_url)
        registry = CollectorRegistry()
        registry.register(PoolCollector(client, pool_name, now_ms=lambda: now[0]))
        try:
            # A notebook lease, its holder alive and renewing until told its class's
            # max duration is reached; scraped while live, past its last expiry, and
            # after a decision reaped it.
            nb = gate.try_admit("notebook", vram="4GiB")
            assert nb.lease is not None
            scrapes = [_lease_series(registry)]
            while not nb.lease.max_duration_reached:
                now[0] += 10_000
                gate.beat_now()
            now[0] += 30_000
            scrapes.append(_lease_series(registry))
            assert gate.try_admit("interactive", vram="1GiB").admitted
            scrapes.append(_lease_series(registry))
        finally:
            gate.close()
            client.close()
        series = "".join(
            f"  - series: '{name}'\n"
            f"    values: {' '.join(str(s.get(name, 0)) for s in scrapes)}x12\n"
            for name in sorted(set().union(*scrapes))
        )
        evals = "".join(
            f"  - eval_time: {m}m\n    alertname: GpugateWorkerHeartbeatsMissing\n"
            "    exp_alerts: []\n"
            for m in (6, 12)
        )
        tests = tmp_path / "max-duration.test.yml"
        tests.write_text(
            f"rule_files: ['{RULES}']\nevaluation_interval: 1m\ntests:\n"
            f"- interval: 1m\n  input_series:\n{series}  alert_rule_test:\n{evals}"
        )
        result = subprocess.run(
            [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # Not silent for want of the lease's end: it is in the series, apart.
        ended = 'class="notebook", instance="exporter:9470", job="gpugate", outcome="max_duration"'
        assert [v for k, v in scrapes[-1].items() if ended in k] == [1]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


class TestDashboard:
    """The Grafana dashboard: templated data source and pool, known metrics only."""

    def test_panels_are_templated_and_use_only_metrics_that_exist(self) -> None:
        doc = json.loads(DASHBOARD.read_text())
        assert doc["uid"] == "gpugate-pool"
        variables = {v["name"] for v in doc["templating"]["list"]}
        assert variables == {"datasource", "pool", "class"}
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids))
        for p in doc["panels"]:
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "${datasource}", p["title"]
        exprs = dashboard_exprs()
        assert exprs
        unknown = set().union(*(metric_names(e) for e in exprs)) - exported_names()
        assert not unknown
        # The exporter's series and the workers' carry `pool`: every panel follows
        # $pool (a queue shared by two pools is exported once per pool).
        unfiltered = [e for e in exprs if 'pool=~"$pool"' not in e]
        assert not unfiltered

    def test_memory_is_shown_against_queue_depth_and_decisions_per_class(self) -> None:
        exprs = "\n".join(dashboard_exprs())
        for name in (
            "gpugate_gpu_memory_used_bytes",
            "gpugate_waiters",
            "gpugate_queue_tasks",
            "gpugate_decisions_total",
            "gpugate_class_reserved_bytes",
        ):
            assert name in exprs
        assert "by (class" in exprs


# -- a real Prometheus --------------------------------------------------------------


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _wait_for(what: str, check: Any, timeout_s: float, proc: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({proc.returncode}) while waiting for {what}")
        try:
            last = check()
        except OSError as exc:  # not listening yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s:g}s; last: {last!r}")


@pytest.fixture
def prometheus() -> str:
    """The prometheus binary (the test skips without one, before starting anything)."""
    return tool("prometheus")


@pytest.fixture
def exporter(redis_url: str, pool_name: str) -> Iterator[str]:
    """``gpugate metrics`` on a free loopback port for a pool with two GPUs; yields host:port."""
    gate = Gate(
        redis_url,
        pool=pool_name,
        sampler=SimulatedSampler(["80GiB", "40GiB"], name=pool_name),
        policy=Policy.from_dict(
            {"classes": {"interactive": {"priority": 100}, "batch": {"priority": 10}}}
        ),
        metrics=Metrics(CollectorRegistry()),
    )
    held = gate.try_admit("batch", vram="10GiB")
    assert held.admitted
    proc = spawn_gpugate_metrics(redis_url, pool_name, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://(127\.0\.0\.1:\d+)/metrics", line)
        assert match, line
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()
        gate.close()


@pytest.mark.slow
class TestRealPrometheus:
    """A real Prometheus scrapes `gpugate metrics`, loads the rules, runs the panels' queries."""

    def test_prometheus_scrapes_the_exporter_and_evaluates_rules_and_panels(
        self, prometheus: str, exporter: str, pool_name: str, tmp_path: Path
    ) -> None:
        shutil.copy(RULES, tmp_path / "gpugate-rules.yml")
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files: [gpugate-rules.yml]\n"
            "scrape_configs:\n"
            f"  - job_name: gpugate\n    static_configs:\n      - targets: ['{exporter}']\n"
        )
        port = free_port()
        api = f"http://127.0.0.1:{port}/api/v1"
        log = (tmp_path / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        try:

            def target_up() -> bool:
                targets = _get(f"{api}/targets")["data"]["activeTargets"]
                return any(t["health"] == "up" for t in targets)

            _wait_for("scraped target", target_up, 60, proc)

            def query(expr: str) -> list[Any]:
                url = f"{api}/query?{urllib.parse.urlencode({'query': expr})}"
                doc = _get(url)
                assert doc["status"] == "success", doc
                return doc["data"]["result"]  # type: ignore[no-any-return]

            up = _wait_for(
                "gpugate_pool_up", lambda: query(f'gpugate_pool_up{{pool="{pool_name}"}}'), 30, proc
            )
            assert up[0]["value"][1] == "1"
            totals = query(f'gpugate_gpu_memory_total_bytes{{pool="{pool_name}"}}')
            assert sorted(float(r["value"][1]) for r in totals) == [40 * 2**30, 80 * 2**30]
            assert (
                query(f'gpugate_leases{{pool="{pool_name}", class="batch"}}')[0]["value"][1] == "1"
            )

            groups = _get(f"{api}/rules")["data"]["groups"]
            assert [g["name"] for g in groups] == ["gpugate"]
            assert len(groups[0]["rules"]) == len(alerts())

            for expr in dashboard_exprs():
                expr = expr.replace("$__rate_interval", "1m").replace("$pool", pool_name)
                query(expr.replace("$class", ".*"))  # every panel's query is valid PromQL
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
