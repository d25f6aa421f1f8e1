"""fused_core.native: C sources compiled on first use, cached on disk and loaded through ctypes;
and csrc/fused_half.h's fp16/bf16 <-> fp32 block converters, which every C kernel's loads and
stores go through, checked bit for bit against torch's own conversions (``.float()`` and
``.to(dtype)``) over every 16-bit pattern, every rounding boundary and a million random fp32
patterns. tests/csrc/convert.c exports the converters.

The converters run from a library built with the default flags (on x86 with ``-march=native``
that is F16C for fp16 where the CPU has it, the scalar bit operations for the tails) and, on
x86_64, from one built with ``-mno-f16c``, where the scalar bit operations do every element.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_core import native
from fused_testing.native import c_compiler

CONVERT_C = Path(__file__).with_name("csrc") / "convert.c"
_CONVERTER = (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64])
LOADS = {torch.bfloat16: "bf16_to_f32", torch.float16: "fp16_to_f32"}
STORES = {torch.bfloat16: "f32_to_bf16", torch.float16: "f32_to_fp16"}
PAIRS = {"load": "bf16_pairs_to_f32", "store": "f32_to_bf16_pairs"}
"""fused_half.h's bf16 pairs, as converters: the same bits as the block converters are checked for."""
SIGNATURES = {name: _CONVERTER for name in (*LOADS.values(), *STORES.values(), *PAIRS.values())}
NO_F16C = ("-O3", "-mno-f16c")
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
TAIL = 7
"""Elements per call where each element must go through the scalar tail (fewer than one 8-wide F16C block)."""
BROKEN_C = "int broken(int x {\n    return x;\n}\n"
WAYS = pytest.mark.parametrize(
    ("dtype", "way"),
    [(torch.bfloat16, "block"), (torch.bfloat16, "pairs"), (torch.float16, "block")],
    ids=["bf16", "bf16-pairs", "fp16"],
)
"""Each 16-bit dtype through its block converters, and bf16 through the pairs too."""


def load_name(dtype: torch.dtype, way: str) -> str:
    return PAIRS["load"] if way == "pairs" else LOADS[dtype]


def store_name(dtype: torch.dtype, way: str) -> str:
    return PAIRS["store"] if way == "pairs" else STORES[dtype]


needs_compiler = pytest.mark.skipif(c_compiler() is None, reason="no C compiler ($CC, else cc) on PATH")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """native warns once per message per process (its ``_warned`` set): each test starts with none said,
    so a test's ``pytest.warns`` does not depend on which tests ran before it."""
    monkeypatch.setattr(native, "_warned", set())


def copy_source(tmp_path: Path, name: str, text: str | None = None) -> Path:
    """convert.c (or ``text``) under a fresh name: native._load caches per source path, so each copy builds anew."""
    source = tmp_path / f"{name}.c"
    source.write_text(CONVERT_C.read_text() if text is None else text)
    return source


