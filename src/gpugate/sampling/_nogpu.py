"""The sampler of a host without GPUs."""

from __future__ import annotations

import time

from ._sample import Snapshot, hostname


class NoGpuSampler:
    """Reports no devices: every class falls back to its ``no_gpu`` behaviour."""

    backend = "none"

    def __init__(self) -> None:
        self._host = hostname()

    def sample(self) -> Snapshot:
        """An empty snapshot."""
        return Snapshot(
            devices=(), taken_mono=time.monotonic(), host=self._host, backend=self.backend
        )
