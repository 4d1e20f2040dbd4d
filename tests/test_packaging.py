"""How gpugate is built and installed: the compiled fast path and the package data."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gpugate import _fastpath_py, _speedups

_compiled: ModuleType | None
try:
    _compiled = importlib.import_module("gpugate._fastpath")
except ImportError:
    _compiled = None

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_PACKAGE = REPO_ROOT / "src" / "gpugate"

# Must match [tool.setuptools.package-data] in pyproject.toml.
PACKAGE_DATA_GLOBS = ("py.typed", "*.pyx", "lua/*.lua")

needs_compiled = pytest.mark.skipif(
    _compiled is None, reason="gpugate._fastpath is not compiled in this install"
)


def _env_is(name: str) -> bool:
    return _speedups._on(name)


def _import_speedups_in_child(
    *, block_compiled: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    """Import gpugate._speedups in a fresh interpreter; it prints IMPLEMENTATION."""
    child_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GPUGATE_NO_EXTENSIONS", "GPUGATE_REQUIRE_EXTENSIONS")
    }
    child_env.update(env)
    # None in sys.modules makes "from gpugate import _fastpath" raise ImportError.
    block = "import sys; sys.modules['gpugate._fastpath'] = None\n" if block_compiled else ""
    code = block + "from gpugate import _speedups\nprint(_speedups.IMPLEMENTATION)\n"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestImplementationChoice:
    """The fast path is chosen once at import, as the environment asks."""

    def test_required_extensions_give_the_compiled_fast_path(self) -> None:
        if _env_is("GPUGATE_NO_EXTENSIONS"):
            pytest.skip("GPUGATE_NO_EXTENSIONS=1 forces the pure-Python fast path")
        if not _env_is("GPUGATE_REQUIRE_EXTENSIONS"):
            pytest.skip("set GPUGATE_REQUIRE_EXTENSIONS=1 to require the compiled fast path")
        assert _speedups.IMPLEMENTATION == "cython"
        assert _compiled is not None
        assert _speedups.precheck_fits is _compiled.precheck_fits

    def test_no_extensions_gives_the_pure_python_fast_path(self) -> None:
        if not _env_is("GPUGATE_NO_EXTENSIONS"):
            pytest.skip("set GPUGATE_NO_EXTENSIONS=1 to force the pure-Python fast path")
        assert _speedups.IMPLEMENTATION == "python"
        assert _speedups.precheck_fits is _fastpath_py.precheck_fits
        assert _speedups.pack_samples is _fastpath_py.pack_samples

    def test_the_choice_matches_what_can_be_imported(self) -> None:
        compiled_usable = _compiled is not None and not _env_is("GPUGATE_NO_EXTENSIONS")
        chosen = _speedups.IMPLEMENTATION
        assert chosen == ("cython" if compiled_usable else "python")

    @pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
    def test_no_extensions_env_wins_in_a_fresh_interpreter(self, value: str) -> None:
        result = _import_speedups_in_child(GPUGATE_NO_EXTENSIONS=value)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "python"

    @pytest.mark.parametrize("value", ["0", "false", ""])
    def test_no_extensions_off_keeps_the_compiled_fast_path(self, value: str) -> None:
        if _compiled is None:
            pytest.skip("the compiled fast path is not built here")
        result = _import_speedups_in_child(GPUGATE_NO_EXTENSIONS=value)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "cython"

    def test_a_missing_extension_falls_back_to_python(self) -> None:
        result = _import_speedups_in_child(block_compiled=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "python"

    def test_a_missing_required_extension_fails_the_import_clearly(self) -> None:
        result = _import_speedups_in_child(block_compiled=True, GPUGATE_REQUIRE_EXTENSIONS="1")
        assert result.returncode != 0
        assert "ImportError: GPUGATE_REQUIRE_EXTENSIONS=1" in result.stderr
        assert "unset GPUGATE_REQUIRE_EXTENSIONS" in result.stderr

    def test_both_twins_define_the_same_public_functions(self) -> None:
        assert set(_fastpath_py.__all__) == {
            "NvmlLibrary",
            "pack_samples",
            "precheck_fits",
            "process_entry_bytes",
            "text_args",
        }
        assert set(_speedups.__all__) == {"IMPLEMENTATION", *_fastpath_py.__all__}
        if _compiled is not None:
            assert set(_compiled.__all__) == set(_fastpath_py.__all__)


def _implementations() -> list[object]:
    return [
        pytest.param("c", id="c", marks=needs_compiled),
        pytest.param("py", id="py"),
    ]


@pytest.fixture(params=_implementations())
def fastpath(request: pytest.FixtureRequest) -> ModuleType:
    """Each implementation of the fast path in turn: ``[c]`` and ``[py]``."""
    if request.param == "c":
        return importlib.import_module("gpugate._fastpath")
    return _fastpath_py


class TestPrecheckFits:
    """precheck_fits says no only when no device can hold the request."""

    def test_a_device_with_room_above_the_margin_fits(self, fastpath: ModuleType) -> None:
        assert fastpath.precheck_fits([1 << 30, 8 << 30], 6 << 30, 1 << 30) is True

    def test_exactly_enough_room_fits(self, fastpath: ModuleType) -> None:
        assert fastpath.precheck_fits([10], 7, 3) is True

    def test_one_byte_short_does_not_fit(self, fastpath: ModuleType) -> None:
        assert fastpath.precheck_fits([10, 9], 8, 3) is False

    def test_no_devices_never_fit(self, fastpath: ModuleType) -> None:
        assert fastpath.precheck_fits([], 0, 0) is False

    def test_tuples_and_iterators_are_accepted(self, fastpath: ModuleType) -> None:
        assert fastpath.precheck_fits((1, 5), 4, 0) is True
        assert fastpath.precheck_fits(iter([1, 5]), 6, 0) is False

    def test_values_beyond_64_bits_are_exact(self, fastpath: ModuleType) -> None:
        assert fastpath.precheck_fits([1 << 70], 1 << 69, 1 << 69) is True
        assert fastpath.precheck_fits([(1 << 63) - 1], (1 << 63) - 1, 1) is False


class TestPackSamples:
    """pack_samples lays samples out as the Lua scripts' ARGV: four strings per device."""

    def test_each_device_becomes_uuid_total_used_age(self, fastpath: ModuleType) -> None:
        packed = fastpath.pack_samples(["GPU-a", "GPU-b"], [80, 40], [10, 0], [5, 1_000])
        assert packed == ["GPU-a", "80", "10", "5", "GPU-b", "40", "0", "1000"]

    def test_no_devices_give_no_arguments(self, fastpath: ModuleType) -> None:
        assert fastpath.pack_samples([], [], [], []) == []

    def test_sequences_of_different_lengths_are_refused(self, fastpath: ModuleType) -> None:
        with pytest.raises(ValueError, match="2 uuids, 2 totals, 1 useds, 2 ages_ms"):
            fastpath.pack_samples(["a", "b"], [1, 2], [1], [1, 2])


