"""Same bits whatever serves (issue 14, item 9): on the CPU, every launcher of a dtype gives the
bits of ``sgd_composite``, which are torch.optim.SGD(foreach=False)'s in fp32 and fp64.

Data-parallel replicas must not drift because one rank's C kernel did not build (the composite
serves there), was built with other flags (the portable set after ``-march=native`` failed), or
because torch's fused CPU op (whose rounding differs in a few elements per million) served one
path and the C kernel another. The cases are realistic in size (a million elements, several
steps) and cover momentum, dampening, Nesterov, weight decay and maximize.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fused_core import native, registry
from fused_core.kernels import GradSegments, RunInfo, segments_kernel
from fused_sgd import FusedSGD
from fused_sgd.kernels import (
    _C_SIGNATURE,
    C_SEGMENT_FUNCTIONS,
    C_SOURCE,
    c_flat_launcher,
    c_kernel_matches_composite,
    c_library,
    sgd_composite,
    sgd_native_fused,
    sgd_native_fused_fp32_chunks,
)
from fused_testing.native import c_compiler, require_library

CPU = torch.device("cpu")
NUMEL = 1_000_003
STEPS = 4
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
CASES = [
    dict(
        lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
    )
    for momentum, dampening, nesterov in ((0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.8, 0.3, False))
    for weight_decay in (0.0, 1e-2)
    for maximize in (False, True)
]
CASE_IDS = ["-".join(f"{k}={v}" for k, v in hp.items() if k != "lr") for hp in CASES]
SIGNATURES = {name: _C_SIGNATURE for name in C_SEGMENT_FUNCTIONS.values()}


def _data(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    params = torch.randn(NUMEL, generator=generator, dtype=torch.float64).to(dtype)
    grads = [torch.randn(NUMEL, generator=generator, dtype=torch.float64).to(dtype) for _ in range(STEPS)]
    return params, grads


def _run(launcher, dtype: torch.dtype, hp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters and momentum after STEPS steps of ``launcher`` (a flat launcher) on NUMEL elements."""
    params, grads = _data(dtype)
    buf = torch.zeros_like(params)
    for step, grad in enumerate(grads):
        launcher(params, grad, {"momentum_buffer": buf}, hp, RunInfo.whole(params, first_step=step == 0))
    return params, buf


def _segments(launcher):
    """A segment launcher seen as a flat one (one slot, the gradient where it lies)."""

    def flat(params, grads, state, hp, run):
        launcher(params, state, GradSegments.whole(grads, initialized=not run.first_step), hp)

    return flat


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(BITS[a.dtype]) != b.view(BITS[b.dtype])).sum())


def _assert_same_bits(got: tuple, want: tuple, what: str) -> None:
    for name, mine, theirs in zip(("params", "momentum"), got, want):
        assert _differing(mine, theirs) == 0, f"{what}: {_differing(mine, theirs)} of {NUMEL} {name} differ"