def compiler_errors(source: Path) -> list[str]:
    """The error lines the compiler itself prints for ``source``, to find in native's messages."""
    done = subprocess.run(
        [*shlex.split(os.environ.get("CC") or "cc"), "-fsyntax-only", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0, f"{source} compiled"
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors, done.stderr
    return errors


# ---------------------------------------------------------------------------------------------
# The conversions


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(native.FLAG_SETS, id="default-flags"),
        pytest.param(
            (NO_F16C,),
            id="no-f16c",
            marks=pytest.mark.skipif(
                not X86_64, reason="-mno-f16c is an x86 flag: elsewhere the default build has no F16C path"
            ),
        ),
    ],
)
def converters(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> native.NativeLibrary:
    """convert.c built with one flag flavour into a private cache directory."""
    flag_sets = request.param
    with pytest.MonkeyPatch.context() as env:
        env.setenv(native.CACHE_ENV, str(tmp_path_factory.mktemp("native-cache")))
        env.delenv(native.DISABLE_ENV, raising=False)
        library = native.load_library(CONVERT_C, SIGNATURES, flag_sets=flag_sets)
    if library is None:
        reason = native.unavailable_reason(CONVERT_C, flag_sets=flag_sets)
        if c_compiler() is None:
            pytest.skip(f"no C compiler: {reason}")
        pytest.fail(f"convert.c did not build with {flag_sets}: {reason}")
    return library


def convert(
    library: native.NativeLibrary, name: str, src: torch.Tensor, out: torch.Tensor, piece: int | None = None
) -> torch.Tensor:
    """``name(src, out, n)`` over all of ``src``, in one call or in calls of ``piece`` elements."""
    assert src.is_contiguous() and out.is_contiguous() and src.numel() == out.numel()
    function = getattr(library.cdll, name)
    n = src.numel()
    step = n if piece is None else piece
    for start in range(0, n, max(step, 1)):
        function(
            src.data_ptr() + start * src.element_size(),
            out.data_ptr() + start * out.element_size(),
            min(step, n - start),
        )
    return out


def _hex(bits: int, width: int) -> str:
    return f"0x{bits & ((1 << width) - 1):0{width // 4}x}"


def assert_same_bits(
    inputs: torch.Tensor, got: torch.Tensor, want: torch.Tensor, bit_dtype: torch.dtype, what: str
) -> None:
    """``got`` equals ``want`` bit for bit, except that where ``want`` is NaN ``got`` need only be NaN.
    A failure lists the first differing elements as input -> want, got (bit patterns)."""
    got_bits, want_bits = got.view(bit_dtype), want.view(bit_dtype)
    same = (got_bits == want_bits) | (want.isnan() & got.isnan())
    bad = (~same).nonzero().flatten()
    if bad.numel():
        in_width, out_width = inputs.element_size() * 8, got.element_size() * 8
        in_bits = inputs.view(torch.int16 if in_width == 16 else torch.int32)
        lines = [
            f"  {_hex(int(in_bits[i]), in_width)} ({float(inputs[i])!r}): want {_hex(int(want_bits[i]), out_width)}"
            f" ({float(want[i])!r}), got {_hex(int(got_bits[i]), out_width)} ({float(got[i])!r})"
            for i in bad[:12].tolist()
        ]
        pytest.fail(f"{what}: {bad.numel()} of {same.numel()} elements differ:\n" + "\n".join(lines))


def poisoned(want: torch.Tensor, bit_dtype: torch.dtype) -> torch.Tensor:
    """An output buffer holding the complement of every expected pattern (never a match, never NaN
    where NaN is expected), so an element the converter skips cannot pass."""
    return want.view(bit_dtype).bitwise_not().view(want.dtype)


def all_patterns(dtype: torch.dtype) -> torch.Tensor:
    """All 65,536 values of a 16-bit ``dtype``, NaNs and infinities included."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int16).view(dtype)


def f32_from_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def exact_f32(values: torch.Tensor) -> torch.Tensor:
    """float64 ``values`` as float32, which must hold them exactly."""
    single = values.float()
    assert torch.equal(single.double(), values), "not exact in fp32"
    return single


def midpoints(dtype: torch.dtype) -> torch.Tensor:
    """The exact midpoints between consecutive non-negative finite values of ``dtype``, and between
    its largest value and the next value its exponent range lacks (the overflow threshold),
    in fp32 (exact: a midpoint needs one significand bit more than ``dtype`` has)."""
    finite = all_patterns(dtype).double()
    finite = finite[(finite >= 0) & finite.isfinite()].sort().values
    beyond = 2 * finite[-1:] - finite[-2:-1]  # largest + its ulp
    ladder = torch.cat([finite, beyond])
    return exact_f32((ladder[:-1] + ladder[1:]) / 2)


def boundaries(dtype: torch.dtype) -> torch.Tensor:
    """Where ``dtype``'s rounding changes regime, from torch.finfo: the largest value, the overflow
    threshold (largest + half an ulp: 65520 for fp16) and a value beyond it, the smallest normal,
    the largest and smallest subnormal, half the smallest subnormal (ties to zero) and one and a
    half of it (ties up to even); and fp32's own extremes, subnormals, infinity and NaNs (quiet,
    signalling, all ones)."""
    finfo = torch.finfo(dtype)
    smallest = finfo.tiny * finfo.eps
    _, exponent = math.frexp(finfo.max)
    ulp_of_max = 2.0 ** (exponent - 1) * finfo.eps
    points = [0.0, 1.0, finfo.max, finfo.max + ulp_of_max / 2, finfo.max + ulp_of_max * 3 / 4, finfo.tiny]
    points += [finfo.tiny - smallest, smallest, smallest / 2, smallest * 1.5, smallest / 4]
    own = exact_f32(torch.tensor(points, dtype=torch.float64))
    fp32 = f32_from_bits([0x7F7FFFFF, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F800000])
    nans = f32_from_bits([0x7FC00000, 0x7F800001, 0x7FA00000, 0x7FFFFFFF, 0x7FC00001])
    return torch.cat([own, fp32, nans])


def with_neighbours_and_signs(values: torch.Tensor) -> torch.Tensor:
    """``values``, their fp32 neighbours on either side, and all of them negated."""
    near = torch.cat([values, torch.nextafter(values, values.new_tensor(math.inf))])
    near = torch.cat([near, torch.nextafter(values, values.new_tensor(-math.inf))])
    return torch.cat([near, -near])


def odd_length(values: torch.Tensor) -> torch.Tensor:
    """``values`` cut to a length of 8k + 7, so that a vectorised loop leaves the longest scalar tail."""
    keep = values.numel() - (values.numel() - TAIL) % 8
    assert keep % 8 == TAIL and keep > values.numel() - 8
    return values[:keep].contiguous()


@WAYS
def test_load_every_pattern_matches_torch(converters, dtype, way) -> None:
    """Every 16-bit pattern loads to the fp32 pattern torch's ``.float()`` gives (NaN: some NaN), both
    in one call and in calls of 7 elements (all through the scalar tail, beside any F16C blocks)."""
    patterns = all_patterns(dtype)
    want = patterns.float()
    for piece in (None, TAIL):
        name = load_name(dtype, way)
        got = convert(converters, name, patterns.view(torch.int16), poisoned(want, torch.int32), piece)
        assert_same_bits(patterns, got, want, torch.int32, f"{name} {converters.flags} piece={piece}")


@WAYS
def test_store_matches_torch_rounding(converters, dtype, way, generator) -> None:
    """fp32 -> ``dtype`` rounds as torch's ``.to(dtype)`` does (nearest, ties to even; overflow to
    infinity; NaN to some NaN), bit for bit, over: the fp32 image of every ``dtype`` value, every
    midpoint between neighbours (the ties) and the overflow threshold, the regime boundaries,
    each with its fp32 neighbours and negated, and a million random fp32 bit patterns; in one
    call of odd length (vector blocks and a scalar tail)."""
    structured = torch.cat([all_patterns(dtype).float(), midpoints(dtype), boundaries(dtype)])
    random = torch.randint(-(1 << 31), 1 << 31, (1_000_000,), dtype=torch.int32, generator=generator)
    inputs = odd_length(torch.cat([with_neighbours_and_signs(structured), random.view(torch.float32)]))
    want = inputs.to(dtype)
    name = store_name(dtype, way)
    got = convert(converters, name, inputs, poisoned(want, torch.int16).view(torch.int16)).view(dtype)
    assert_same_bits(inputs, got, want, torch.int16, f"{name} {converters.flags}")


@WAYS
def test_store_boundaries_through_the_scalar_tail(converters, dtype, way) -> None:
    """The regime boundaries and the ties around them (with neighbours and signs), converted 7 at a time
    so that each goes through the scalar tail, round as torch's ``.to(dtype)`` does."""
    finfo = torch.finfo(dtype)
    near_edges = midpoints(dtype)
    near_edges = near_edges[(near_edges < 4 * finfo.tiny) | (near_edges > finfo.max / 4)]
    inputs = with_neighbours_and_signs(torch.cat([boundaries(dtype), near_edges]))
    want = inputs.to(dtype)
    name = store_name(dtype, way)
    got = convert(converters, name, inputs, poisoned(want, torch.int16).view(torch.int16), TAIL)
    assert_same_bits(inputs, got.view(dtype), want, torch.int16, f"{name} {converters.flags} piece={TAIL}")