class TestTextArgs:
    """text_args writes ints and floats as redis-py does, and leaves the rest."""

    def test_numbers_become_text_and_the_rest_stays(self, fastpath: ModuleType) -> None:
        command = ("EVALSHA", b"\xff", 3, -7, 1 << 70, 0.1, 1e20, True, "é")
        assert fastpath.text_args(command) == (
            "EVALSHA", b"\xff", "3", "-7", str(1 << 70), "0.1", "1e+20", True, "é",
        )  # fmt: skip


_ints = st.one_of(st.integers(min_value=0, max_value=1 << 45), st.integers())


@needs_compiled
class TestTwinsAgree:
    """The compiled fast path and its pure-Python twin give the same result for every input."""

    @given(free=st.lists(_ints, max_size=16), vram=_ints, margin=_ints)
    @example(free=[(1 << 63) - 1], vram=(1 << 63) - 1, margin=(1 << 63) - 1)
    @example(free=[-(1 << 63)], vram=-(1 << 63), margin=-1)
    def test_precheck_fits(self, free: list[int], vram: int, margin: int) -> None:
        assert _compiled is not None
        expected = _fastpath_py.precheck_fits(free, vram, margin)
        assert _compiled.precheck_fits(free, vram, margin) is expected
        assert _compiled.precheck_fits(tuple(free), vram, margin) is expected

    @given(
        samples=st.lists(st.tuples(st.text(max_size=40), _ints, _ints, _ints), max_size=16),
        trim=st.integers(min_value=0, max_value=2),
    )
    def test_pack_samples(self, samples: list[tuple[str, int, int, int]], trim: int) -> None:
        assert _compiled is not None
        columns = [list(column) for column in zip(*samples, strict=True)] or [[], [], [], []]
        if trim and samples:
            # A shorter column must be refused identically by both.
            columns[trim] = columns[trim][:-1]
        assert _outcome(_compiled.pack_samples, *columns) == _outcome(
            _fastpath_py.pack_samples, *columns
        )


