"""The public surface: what ``import gpugate`` offers, and nothing by accident."""

from __future__ import annotations

from pathlib import Path

import gpugate


class TestPublicApi:
    """``gpugate.__all__`` is the whole public API, sorted and importable."""

    def test_all_is_pinned(self) -> None:
        assert gpugate.__all__ == [
            "AdmissionError",
            "AdmissionRejected",
            "AdmissionTimeout",
            "BackendError",
            "ClassPolicy",
            "ConfigError",
            "Decision",
            "DeviceFault",
            "DeviceSample",
            "Gate",
            "GpuProcess",
            "GpugateError",
            "Lease",
            "NoGpuSampler",
            "NvmlError",
            "NvmlSampler",
            "NvmlUnavailable",
            "Outcome",
            "Policy",
            "PoolSettings",
            "Reason",
            "Sampler",
            "SimulatedSampler",
            "Snapshot",
            "Ticket",
            "UsageError",
            "__version__",
            "default_sampler",
            "format_duration",
            "format_size",
            "parse_duration",
            "parse_rate",
            "parse_size",
            "start_metrics_server",
        ]

    def test_every_name_resolves_and_public_callables_are_documented(self) -> None:
        for name in gpugate.__all__:
            obj = getattr(gpugate, name)
            if callable(obj):
                assert obj.__doc__, name

    def test_the_exceptions_form_one_tree(self) -> None:
        for name in (
            "AdmissionRejected",
            "AdmissionTimeout",
            "BackendError",
            "ConfigError",
            "UsageError",
        ):
            assert issubclass(getattr(gpugate, name), gpugate.GpugateError)
        assert issubclass(gpugate.AdmissionTimeout, TimeoutError)
        assert issubclass(gpugate.ConfigError, ValueError)


class TestReadme:
    """The README's "Use it" example runs as written (its Redis URL aside)."""

    def test_the_use_it_example_runs(self, redis_url: str, pool_name: str) -> None:
        readme = (Path(__file__).parent.parent / "README.md").read_text()
        section = readme.split("## Use it", 1)[1]
        block = section.split("```python\n", 1)[1].split("```", 1)[0]
        assert 'redis_url="redis://127.0.0.1:6379/0", pool="p1"' in block
        code = block.replace(
            'redis_url="redis://127.0.0.1:6379/0", pool="p1"',
            f"redis_url={redis_url!r}, pool={pool_name!r}",
        )
        namespace: dict[str, object] = {}
        exec(compile(code, "README.md", "exec"), namespace)
        d = namespace["d"]
        assert isinstance(d, gpugate.Decision)
        assert d.outcome is gpugate.Outcome.ADMIT
        assert isinstance(d.lease, gpugate.Lease)
        assert d.lease.released
        gate = namespace["gate"]
        assert isinstance(gate, gpugate.Gate)
        assert gate._closed
