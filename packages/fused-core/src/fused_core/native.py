"""C kernels compiled on first use, cached on disk and called through ``ctypes``.

A plugin ships a C source beside its Python code and asks :func:`load_library` for it.
The first call on a machine compiles it with the system C compiler (``$CC``, else ``cc``)
into a shared library in the cache directory, under a name that hashes the source, the
headers of :data:`INCLUDE_DIR`, the compiler command, the flags and the CPU's features;
later calls, in this process or another, load that file. Flags are tried in the order of
:data:`FLAG_SETS` (tuned for this CPU first, then portable).

The cache is shared by every process of the user, on this machine or (on a shared file system)
on others, so it is written atomically and read with suspicion:

* each build compiles into a temp file of its own (host, pid and a random part in the name),
  appends a seal (the SHA-256 of the bytes before it; the dynamic loader ignores trailing bytes)
  and renames it into place: a reader sees a whole library or none;
* a cached file whose seal does not match (truncated, overwritten, from an older version) is
  never ``dlopen``-ed (a truncated library crashes the loader with SIGBUS), it is rebuilt;
* a library that does not load, lacks one of the expected symbols or fails its caller's
  self-check is removed from the cache and the next flag set is tried, with a
  :class:`NativeKernelWarning`;
* the cache directory must belong to this user and be closed to group and others (whoever can
  write it can run code in this process); where it is not, or cannot be written, the library
  goes to a private per-user temp directory, with a warning naming the directory.

Nothing here is required: where no compiler works, the library does not load, or
``FUSED_OPTIM_DISABLE_NATIVE`` is set, :func:`load_library` returns None and
:func:`unavailable_reason` says why, and the plugin's kernel registration falls back to
torch ops (its dtype predicate says no). The C headers in :data:`INCLUDE_DIR`
(``fused_half.h``: fp16/bf16 <-> fp32 conversions; ``fused_segments.h``: the slot table;
``fused_sqrt.h``: torch's CPU square root, MKL's where torch has it) are on every compilation's
include path.
ctypes releases the GIL for the duration of each call.

What happens is logged through the standard ``logging`` module, to the logger
``fused_core.native``; silent by default (logging's last-resort handler shows warnings and
errors only, and this module logs nothing above INFO):

* INFO, once per compilation: the source, the compiler command and flags, the wall time of the
  compile and the cached library it went to;
* INFO, once per source and flag sets in a process: why C kernels are not used (no compiler,
  ``FUSED_OPTIM_DISABLE_NATIVE``, no build that loads and passes its self-check), or that they
  were built with a later flag set because earlier ones failed;
* DEBUG: a library loaded from the cache, and each flag set's failure.

Problems that need a person (a rejected build, a broken toolchain, an unsafe cache directory)
are :class:`NativeKernelWarning` s as well.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DISABLE_ENV = "FUSED_OPTIM_DISABLE_NATIVE"
"""Set (to anything non-empty), no C kernel is built or loaded: torch ops do their work."""
CACHE_ENV = "FUSED_OPTIM_CACHE_DIR"
"""Where compiled libraries are kept, instead of the user's cache directory."""
INCLUDE_DIR = Path(__file__).with_name("csrc")
"""fused-core's C headers (``fused_half.h``, ``fused_segments.h``, ``fused_sqrt.h``), on the include
path of every compilation."""
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),
    ("-O3", "-fopenmp", "-ffp-contract=off"),
    ("-O3", "-ffp-contract=off"),
)
"""Tried in order. With ``-fopenmp`` the library needs ``libgomp.so.1``, which torch's Linux
wheels have loaded already: the dynamic loader reuses it, so a kernel's OpenMP threads are
torch's intra-op threads. ``-ffp-contract=off``: the kernels round where they say (explicit
``fma`` where ATen fuses, separate roundings elsewhere), so every flag set gives the same bits;
the compiler may not fuse a multiply and an add of its own accord where the CPU has FMA."""
COMPILE_TIMEOUT_S = 120
SEAL = b"\nfused-optim sha256 "
"""Precedes the hex SHA-256 of the library's bytes at the end of every cached library."""
_SEAL_SIZE = len(SEAL) + 64

Signature = tuple[Any, Sequence[Any]]
"""``(restype, argtypes)`` of one exported C function, in ctypes types."""


class NativeKernelWarning(RuntimeWarning):
    """A C kernel library was rejected, or the cache directory is unsafe: torch ops or another build serve."""


@dataclass(frozen=True)
class NativeLibrary:
    """A loaded kernel library: the ctypes handle, the file and the flags it was built with."""

    cdll: ctypes.CDLL
    path: Path
    flags: tuple[str, ...]


