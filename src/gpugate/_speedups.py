"""The fast-path functions, compiled when possible, chosen once at import.

* ``GPUGATE_NO_EXTENSIONS=1`` forces the pure-Python twin
  (:mod:`gpugate._fastpath_py`).
* Otherwise the compiled :mod:`gpugate._fastpath` is used when it imports, and
  the twin when it does not, unless ``GPUGATE_REQUIRE_EXTENSIONS=1``, which
  makes a missing extension an ``ImportError``.

:data:`IMPLEMENTATION` says which one was chosen (``"cython"`` or
``"python"``); ``gpugate status`` shows it. Both give the same results. The
NVML sampler's :class:`NvmlLibrary` follows the same choice: dlopen and C
structs in the compiled module, nvidia-ml-py in the twin.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

from . import _fastpath_py

__all__ = [
    "IMPLEMENTATION",
    "NvmlLibrary",
    "pack_samples",
    "precheck_fits",
    "process_entry_bytes",
    "text_args",
]

NO_EXTENSIONS_ENV = "GPUGATE_NO_EXTENSIONS"
REQUIRE_EXTENSIONS_ENV = "GPUGATE_REQUIRE_EXTENSIONS"
# What turns either switch on ("1", and the words people write for it);
# anything else, unset or empty, leaves it off.
_ON = frozenset({"1", "true", "yes", "on"})


def _on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _ON


def _choose() -> tuple[ModuleType, str]:
    if _on(NO_EXTENSIONS_ENV):
        return _fastpath_py, "python"
    try:
        compiled = importlib.import_module(f"{__package__}._fastpath")
    except ImportError as exc:
        if _on(REQUIRE_EXTENSIONS_ENV):
            raise ImportError(
                f"{REQUIRE_EXTENSIONS_ENV}=1 but the compiled gpugate._fastpath "
                f"cannot be imported ({exc}); reinstall gpugate where Cython and a C "
                f"compiler are available, or unset {REQUIRE_EXTENSIONS_ENV} to use "
                "the pure-Python fast path"
            ) from exc
        return _fastpath_py, "python"
    return compiled, "cython"


_impl, IMPLEMENTATION = _choose()

if TYPE_CHECKING:
    from ._fastpath_py import (
        NvmlLibrary,
        pack_samples,
        precheck_fits,
        process_entry_bytes,
        text_args,
    )
else:
    NvmlLibrary = _impl.NvmlLibrary
    pack_samples = _impl.pack_samples
    precheck_fits = _impl.precheck_fits
    text_args = _impl.text_args
    process_entry_bytes = _impl.process_entry_bytes
