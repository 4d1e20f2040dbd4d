"""The exceptions gpugate raises, all under one root.

::

    GpugateError
    ├── ConfigError (also ValueError)      bad policy file, size, duration, rate
    ├── BackendError                      Redis unreachable, timed out, or refused a call
    ├── NvmlError                         NVML failed in a way the sampler cannot work around
    │   └── NvmlUnavailable               no NVML library or driver here (no-GPU mode)
    ├── UsageError                        the API used the wrong way (unknown class,
    │                                     a Gate used in a forked child, a released lease)
    └── AdmissionError                    a blocking admission did not get a slot
        ├── AdmissionTimeout (also TimeoutError)
        └── AdmissionRejected             the request can never be admitted (too large, ...)

Every message names the thing at fault, the value, and how to fix it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .admission._decision import Decision


class GpugateError(Exception):
    """Root of every exception gpugate raises on purpose."""


class ConfigError(GpugateError, ValueError):
    """A policy, size, duration or rate that cannot be used.

    ``source`` is the file (or ``<dict>``), ``key`` the dotted key at fault,
    ``value`` the offending value; any of them may be ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        key: str | None = None,
        value: object = None,
    ) -> None:
        self.source = source
        self.key = key
        self.value = value
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class BackendError(GpugateError):
    """Redis could not be reached in time, or refused a call (an error reply:
    a gpugate script's own, an ACL, a key of another type); the reply is the
    ``__cause__``."""


class NvmlError(GpugateError):
    """NVML answered with an error the sampler cannot work around.

    ``code`` is the ``nvmlReturn_t`` value, ``call`` the NVML function.
    """

    def __init__(self, message: str, *, code: int, call: str) -> None:
        self.code = code
        self.call = call
        super().__init__(message)


class NvmlUnavailable(NvmlError):
    """No NVML here: the library or the driver is missing (no-GPU mode)."""


class UsageError(GpugateError):
    """The API was used in a way it does not support."""


class AdmissionError(GpugateError):
    """A blocking admission ended without a slot.

    ``decision`` is the last :class:`~gpugate.Decision` seen, whose ``reason``
    says what held the request back.
    """

    def __init__(self, message: str, decision: Decision | None = None) -> None:
        super().__init__(message)
        self.decision = decision


class AdmissionTimeout(AdmissionError, TimeoutError):
    """``admit(..., timeout=...)`` ran out of time while the request was deferred."""


class AdmissionRejected(AdmissionError):
    """The request was rejected: it can never be admitted as asked."""