def _outcome(function: Callable[..., object], *args: object) -> tuple[str, object]:
    """What a call returned, or the type and message of what it raised."""
    try:
        return "returned", function(*args)
    except Exception as exc:
        return "raised", (type(exc), str(exc))


class TestPackageData:
    """Every data file of the source tree is in the installed package."""

    @pytest.mark.parametrize("pattern", PACKAGE_DATA_GLOBS)
    def test_source_files_are_installed(self, pattern: str) -> None:
        if not SOURCE_PACKAGE.is_dir():
            pytest.skip(f"not run from a source checkout ({SOURCE_PACKAGE} is missing)")
        in_source = sorted(
            p.relative_to(SOURCE_PACKAGE).as_posix() for p in SOURCE_PACKAGE.glob(pattern)
        )
        if not in_source:
            pytest.skip(f"no file in src/gpugate matches {pattern!r} yet")
        installed = resources.files("gpugate")
        missing = [name for name in in_source if not installed.joinpath(name).is_file()]
        assert not missing, f"in src/gpugate but not installed: {missing}"

    def test_every_lua_script_is_shipped(self) -> None:
        lua = resources.files("gpugate").joinpath("lua")
        shipped = (
            sorted(p.name for p in lua.iterdir() if p.name.endswith(".lua")) if lua.is_dir() else []
        )
        source_dir = SOURCE_PACKAGE / "lua"
        in_source = sorted(p.name for p in source_dir.glob("*.lua"))
        if not shipped and not in_source:
            pytest.skip("there are no .lua scripts yet")
        assert shipped, "the installed package holds no gpugate/lua/*.lua"
        if SOURCE_PACKAGE.is_dir():
            assert shipped == in_source


# Levels an operator sees; debug events are for developers and need no docs.
_OPERATOR_LEVELS = {"info", "warning", "error", "exception", "critical"}


def _logged_events(source: str) -> set[str]:
    """The literal event names of ``log.<level>(...)`` calls at info or above
    (both branches of ``a if cond else b``) and of ``self._warn(...)``, the
    asynq worker's throttled warning."""
    events: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target, method = node.func.value, node.func.attr
        is_log = isinstance(target, ast.Name) and target.id == "log"
        is_warn = isinstance(target, ast.Name) and target.id == "self" and method == "_warn"
        if not ((is_log and method in _OPERATOR_LEVELS) or is_warn) or not node.args:
            continue
        first = node.args[0]
        names = [first.body, first.orelse] if isinstance(first, ast.IfExp) else [first]
        events |= {
            n.value for n in names if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
    return events


class TestDocumentedLogEvents:
    """Every log event an operator can see is in docs/operations.md's table."""

    def test_every_event_at_info_or_above_is_documented(self) -> None:
        if not SOURCE_PACKAGE.is_dir():
            pytest.skip(f"not run from a source checkout ({SOURCE_PACKAGE} is missing)")
        events: dict[str, str] = {}
        for path in sorted(SOURCE_PACKAGE.rglob("*.py")):
            for event in _logged_events(path.read_text()):
                events.setdefault(event, path.relative_to(REPO_ROOT).as_posix())
        assert len(events) > 50, "the scan found too few events: has the logging idiom changed?"
        table = (REPO_ROOT / "docs" / "operations.md").read_text().split("## Logs", 1)[1]
        missing = sorted(f"{e} ({where})" for e, where in events.items() if f"`{e}`" not in table)
        assert not missing, f"log events missing from docs/operations.md#logs: {missing}"