def test_default_flags_load_where_a_compiler_is_found(tmp_path, monkeypatch) -> None:
    """With a C compiler on PATH, load_library with the default flag sets gives a library (a failure
    here is a failure, not a skip) that was built with one of them, and it converts."""
    if c_compiler() is None:
        pytest.skip("no C compiler ($CC, else cc) on PATH")
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, "convert_default_flags")
    library = native.load_library(source, SIGNATURES)
    assert library is not None, native.unavailable_reason(source)
    assert library.flags in native.FLAG_SETS
    patterns = all_patterns(torch.bfloat16)
    got = convert(library, "bf16_to_f32", patterns.view(torch.int16), torch.empty(patterns.shape))
    assert_same_bits(patterns, got, patterns.float(), torch.int32, f"bf16_to_f32 {library.flags}")


# ---------------------------------------------------------------------------------------------
# build


@needs_compiler
def test_build_writes_into_the_directory_once_per_flag_set(tmp_path, monkeypatch) -> None:
    """build puts the library in the given directory; asked again, it returns the same file without
    running the compiler (same mtime); another flag set is another file."""
    directory = tmp_path / "libs"
    path = native.build(CONVERT_C, ("-O1",), directory)
    assert path.parent == directory and path.is_file()
    mtime = path.stat().st_mtime_ns

    def no_compiler(*args, **kwargs):
        raise AssertionError(f"compiler run again: {args}")

    with monkeypatch.context() as patched:
        patched.setattr(native.subprocess, "run", no_compiler)
        assert native.build(CONVERT_C, ("-O1",), directory) == path
    assert path.stat().st_mtime_ns == mtime

    other = native.build(CONVERT_C, ("-O0",), directory)
    assert other.parent == directory and other.is_file() and other.name != path.name
    assert sorted(p.name for p in directory.iterdir()) == sorted([path.name, other.name])


