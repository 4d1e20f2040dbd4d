"""The public surface: what ``import gpugate`` offers, and nothing by accident."""

from __future__ import annotations

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
