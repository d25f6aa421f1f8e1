"""What fused-core logs (issue 15): through :mod:`logging`, under its module names, silent by default.

``fused_core.native`` logs one INFO line per compilation (source, compiler and flags, wall time, the
cached library) and one INFO line when C kernels are not used and why (no compiler,
``FUSED_OPTIM_DISABLE_NATIVE``), with no warning in those ordinary cases; ``fused_core.kernels``
logs one DEBUG line per (kernel, device, dtype) where a launcher serves because a preferred one
declined. None of it reaches stderr unless the application configures logging.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fused_core import native
from fused_core.kernels import KernelRegistry
from fused_testing.native import c_compiler

CONVERT_C = Path(__file__).with_name("csrc") / "convert.c"
NATIVE_LOGGER = "fused_core.native"
KERNELS_LOGGER = "fused_core.kernels"

needs_compiler = pytest.mark.skipif(c_compiler() is None, reason="no C compiler ($CC, else cc) on PATH")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """native warns once per message per process: start each test with none said."""
    monkeypatch.setattr(native, "_warned", set())


def copy_source(tmp_path: Path, name: str) -> Path:
    """convert.c under a fresh path: native._load caches per source path, so each copy builds anew."""
    source = tmp_path / f"{name}.c"
    source.write_text(CONVERT_C.read_text())
    return source


def signatures() -> dict[str, native.Signature]:
    import ctypes

    return {"bf16_to_f32": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64])}


def records(caplog: pytest.LogCaptureFixture, name: str = NATIVE_LOGGER) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == name]


@needs_compiler
def test_a_compilation_logs_one_info_line_with_source_flags_time_and_path(tmp_path, monkeypatch, caplog) -> None:
    """Building into a fresh FUSED_OPTIM_CACHE_DIR logs, at INFO under fused_core.native, the source,
    the compiler command with its flags, the wall time and the library's path; loading it again
    (from the cache) logs no INFO line."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, "convert_logged")
    caplog.set_level(logging.INFO, logger=NATIVE_LOGGER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        library = native.load_library(source, signatures(), flag_sets=[("-O1",)])
    assert library is not None, native.unavailable_reason(source, flag_sets=[("-O1",)])
    [record] = records(caplog)
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert re.fullmatch(
        rf"compiled {re.escape(str(source))} with \S*cc\S* -O1 in \d+\.\d\d s into {re.escape(str(library.path))}",
        message,
    ), message
    assert library.path.parent == cache

    caplog.clear()
    assert native.build(source, ("-O1",)) == library.path  # a cache hit: nothing at INFO
    assert records(caplog) == []


def test_disabled_native_logs_the_fallback_once_at_info(tmp_path, monkeypatch, caplog) -> None:
    """FUSED_OPTIM_DISABLE_NATIVE: one INFO line naming the source, the variable and that torch ops
    serve, however often load_library is asked; no warning."""
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    source = copy_source(tmp_path, "convert_disabled_logged")
    caplog.set_level(logging.DEBUG, logger=NATIVE_LOGGER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert native.load_library(source, signatures()) is None
    [record] = records(caplog)
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        f"fused-optim's C kernels {source.name} are not used, torch ops serve instead: {native.DISABLE_ENV} is set"
    )


@pytest.mark.parametrize("how", ["absolute-path", "not-on-path", "cc-not-on-path"])
def test_a_missing_compiler_logs_the_fallback_at_info_without_a_warning(tmp_path, monkeypatch, caplog, how) -> None:
    """$CC naming a program that does not exist, or no $CC and no ``cc`` on PATH: load_library returns
    None, one INFO line says there is no compiler (naming it) and that torch ops serve, no record at
    WARNING or above and no warning: a machine without a compiler is ordinary."""
    if how == "cc-not-on-path":
        missing = "cc"
        monkeypatch.delenv("CC", raising=False)
        (tmp_path / "empty").mkdir()
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        why = "no compiler: 'cc' is not on PATH ($CC chooses another)"
    else:
        missing = str(tmp_path / "no-such-cc") if how == "absolute-path" else "no-such-cc-fused-optim"
        monkeypatch.setenv("CC", missing)
        why = f"no compiler: $CC ({missing!r}) is neither an executable file nor on PATH"
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, f"convert_no_cc_{how.replace('-', '_')}")
    caplog.set_level(logging.DEBUG, logger=NATIVE_LOGGER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load_library(source, signatures(), flag_sets=[("-O1",), ("-O2",)]) is None
    logged = records(caplog)
    assert all(record.levelno < logging.WARNING for record in logged)
    info = [record.getMessage() for record in logged if record.levelno == logging.INFO]
    assert info == [f"fused-optim's C kernels {source.name} are not used, torch ops serve instead: {why}"]
    debug = [record.getMessage() for record in logged if record.levelno == logging.DEBUG]
    assert len(debug) == 2 and all("does not build with -O" in line and missing in line for line in debug)


@needs_compiler
def test_a_later_flag_set_is_logged_as_a_fallback(tmp_path, monkeypatch, caplog) -> None:
    """The first flag set does not compile, the second does: the compile line, and one INFO line
    naming the flags that serve and those that failed."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, "convert_flag_fallback")
    caplog.set_level(logging.INFO, logger=NATIVE_LOGGER)
    library = native.load_library(source, signatures(), flag_sets=[("-O1", "-fno-such-flag-fused-optim"), ("-O1",)])
    assert library is not None and library.flags == ("-O1",)
    messages = [record.getMessage() for record in records(caplog)]
    assert len(messages) == 2 and messages[0].startswith(f"compiled {source} with ")
    assert messages[1] == (
        f"fused-optim's C kernels {source.name} fall back to flags -O1, as [-O1 -fno-such-flag-fused-optim] failed "
        "(DEBUG lines say why)"
    )


NO_HANDLERS_SCRIPT = """
from fused_core import grad_norm, native
library = grad_norm.library()
print("loaded" if library is not None else native.unavailable_reason(grad_norm.SOURCE))
"""


@pytest.mark.parametrize("compiler", ["default", "missing"])
def test_nothing_reaches_stderr_by_default(tmp_path, compiler) -> None:
    """A fresh interpreter, no logging configured, building grad_norm.c into a fresh cache (or finding
    no compiler): stderr stays empty: INFO lines go nowhere unless the application asks for them."""
    if compiler == "default" and c_compiler() is None:
        pytest.skip("no C compiler ($CC, else cc) on PATH")
    env = {**os.environ, native.CACHE_ENV: str(tmp_path / "cache"), "PYTHONWARNINGS": "default"}
    env.pop(native.DISABLE_ENV, None)
    if compiler == "missing":
        env["CC"] = str(tmp_path / "no-such-cc")
    done = subprocess.run(
        [sys.executable, "-c", NO_HANDLERS_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    if compiler == "default":
        assert done.stdout.strip() == "loaded"
        assert any((tmp_path / "cache").glob("grad_norm-*.so"))
    else:
        assert "no-such-cc" in done.stdout


def test_the_compile_line_shows_once_logging_is_configured(tmp_path) -> None:
    """The documented way to see them: ``logging.basicConfig(level=logging.INFO)`` prints the
    fallback line on stderr, under the module's logger name."""
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from fused_core import grad_norm\n"
        "assert grad_norm.library() is None\n"
    )
    env = {**os.environ, native.DISABLE_ENV: "1", native.CACHE_ENV: str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "INFO:fused_core.native:fused-optim's C kernels grad_norm.c are not used, torch ops serve instead: "
        f"{native.DISABLE_ENV} is set\n"
    )