@needs_compiler
def test_build_syntax_error_raises_with_the_compiler_output(tmp_path) -> None:
    """A source that does not compile raises RuntimeError carrying the compiler's error lines, and
    leaves no file behind."""
    source = copy_source(tmp_path, "broken", BROKEN_C)
    directory = tmp_path / "libs"
    with pytest.raises(RuntimeError) as raised:
        native.build(source, ("-O1",), directory)
    for line in compiler_errors(source):
        assert line in str(raised.value)
    assert list(directory.iterdir()) == []


def test_build_with_a_missing_compiler_raises(tmp_path, monkeypatch) -> None:
    """``$CC`` naming a program that does not exist raises RuntimeError naming it."""
    missing = tmp_path / "no-such-cc"
    monkeypatch.setenv("CC", str(missing))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        native.build(CONVERT_C, ("-O1",), tmp_path / "libs")


# ---------------------------------------------------------------------------------------------
# load_library


def test_load_library_disabled_by_env(tmp_path, monkeypatch) -> None:
    """With FUSED_OPTIM_DISABLE_NATIVE set, load_library returns None without compiling, and
    unavailable_reason names the variable."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    source = copy_source(tmp_path, "convert_disabled")
    assert native.unavailable_reason(source) is None
    assert native.load_library(source, SIGNATURES) is None
    reason = native.unavailable_reason(source)
    assert reason is not None and native.DISABLE_ENV in reason
    assert not cache.exists() or list(cache.iterdir()) == []


@needs_compiler
def test_load_library_broken_source_gives_none_and_the_compiler_error(tmp_path, monkeypatch) -> None:
    """A source that compiles with no flag set makes load_library return None with one warning (a
    compiler is there, so the toolchain or the source is broken), and unavailable_reason holds the
    compiler's error lines; the cache directory is left without files."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, "broken_load", BROKEN_C)
    with pytest.warns(native.NativeKernelWarning, match="broken_load.c are not used, torch ops serve instead") as said:
        assert native.load_library(source, {"broken": (ctypes.c_int, [ctypes.c_int])}) is None
    assert len(said) == 1
    reason = native.unavailable_reason(source)
    assert reason is not None
    for line in compiler_errors(source):
        assert line in reason
    assert list(cache.iterdir()) == []


