"""Build the optional compiled fast path, ``gpugate._fastpath``.

Everything else about the package lives in ``pyproject.toml``. The extension
is always attempted; when Cython or a C compiler lets us down, the build
prints a warning and goes on, and at run time ``gpugate._speedups`` falls back
to the pure-Python twin ``gpugate._fastpath_py``.

``GPUGATE_REQUIRE_EXTENSIONS=1`` (set in CI) turns that warning into a failed
build, so a broken extension cannot slip through unnoticed.
``GPUGATE_NO_EXTENSIONS`` is a run-time switch only and is ignored here.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRE_ENV = "GPUGATE_REQUIRE_EXTENSIONS"

CYTHON_DIRECTIVES = {
    "language_level": "3",
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "embedsignature": True,
}


def _extensions_required() -> bool:
    # As gpugate._speedups reads its switches.
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class OptionalBuildExt(build_ext):
    """``build_ext`` that cythonizes lazily and treats failures as optional."""

    def run(self) -> None:
        # run() itself fails when no compiler can be found at all.
        try:
            super().run()
        except Exception as exc:
            if getattr(exc, "_gpugate_reported", False):
                raise
            self._give_up("the build_ext step", exc)

    def build_extension(self, ext: Any) -> None:
        try:
            self._cythonize(ext)
            super().build_extension(ext)
        except Exception as exc:
            self._give_up(f"building {ext.name}", exc)

    @staticmethod
    def _cythonize(ext: Any) -> None:
        if not any(str(src).endswith(".pyx") for src in ext.sources):
            return
        # Imported here so that sdist and metadata builds need no Cython.
        from Cython.Build import cythonize

        (converted,) = cythonize(
            [ext],
            compiler_directives=CYTHON_DIRECTIVES,
            quiet=True,
        )
        ext.sources = converted.sources

    def _give_up(self, what: str, exc: BaseException) -> None:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if _extensions_required():
            sys.stderr.write(
                "\n" + "=" * 72 + "\n"
                f"ERROR: {REQUIRE_ENV}=1 and {what} failed:\n"
                f"  {detail}\n" + "=" * 72 + "\n"
            )
            exc._gpugate_reported = True  # type: ignore[attr-defined]
            raise exc
        sys.stderr.write(
            "\n" + "=" * 72 + "\n"
            f"WARNING: {what} failed; gpugate will use its pure-Python\n"
            "fast path (same results, slower). Cause:\n"
            f"  {detail}\n"
            f"Set {REQUIRE_ENV}=1 to make this failure fatal.\n" + "=" * 72 + "\n"
        )


setup(
    ext_modules=[
        Extension(
            "gpugate._fastpath",
            sources=["src/gpugate/_fastpath.pyx"],
            # NVML is opened with dlopen, which lives in libdl before glibc 2.34.
            libraries=["dl"] if sys.platform.startswith("linux") else [],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