@pytest.mark.parametrize("hp", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_composite_over_flat_buffers_is_torch_sgd_bit_for_bit(dtype: torch.dtype, hp: dict) -> None:
    """torch.optim.SGD(foreach=False) over three parameters and sgd_composite over their flat
    concatenation give the same bits, parameters and momentum, step after step."""
    flat, grads = _data(dtype)
    sizes = [NUMEL - 1000 - 77, 1000, 77]
    params = [piece.clone().requires_grad_() for piece in flat.split(sizes)]
    optimizer = torch.optim.SGD(params, foreach=False, **hp)
    buf = torch.zeros_like(flat)
    for step, grad in enumerate(grads):
        for param, piece in zip(params, grad.split(sizes)):
            param.grad = piece.clone()
        optimizer.step()
        sgd_composite(flat, grad, {"momentum_buffer": buf}, hp, RunInfo.whole(flat, first_step=step == 0))
    theirs = torch.cat([p.detach() for p in params])
    assert _differing(flat, theirs) == 0, f"{_differing(flat, theirs)} of {NUMEL} parameters differ"
    if hp["momentum"]:
        momentum = torch.cat([optimizer.state[p]["momentum_buffer"] for p in params])
        assert _differing(buf, momentum) == 0, f"{_differing(buf, momentum)} of {NUMEL} momentum values differ"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], native.NativeLibrary]:
    """csrc/sgd.c built with each of fused_core.native.FLAG_SETS, unchecked (the test checks)."""
    if c_compiler() is None or os.environ.get(native.DISABLE_ENV):
        pytest.skip("no C compiler, or native kernels disabled")
    libraries = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(native.CACHE_ENV, str(tmp_path_factory.mktemp("sgd-builds")))
        for flags in native.FLAG_SETS:
            library = native.load_library(C_SOURCE, SIGNATURES, flag_sets=(flags,), extra=("-lm",))
            assert library is not None, native.unavailable_reason(C_SOURCE, flag_sets=(flags,))
            libraries[flags] = library
    return libraries


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_build_of_the_c_kernel_gives_the_composite_bits(builds, dtype: torch.dtype) -> None:
    """The C kernel built with each flag set (tuned for this CPU, portable with OpenMP, portable
    single-threaded) gives sgd_composite's bits, so a rank that fell back to the portable build, or
    to the composite, stays bit-identical to its peers."""
    for hp, case in zip(CASES, CASE_IDS):
        want = _run(sgd_composite, dtype, hp)
        for flags, library in builds.items():
            _assert_same_bits(_run(c_flat_launcher(library), dtype, hp), want, f"{dtype} {case} [{' '.join(flags)}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_launcher_the_registry_routes_gives_the_same_bits(dtype: torch.dtype) -> None:
    """The flat launcher and the segment launcher routed for a CPU dtype both give the composite's
    bits; torch's fused op is never routed there (torch 2.13's CPU op rounds one or two momentum
    values per million differently in these cases, in fp32 and fp64, so the flat path, which it
    served for fp32, drifted from the C kernel's segment path)."""
    FusedSGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # registers the plugin
    flat = registry.kernels.resolve("sgd", CPU, dtype)
    segments = registry.kernels.find(segments_kernel("sgd"), CPU, dtype)
    assert flat not in (sgd_native_fused, sgd_native_fused_fp32_chunks)
    launchers = {flat.__name__: flat}
    if segments is not None:
        launchers[segments.__name__] = _segments(segments)
    for hp, case in zip(CASES, CASE_IDS):
        want = _run(sgd_composite, dtype, hp)
        for name, launcher in launchers.items():
            _assert_same_bits(_run(launcher, dtype, hp), want, f"{dtype} {case} {name}")


RANK_SCRIPT = """
import sys, torch
from fused_core import native
if sys.argv[2] == "portable":  # a rank whose -march=native build failed
    native.load_library.__kwdefaults__["flag_sets"] = native.FLAG_SETS[1:]
from fused_sgd import FusedSGD
generator = torch.Generator().manual_seed(0)
shapes = [(1_000_003 - 4096 - 77,), (64, 64), (7, 11)]
params = [torch.randn(s, generator=generator).to(torch.bfloat16).requires_grad_() for s in shapes]
params += [torch.randn(s, generator=generator).requires_grad_() for s in shapes]
optimizer = FusedSGD(params, lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True)
for step in range(int(sys.argv[3])):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    optimizer.step()
    optimizer.zero_grad()
print(sorted({name for name in optimizer.launchers().values()}))
torch.save([p.detach() for p in params], sys.argv[1])
"""


def test_ranks_with_the_native_build_the_portable_build_or_no_c_kernel_stay_bit_identical(tmp_path) -> None:
    """Three 'ranks' train the same model (1M bf16 and 1M fp32 parameters, 50 steps, momentum,
    Nesterov, weight decay): one with the C kernels tuned for this CPU, one with the portable build,
    one with FUSED_OPTIM_DISABLE_NATIVE (torch ops). Their parameters agree bit for bit."""
    results = {}
    for rank in ("native", "portable", "disabled"):
        env = {**os.environ, native.CACHE_ENV: str(tmp_path / "cache")}
        env.pop(native.DISABLE_ENV, None)
        if rank == "disabled":
            env[native.DISABLE_ENV] = "1"
        out = tmp_path / f"{rank}.pt"
        done = subprocess.run(
            [sys.executable, "-c", RANK_SCRIPT, str(out), rank, "50"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[rank] = (done.stdout.strip(), torch.load(out))
    for rank in ("portable", "disabled"):
        for i, (mine, theirs) in enumerate(zip(results[rank][1], results["native"][1])):
            differ = _differing(mine, theirs)
            assert differ == 0, (
                f"{rank} vs native ({results[rank][0]} vs {results['native'][0]}): parameter {i} ({mine.dtype}):"
                f" {differ} of {mine.numel()} elements differ"
            )


def test_the_self_check_rejects_a_build_that_rounds_once_more(tmp_path, monkeypatch) -> None:
    """csrc/sgd.c with ``p - lr * d`` (two roundings) instead of ATen's fused multiply-add: within
    4 ulps of the composite, but not its bits. The load-time self-check rejects every build with a
    warning, and no library is cached."""
    require_library(c_library(), C_SOURCE)
    text = C_SOURCE.read_text()
    exact = "return (struct NAME##_out){FMA(d, -lr, p), b};"
    assert exact in text
    broken = tmp_path / "sgd.c"
    broken.write_text(text.replace(exact, "return (struct NAME##_out){p - d * lr, b};"))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.warns(native.NativeKernelWarning, match="self-check"):
        assert native.load_library(broken, SIGNATURES, extra=("-lm",), check=c_kernel_matches_composite) is None
    assert "self-check" in native.unavailable_reason(broken)
    assert list((tmp_path / "cache").iterdir()) == []