@needs_compiler
def test_load_library_builds_in_the_cache_dir_env(tmp_path, monkeypatch) -> None:
    """FUSED_OPTIM_CACHE_DIR is where a fresh build goes (created if missing); the library carries its
    path and flags, converts, and a second load_library gives the same library."""
    cache = tmp_path / "cache" / "nested"
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    assert native.cache_dir() == cache
    source = copy_source(tmp_path, "convert_cache_env")
    library = native.load_library(source, SIGNATURES, flag_sets=[("-O1",)])
    assert library is not None, native.unavailable_reason(source, flag_sets=[("-O1",)])
    assert library.path.parent == cache and library.path.is_file() and library.flags == ("-O1",)
    assert [p.name for p in cache.iterdir()] == [library.path.name]
    assert native.load_library(source, SIGNATURES, flag_sets=[("-O1",)]).path == library.path
    values = torch.randn(1001, generator=torch.Generator().manual_seed(7))
    want = values.to(torch.float16)
    got = convert(library, "f32_to_fp16", values, torch.empty(values.shape, dtype=torch.int16)).view(torch.float16)
    assert_same_bits(values, got, want, torch.int16, "f32_to_fp16 -O1")


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="per-user temp dirs are a POSIX notion")
def test_build_falls_back_to_a_private_temp_dir(tmp_path, monkeypatch) -> None:
    """A cache dir that cannot be created (under a file): a warning naming it, and the library goes to a
    per-user temp dir closed to others (0700); one that others could write to is refused, not loaded from."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.warns(native.NativeKernelWarning, match="cannot be created") as said:
        path = native.build(CONVERT_C, ("-O1",), blocker / "cache")
    assert str(blocker / "cache") in str(said[0].message) and native.CACHE_ENV in str(said[0].message)
    assert path.parent == tmp_path / "tmp" / f"fused-optim-{os.getuid()}" and path.is_file()
    assert path.parent.stat().st_mode & 0o777 == 0o700

    path.parent.chmod(0o777)
    with pytest.raises(RuntimeError, match="not a private directory"):
        native.build(CONVERT_C, ("-O1",), blocker / "cache")


# ---------------------------------------------------------------------------------------------
# The cache: atomic, verified before load, in a directory only this user can write
# (issue 14, item 9). Each case failed against the cache as it was (plain files, pid-named temp
# files, no checks).

LOAD_SCRIPT = """
import os, socket, sys, time
from pathlib import Path
if len(sys.argv) > 2:  # containers or nodes: every rank has the same pid and hostname
    os.getpid = lambda: 1
    socket.gethostname = lambda: "node"
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
from fused_core import native
import ctypes
library = native.load_library(Path(sys.argv[1]), {"f32_to_bf16": (None, [ctypes.c_void_p] * 2 + [ctypes.c_int64])},
                              flag_sets=[("-O1",)])
assert library is not None, native.unavailable_reason(Path(sys.argv[1]), flag_sets=[("-O1",)])
x = (ctypes.c_float * 3)(1.0, 2.0, 3.0)
y = (ctypes.c_uint16 * 3)()
library.cdll.f32_to_bf16(x, y, 3)
assert list(y) == [0x3F80, 0x4000, 0x4040], list(y)
print(library.path)
"""


def _load_in_subprocess(source: Path, cache: Path, *args: str, wait: bool = True) -> subprocess.Popen | str:
    """Load ``source`` (-O1) in a fresh interpreter with ``cache`` as the cache dir; return the library path
    it printed (a crash, SIGBUS included, fails the test here instead of killing pytest)."""
    env = {**os.environ, native.CACHE_ENV: str(cache)}
    env.pop(native.DISABLE_ENV, None)
    command = [sys.executable, "-c", LOAD_SCRIPT, str(source), *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _finish(process) if wait else process


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"exit {process.returncode} (negative: killed by that signal): {err[-3000:]}"
    return out.strip()


def _sealed(path: Path) -> bool:
    data = path.read_bytes()
    return data[-64 - len(native.SEAL) : -64] == native.SEAL and native._is_sealed(path)


@needs_compiler
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "unsealed"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, damage) -> None:
    """A cached library cut short (a full disk, a killed copy), overwritten with garbage, empty, or
    written without a seal (an older version) is never dlopen-ed (a truncated one crashes the loader
    with SIGBUS): the next process rebuilds it and runs."""
    cache, source = tmp_path / "cache", copy_source(tmp_path, f"convert_{damage}")
    path = Path(_load_in_subprocess(source, cache))
    whole = path.read_bytes()
    assert _sealed(path)
    damaged = {
        "truncated": whole[: len(whole) // 2],
        "garbage": os.urandom(len(whole)),
        "empty": b"",
        "unsealed": whole[: -64 - len(native.SEAL)],
    }[damage]
    path.write_bytes(damaged)
    assert Path(_load_in_subprocess(source, cache)) == path
    assert _sealed(path) and path.read_bytes() != damaged


@needs_compiler
def test_ranks_with_one_pid_and_hostname_building_at_once_all_get_one_library(tmp_path) -> None:
    """Four processes with the same pid and hostname (containers, nodes sharing the cache dir) build
    into one cache dir at the same moment: all succeed, all load the same whole library, and no
    temp file is left behind."""
    cache, source, go = tmp_path / "cache", copy_source(tmp_path, "convert_ranks"), tmp_path / "go"
    processes = [_load_in_subprocess(source, cache, str(go), wait=False) for _ in range(4)]
    go.touch()
    paths = {_finish(process) for process in processes}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert _sealed(path) and [p.name for p in cache.iterdir()] == [path.name]


def _broken_compiler(tmp_path: Path, payload: str) -> str:
    """A ``$CC`` that exits 0 after writing ``payload`` (shell text) to its ``-o`` file."""
    script = tmp_path / "broken-cc"
    script.write_text(
        '#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ "$1" = -o ]; then out="$2"; fi; shift; done\n'
        f'printf "{payload}" > "$out"\n'
    )
    script.chmod(0o755)
    return str(script)


def test_garbage_from_a_broken_compiler_is_refused_and_not_cached(tmp_path, monkeypatch) -> None:
    """A compiler that 'succeeds' writing garbage: load_library warns, returns None (torch ops
    serve), says why, and leaves nothing in the cache for the next process to trust."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    monkeypatch.setenv("CC", _broken_compiler(tmp_path, "not an ELF file"))
    source = copy_source(tmp_path, "convert_garbage_cc")
    with pytest.warns(native.NativeKernelWarning, match="does not load"):
        assert native.load_library(source, SIGNATURES, flag_sets=[("-O1",), ("-O2",)]) is None
    reason = native.unavailable_reason(source, flag_sets=[("-O1",), ("-O2",)])
    assert reason is not None and reason.count("does not load") == 2
    assert list(cache.iterdir()) == []