SelfCheck = Callable[[NativeLibrary], bool]
"""Runs a freshly loaded library's kernels on a small probe and says whether they are right."""
FlagSets = tuple[tuple[str, ...], ...]
_reasons: dict[tuple[str, FlagSets], str] = {}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, NativeKernelWarning, stacklevel=3)


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


def _unsafe(directory: Path) -> str | None:
    """Why ``directory`` may not hold libraries this process loads (None if it may).

    Anyone who can write it can replace a library and so run code in this process: it must be
    this user's, not writable by group or others, and writable by us."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = directory.stat()
    except OSError as error:
        return f"cannot be created ({error})"
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and status.st_uid != uid:
        return f"belongs to uid {status.st_uid}, not to this user (uid {uid})"
    if uid is not None and status.st_mode & 0o022:
        return f"is writable by group or others (mode {status.st_mode & 0o777:o})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def _private_temp_dir() -> Path:
    """A per-user directory under the system's temp dir, for when the cache dir is unusable.

    It must be ours and closed to others, as the cache dir: a library found there is loaded into the process.
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    directory = Path(tempfile.gettempdir()) / f"fused-optim-{uid if uid is not None else 'user'}"
    problem = _unsafe(directory)
    if problem is not None:
        raise RuntimeError(f"{directory} is not a private directory of this user ({problem}); set {CACHE_ENV}")
    return directory


def _usable_dir(directory: Path) -> Path:
    """``directory`` if it is safe to build into and load from, else the private temp dir (warning once)."""
    problem = _unsafe(directory)
    if problem is None:
        return directory
    fallback = _private_temp_dir()
    _warn_once(
        f"fused-optim's kernel cache {directory} {problem}; using {fallback} instead. "
        f"Set {CACHE_ENV} to a directory of this user that group and others cannot write (chmod go-w)."
    )
    return fallback