# ---------------------------------------------------------------------------------------------
# fused_core.kernels


def _fast(params, grads, state, hp, first_step) -> None:
    pass


def _portable(params, grads, state, hp, first_step) -> None:
    pass


def _declines(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype == torch.float64


def test_a_declined_launcher_is_logged_once_at_debug(caplog) -> None:
    """A CPU launcher whose predicate declines float32 leaves it to the any-device launcher: one DEBUG
    line under fused_core.kernels names both, once however often (or after re-registrations) the
    kernel resolves; nothing is logged where the preferred launcher accepts, or at INFO."""
    registry = KernelRegistry()
    registry.register("demo", "*", _portable, plugin="base")
    registry.register("demo", "cpu", _fast, dtypes=_declines, plugin="fast")
    cpu = torch.device("cpu")
    caplog.set_level(logging.INFO, logger=KERNELS_LOGGER)
    assert registry.resolve("demo", cpu, torch.float32) is _portable
    assert records(caplog, KERNELS_LOGGER) == []

    registry = KernelRegistry()
    registry.register("demo", "*", _portable, plugin="base")
    registry.register("demo", "cpu", _fast, dtypes=_declines, plugin="fast")
    caplog.set_level(logging.DEBUG, logger=KERNELS_LOGGER)
    for _ in range(2):
        assert registry.resolve("demo", cpu, torch.float32) is _portable
        assert registry.resolve("demo", cpu, torch.float64) is _fast
        registry.register("other", "*", _portable)  # clears the resolution cache
    [record] = records(caplog, KERNELS_LOGGER)
    assert record.levelno == logging.DEBUG
    here = __name__
    assert record.getMessage() == (
        f"kernel 'demo' on cpu with float32: {here}._portable (plugin base) serves, as {here}._fast "
        f"(dtype predicate {here}._declines) declined; KernelRegistry.explain() says more"
    )