MISSING_SYMBOL_C = """
int present(int x) { return x + 1; }
#ifdef WITH_ABSENT
int absent(int x) { return x + 2; }
#endif
"""


@needs_compiler
def test_a_library_without_an_expected_symbol_falls_back_with_a_warning(tmp_path, monkeypatch) -> None:
    """A build lacking one of the expected functions is rejected at load with a warning naming the
    symbol (not an AttributeError at every step) and removed from the cache; the next flag set,
    which has it, serves. With no flag set that has it, load_library returns None."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, "missing_symbol", MISSING_SYMBOL_C)
    signatures = {"present": (ctypes.c_int, [ctypes.c_int]), "absent": (ctypes.c_int, [ctypes.c_int])}
    flag_sets = [("-O1",), ("-O1", "-DWITH_ABSENT")]
    with pytest.warns(native.NativeKernelWarning, match="no symbol absent"):
        library = native.load_library(source, signatures, flag_sets=flag_sets)
    assert library is not None and library.flags == flag_sets[1]
    assert library.cdll.absent(1) == 3
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [library.path.name]

    other = copy_source(tmp_path, "missing_symbol_everywhere", MISSING_SYMBOL_C)
    with pytest.warns(native.NativeKernelWarning, match="no symbol absent"):
        assert native.load_library(other, signatures, flag_sets=flag_sets[:1]) is None
    assert "no symbol absent" in native.unavailable_reason(other, flag_sets=flag_sets[:1])


@needs_compiler
def test_a_failed_self_check_rejects_the_build_and_tries_the_next(tmp_path, monkeypatch) -> None:
    """load_library's ``check`` sees each loaded build; one it refuses is removed and the next flag set tried."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, "self_checked", MISSING_SYMBOL_C)
    signatures = {"present": (ctypes.c_int, [ctypes.c_int])}
    with pytest.warns(native.NativeKernelWarning, match="self-check"):
        library = native.load_library(source, signatures, flag_sets=[("-O0",), ("-O1",)], check=_refuses_o0)
    assert library is not None and library.flags == ("-O1",)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [library.path.name]


def _refuses_o0(library: native.NativeLibrary) -> bool:
    return library.flags != ("-O0",)


def _private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the temp fallback at a directory of this test; return where its per-user dir will be."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return tmp_path / "tmp" / f"fused-optim-{os.getuid()}"