def _is_sealed(path: Path) -> bool:
    """Whether ``path`` is a whole library as :func:`build` wrote it (its seal matches its bytes)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    body, seal = data[:-_SEAL_SIZE], data[-_SEAL_SIZE:]
    return seal.startswith(SEAL) and hashlib.sha256(body).hexdigest().encode() == seal[len(SEAL) :]


def _seal(path: Path) -> None:
    with open(path, "r+b") as file:
        body = file.read()
        file.write(SEAL + hashlib.sha256(body).hexdigest().encode())
        file.flush()
        os.fsync(file.fileno())


def build(source: Path, flags: Sequence[str], directory: Path | None = None, extra: Sequence[str] = ()) -> Path:
    """Compile ``source`` with ``flags`` (then ``extra``: include and link arguments) into the cache
    (unless a sealed copy is there already) and return the library's path.

    The compiler writes a temp file named for this host, process and a random UUID (ranks on several
    nodes or containers may share the directory and a pid), which is sealed and renamed into place.
    A cached file whose seal does not match is rebuilt. An unsafe or unwritable ``directory`` is
    replaced by a private temp dir, with a warning. Raises ``RuntimeError`` with the compiler's
    output on failure.
    """
    directory = _usable_dir(cache_dir() if directory is None else directory)
    target = _library_path(source, flags, directory, extra)
    if _is_sealed(target):
        logger.debug("%s: cached build with %s at %s", source, " ".join(flags), target)
        return target
    private = target.with_name(f"{target.stem}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    command = [*_compiler(source), *flags, "-shared", "-fPIC", f"-I{INCLUDE_DIR}", "-o", str(private), str(source)]
    command += extra
    try:
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as error:
            raise RuntimeError(f"{shlex.join(command)}: {error}") from error
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        _seal(private)
        os.replace(private, target)
    finally:
        private.unlink(missing_ok=True)
    logger.info(
        "compiled %s with %s in %.2f s into %s", source, shlex.join([*_compiler(source), *flags]), seconds, target
    )
    return target


def _no_compiler(source: Path) -> str | None:
    """Why no compiler can build ``source`` ('cc' is not on PATH, say), or None where it is there."""
    words = _compiler(source)
    if words and shutil.which(words[0]) is not None:
        return None
    variable = "CXX" if source.suffix == ".cpp" else "CC"
    if os.environ.get(variable):
        return f"no compiler: ${variable} ({words[0] if words else ''!r}) is neither an executable file nor on PATH"
    return f"no compiler: {words[0]!r} is not on PATH (${variable} chooses another)"


def _open(path: Path, flags: tuple[str, ...], python_api: bool, signatures: tuple) -> NativeLibrary:
    """Load the sealed library at ``path`` and apply ``signatures``; RuntimeError if it is not whole,
    does not load or lacks a symbol."""
    if not _is_sealed(path):
        raise RuntimeError(f"{path} changed after it was built (its seal does not match)")
    try:
        cdll = (ctypes.PyDLL if python_api else ctypes.CDLL)(str(path))
    except OSError as error:
        raise RuntimeError(f"{path} does not load: {error}") from error
    for name, restype, argtypes in signatures:
        try:
            function = getattr(cdll, name)
        except AttributeError:
            raise RuntimeError(f"{path} has no symbol {name}") from None
        function.restype, function.argtypes = restype, list(argtypes)
    return NativeLibrary(cdll, path, flags)


@functools.cache
def _load(
    source: str,
    flag_sets: FlagSets,
    extra: tuple[str, ...],
    python_api: bool,
    signatures: tuple,
    check: SelfCheck | None,
) -> NativeLibrary | None:
    failures, failed_flags, rejected = [], [], False
    for flags in flag_sets:
        try:
            path = build(Path(source), flags, extra=extra)
        except (RuntimeError, OSError) as error:
            failures.append(f"[{' '.join(flags)}] {error}")
            failed_flags.append(" ".join(flags))
            logger.debug("%s does not build with %s: %s", source, " ".join(flags), error)
            continue
        try:
            library = _open(path, flags, python_api, signatures)
            if check is not None and not check(library):
                raise RuntimeError(f"{path} failed its self-check (its kernels disagree with torch ops)")
        except (RuntimeError, OSError, ValueError, TypeError) as error:
            # Never leave a library that failed here in the cache for the next process to trust.
            path.unlink(missing_ok=True)
            failures.append(f"[{' '.join(flags)}] {error}")
            failed_flags.append(" ".join(flags))
            rejected = True
            _warn_once(f"fused-optim rejected its C kernels {path.name} built with {' '.join(flags)}: {error}")
            continue
        if failed_flags:
            logger.info(
                "fused-optim's C kernels %s fall back to flags %s, as %s failed (DEBUG lines say why)",
                Path(source).name,
                " ".join(flags),
                ", ".join(f"[{failed}]" for failed in failed_flags),
            )
        return library
    reason = "; ".join(failures) or "no flags to build with"
    _reasons[(source, flag_sets)] = reason
    missing = None if rejected else _no_compiler(Path(source))
    if not rejected and missing is None:
        # A compiler is there, so this is a broken toolchain, not a machine without one.
        _warn_once(f"fused-optim's C kernels {Path(source).name} are not used, torch ops serve instead: {reason}")
    logger.info(
        "fused-optim's C kernels %s are not used, torch ops serve instead: %s", Path(source).name, missing or reason
    )
    return None


def load_library(
    source: Path,
    signatures: Mapping[str, Signature],
    *,
    flag_sets: Sequence[Sequence[str]] = FLAG_SETS,
    extra: Sequence[str] = (),
    python_api: bool = False,
    check: SelfCheck | None = None,
) -> NativeLibrary | None:
    """The compiled ``source`` with ``signatures`` applied, or None where it cannot be had.

    ``extra`` arguments follow the flags on the command line (include paths, libraries) and are
    part of the cache key. ``python_api=True`` loads the library with ``ctypes.PyDLL``: its
    functions run with the GIL held, for code that may touch Python objects (freeing a tensor can).
    Otherwise ctypes releases the GIL for the duration of each call.

    Every name of ``signatures`` must be exported, and ``check`` (a function of the loaded
    library, hashable: a module-level function) must return True, or the build is rejected, removed
    from the cache and the next flag set is tried; a kernel library's ``check`` compares its
    kernels with torch ops on a small probe. Built, loaded and checked once per process and set of
    flags; :func:`unavailable_reason` says why not. A launcher keeps the result
    (``functools.cache`` on its accessor) instead of calling this every step.
    """
    frozen: FlagSets = tuple(tuple(flags) for flags in flag_sets)
    if os.environ.get(DISABLE_ENV):
        key, reason = (str(source), frozen), f"disabled by {DISABLE_ENV}"
        if _reasons.get(key) != reason:  # said once per process, as the other reasons (load_library is asked again)
            logger.info(
                "fused-optim's C kernels %s are not used, torch ops serve instead: %s is set", source.name, DISABLE_ENV
            )
        _reasons[key] = reason
        return None
    frozen_signatures = tuple((name, restype, tuple(argtypes)) for name, (restype, argtypes) in signatures.items())
    return _load(str(source), frozen, tuple(extra), python_api, frozen_signatures, check)


def unavailable_reason(source: Path, *, flag_sets: Sequence[Sequence[str]] = FLAG_SETS) -> str | None:
    """Why :func:`load_library` returned None for ``source`` (None if it has not, or was not asked)."""
    return _reasons.get((str(source), tuple(tuple(flags) for flags in flag_sets)))
