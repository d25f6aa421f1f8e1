"""Tests of the C kernels (:mod:`fused_core.native`): they must load wherever a C compiler is.

:func:`require_library` fails a test when a compiler is on PATH but the library did not load
(a real defect: CI has gcc), and skips it, saying so, only on a machine with no compiler or
with ``FUSED_OPTIM_DISABLE_NATIVE`` set, where the torch-op fallback is what runs and is
tested instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def c_compiler() -> str | None:
    """The program fused_core.native compiles with (``$CC``, else ``cc``), if it is on PATH."""
    words = shlex.split(os.environ.get("CC") or "cc")
    return shutil.which(words[0]) if words else None


def require_library(library: T | None, source: Path) -> T:
    """``library`` (a loaded :class:`fused_core.native.NativeLibrary`), or fail/skip as above."""
    if library is not None:
        return library
    from fused_core import native

    reason = native.unavailable_reason(source)
    if c_compiler() is None or os.environ.get(native.DISABLE_ENV):
        pytest.skip(f"no C kernel to test: {reason}")
    pytest.fail(f"C kernel {source.name} did not load although a compiler is on PATH: {reason}")