def _deny_writes_to(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``directory`` read-only for this process (root writes anywhere, so it is told so as well)."""
    directory.chmod(0o500)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(
            native.os, "access", lambda path, mode, **kw: Path(path) != directory and real_access(path, mode, **kw)
        )


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="ownership and modes are POSIX notions")
@pytest.mark.parametrize("problem", ["group-writable", "world-writable", "read-only", "foreign", "a-file"])
def test_an_unsafe_or_unwritable_cache_dir_warns_and_kernels_stay_native(tmp_path, monkeypatch, problem) -> None:
    """A cache dir that others could write to (they could run code in this process), that belongs
    to another user, that cannot be written or created: a warning naming it and
    FUSED_OPTIM_CACHE_DIR, and the library is built in the private temp dir and loads (native
    kernels are not silently disabled); nothing is written into the unsafe directory."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if problem == "group-writable":
        cache.chmod(0o770)
    elif problem == "world-writable":
        cache.chmod(0o707)
    elif problem == "read-only":
        _deny_writes_to(cache, monkeypatch)
    elif problem == "foreign":
        if os.geteuid() != 0:
            pytest.skip("only root can give a directory to another user")
        os.chown(cache, 65534, 65534)
    else:
        cache.rmdir()
        cache.write_text("")
        cache = cache / "cache"
    private = _private_tmp(tmp_path, monkeypatch)
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, f"convert_{problem}")
    with pytest.warns(native.NativeKernelWarning) as caught:
        library = native.load_library(source, SIGNATURES, flag_sets=[("-O1",)])
    message = str(caught[0].message)
    assert str(cache) in message and native.CACHE_ENV in message and str(private) in message
    assert library is not None and library.path.parent == private
    assert private.stat().st_mode & 0o777 == 0o700
    assert not cache.is_dir() or list(cache.iterdir()) == []


@needs_compiler
def test_a_safe_cache_dir_gives_no_warning_and_is_created_private(tmp_path, monkeypatch) -> None:
    """The control: a fresh cache dir is created 0700 and used without a warning."""
    import warnings

    cache = tmp_path / "fresh"
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    source = copy_source(tmp_path, "convert_safe_dir")
    with warnings.catch_warnings():
        warnings.simplefilter("error", native.NativeKernelWarning)
        library = native.load_library(source, SIGNATURES, flag_sets=[("-O1",)])
    assert library is not None and library.path.parent == cache
    assert cache.stat().st_mode & 0o777 == 0o700


# ---------------------------------------------------------------------------------------------
# Self-checks of fused-core's own kernel libraries


@needs_compiler
def test_grad_norm_self_check_passes_for_the_real_kernels() -> None:
    from fused_core import grad_norm
    from fused_testing.native import require_library

    library = require_library(grad_norm.library(), grad_norm.SOURCE)
    assert grad_norm.kernels_agree_with_torch(library)


@needs_compiler
@pytest.mark.parametrize(
    "wrong",
    [("total += x[i] * x[i];", "total += x[i] * x[i] * 1.001f;"), ("x[i] *= c;", "x[i] *= c * 1.0000002f;")],
    ids=["sumsq", "scale"],
)
def test_grad_norm_self_check_rejects_a_wrong_kernel(tmp_path, monkeypatch, wrong) -> None:
    """csrc/grad_norm.c with a slightly wrong sum of squares (0.1 % too large) or scaling (by a
    coefficient two ulps off): every build fails the self-check on load, a warning says so, and clipping falls
    back to torch ops instead of trusting it."""
    from fused_core import grad_norm

    text = grad_norm.SOURCE.read_text()
    assert wrong[0] in text
    broken = tmp_path / "grad_norm.c"
    broken.write_text(text.replace(wrong[0], wrong[1]))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    monkeypatch.setattr(grad_norm, "SOURCE", broken)
    grad_norm.library.cache_clear()
    try:
        with pytest.warns(native.NativeKernelWarning, match="self-check"):
            assert grad_norm.library() is None
        assert not grad_norm.serves(torch.device("cpu"), torch.float32)
        assert "self-check" in native.unavailable_reason(broken)
        assert list((tmp_path / "cache").iterdir()) == []
    finally:
        grad_norm.library.cache_clear()


def test_gradient_reader_self_check_passes_where_it_loads() -> None:
    from fused_core import gradients

    library = gradients.library()
    if library is None:
        pytest.skip(f"no gradient reader: {native.unavailable_reason(gradients.SOURCE, flag_sets=gradients.FLAG_SETS)}")
    assert gradients.reads_like_torch(library)
