"""C kernels compiled on first use, cached on disk and called through ``ctypes``.

A plugin ships a C source beside its Python code and asks :func:`load_library` for it.
The first call on a machine compiles it with the system C compiler (``$CC``, else ``cc``)
into a shared library in the cache directory, under a name that hashes the source, the
headers of :data:`INCLUDE_DIR`, the compiler command, the flags and the CPU's features;
later calls, in this process or another, load that file. Flags are tried in the order of
:data:`FLAG_SETS` (tuned for this CPU first, then portable).

Nothing here is required: where no compiler works, the library does not load, or
``FUSED_OPTIM_DISABLE_NATIVE`` is set, :func:`load_library` returns None and
:func:`unavailable_reason` says why, and the plugin's kernel registration falls back to
torch ops (its dtype predicate says no). The C headers in :data:`INCLUDE_DIR`
(``fused_half.h``: fp16/bf16 <-> fp32 conversions) are on every compilation's include path.
ctypes releases the GIL for the duration of each call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DISABLE_ENV = "FUSED_OPTIM_DISABLE_NATIVE"
"""Set (to anything non-empty), no C kernel is built or loaded: torch ops do their work."""
CACHE_ENV = "FUSED_OPTIM_CACHE_DIR"
"""Where compiled libraries are kept, instead of the user's cache directory."""
INCLUDE_DIR = Path(__file__).with_name("csrc")
"""fused-core's C headers (``fused_half.h``), on the include path of every compilation."""
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
"""Tried in order. With ``-fopenmp`` the library needs ``libgomp.so.1``, which torch's Linux
wheels have loaded already: the dynamic loader reuses it, so a kernel's OpenMP threads are
torch's intra-op threads."""
COMPILE_TIMEOUT_S = 120

Signature = tuple[Any, Sequence[Any]]
"""``(restype, argtypes)`` of one exported C function, in ctypes types."""


@dataclass(frozen=True)
class NativeLibrary:
    """A loaded kernel library: the ctypes handle, the file and the flags it was built with."""

    cdll: ctypes.CDLL
    path: Path
    flags: tuple[str, ...]


FlagSets = tuple[tuple[str, ...], ...]
_reasons: dict[tuple[str, FlagSets], str] = {}


def cache_dir() -> Path:
    """Where compiled libraries live: ``$FUSED_OPTIM_CACHE_DIR``, else the user's cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused-optim"


def _cpu_identity() -> str:
    """The CPU's architecture and feature flags: a library built with ``-march=native`` is only for such a CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags.strip()}"


def _compiler(source: Path) -> list[str]:
    """``$CXX`` (else ``c++``) for a ``.cpp`` source, ``$CC`` (else ``cc``) for C."""
    if source.suffix == ".cpp":
        return shlex.split(os.environ.get("CXX") or "c++")
    return shlex.split(os.environ.get("CC") or "cc")


def _library_path(source: Path, flags: Sequence[str], directory: Path, extra: Sequence[str] = ()) -> Path:
    digest = hashlib.sha256()
    for part in (source.read_bytes(), *(h.read_bytes() for h in sorted(INCLUDE_DIR.glob("*.h")))):
        digest.update(part)
    digest.update(repr((_compiler(source), tuple(flags), tuple(extra), _cpu_identity())).encode())
    return directory / f"{source.stem}-{digest.hexdigest()[:20]}.so"


def _private_temp_dir() -> Path:
    """A per-user directory under the system's temp dir, for when the cache dir cannot be created.

    It must be ours and closed to others: a library found there is loaded into the process.
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    directory = Path(tempfile.gettempdir()) / f"fused-optim-{uid if uid is not None else 'user'}"
    directory.mkdir(mode=0o700, exist_ok=True)
    status = directory.stat()
    if uid is not None and (status.st_uid != uid or status.st_mode & 0o022):
        raise RuntimeError(f"{directory} is not a private directory of this user; set {CACHE_ENV}")
    return directory


def build(source: Path, flags: Sequence[str], directory: Path | None = None, extra: Sequence[str] = ()) -> Path:
    """Compile ``source`` with ``flags`` (then ``extra``: include and link arguments) into the cache
    (unless it is there already) and return the library's path.

    Concurrent builds (several ranks starting at once) each write a private file and
    rename it into place. Raises ``RuntimeError`` with the compiler's output on failure.
    """
    directory = cache_dir() if directory is None else directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = _private_temp_dir()
    target = _library_path(source, flags, directory, extra)
    if target.exists():
        return target
    private = target.with_name(f"{target.stem}.{os.getpid()}.tmp.so")
    command = [*_compiler(source), *flags, "-shared", "-fPIC", f"-I{INCLUDE_DIR}", "-o", str(private), str(source)]
    command += extra
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"{shlex.join(command)}: {error}") from error
    if done.returncode != 0:
        private.unlink(missing_ok=True)
        raise RuntimeError(f"{shlex.join(command)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    os.replace(private, target)
    return target


@functools.cache
def _load(source: str, flag_sets: FlagSets, extra: tuple[str, ...], python_api: bool) -> NativeLibrary | None:
    failures = []
    loader = ctypes.PyDLL if python_api else ctypes.CDLL
    for flags in flag_sets:
        try:
            path = build(Path(source), flags, extra=extra)
            return NativeLibrary(loader(str(path)), path, flags)
        except (RuntimeError, OSError) as error:
            failures.append(f"[{' '.join(flags)}] {error}")
    _reasons[(source, flag_sets)] = "; ".join(failures) or "no flags to build with"
    return None


def load_library(
    source: Path,
    signatures: Mapping[str, Signature],
    *,
    flag_sets: Sequence[Sequence[str]] = FLAG_SETS,
    extra: Sequence[str] = (),
    python_api: bool = False,
) -> NativeLibrary | None:
    """The compiled ``source`` with ``signatures`` applied, or None where it cannot be had.

    ``extra`` arguments follow the flags on the command line (include paths, libraries) and are
    part of the cache key. ``python_api=True`` loads the library with ``ctypes.PyDLL``: its
    functions run with the GIL held, for code that may touch Python objects (freeing a tensor can).
    Otherwise ctypes releases the GIL for the duration of each call.

    Built and loaded once per process and set of flags; :func:`unavailable_reason` says why not.
    Each call checks ``FUSED_OPTIM_DISABLE_NATIVE`` and sets the signatures again (a few µs):
    a launcher keeps the result (``functools.cache`` on its accessor) instead of calling this
    every step.
    """
    frozen: FlagSets = tuple(tuple(flags) for flags in flag_sets)
    if os.environ.get(DISABLE_ENV):
        _reasons[(str(source), frozen)] = f"disabled by {DISABLE_ENV}"
        return None
    library = _load(str(source), frozen, tuple(extra), python_api)
    if library is not None:
        for name, (restype, argtypes) in signatures.items():
            function = getattr(library.cdll, name)
            function.restype, function.argtypes = restype, list(argtypes)
    return library


def unavailable_reason(source: Path, *, flag_sets: Sequence[Sequence[str]] = FLAG_SETS) -> str | None:
    """Why :func:`load_library` returned None for ``source`` (None if it has not, or was not asked)."""
    return _reasons.get((str(source), tuple(tuple(flags) for flags in flag_sets)))
