"""fp16, bf16 (and fp32, fp64) parameters against a float64 reference, on every kernel path that serves them.

Tolerance: the float64 reference never rounds, while the parameter is rounded to its
dtype after every step, so after k steps the gap is at most about k half-ulps of the
largest parameter; we allow k ulps (eps * max|p| per step), and also require that we
are no further from the reference than torch.optim.SGD in the same dtype is.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fused_core import registry
from fused_core.kernels import FP32_CHUNK, RunInfo
from fused_sgd import FusedSGD
from fused_sgd.kernels import (
    C_SOURCE,
    c_half_serves,
    c_library,
    fp32_native_fused_serves,
    native_fused_agrees,
    sgd_c_half,
    sgd_composite,
    sgd_native_fused,
    sgd_native_fused_fp32_chunks,
)
from fused_testing.native import require_library
from fused_testing.reference import ReferenceSGD, relative_error

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
HP = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False)
STEPS = 8
CPU = torch.device("cpu")


def _shapes(total: int) -> list[tuple[int, ...]]:
    """Several tensors adding up to ``total`` elements, one of them odd-sized."""
    return [(total - 1000 - 7 * 11,), (10, 100), (7, 11)]


def _fresh(shapes, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def _errors(optimizer_cls, dtype, total, seed=0, **extra):
    params = [p.requires_grad_() for p in _fresh(_shapes(total), dtype, seed)]
    reference = ReferenceSGD(params, **HP)
    optimizer = optimizer_cls(params, **HP, **extra)
    for step in range(STEPS):
        grads = _fresh([p.shape for p in params], dtype, seed + 100 + step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        reference.step(grads)
    return max(relative_error(p, r) for p, r in zip(params, reference.params))


@pytest.mark.parametrize("total", [4096, 4097, 100_003])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sgd_against_float64_reference(dtype: torch.dtype, total: int) -> None:
    ours = _errors(FusedSGD, dtype, total)
    torch_error = _errors(torch.optim.SGD, dtype, total, foreach=False)
    eps = torch.finfo(dtype).eps
    assert ours <= STEPS * eps, f"{dtype}: {ours:.3e} > {STEPS} ulps"
    assert ours <= torch_error + eps, f"{dtype}: ours {ours:.3e} vs torch.optim.SGD {torch_error:.3e}"


def _launcher_errors(launcher, dtype, numel, first_then_more=True):
    generator = torch.Generator().manual_seed(numel)
    p64, b64 = (torch.randn(numel, generator=generator, dtype=torch.float64) for _ in range(2))
    params, buf = p64.to(dtype), b64.to(dtype)
    ref = ReferenceSGD([params], **HP)
    for step in range(3):
        grad = torch.randn(numel, generator=generator, dtype=torch.float64).to(dtype)
        launcher(params, grad, {"momentum_buffer": buf}, HP, RunInfo.whole(params, first_step=step == 0))
        ref.step([grad])
    return relative_error(params, ref.params[0]) + relative_error(buf, ref.momentum_buffers[0])


LAUNCHERS = {
    sgd_composite: lambda device, dtype: True,
    sgd_native_fused: native_fused_agrees,
    sgd_native_fused_fp32_chunks: fp32_native_fused_serves,
    sgd_c_half: c_half_serves,
}
ROUTES = [(dtype, launcher) for dtype in DTYPES for launcher in LAUNCHERS]


MANY_CHUNKS = 1_200_007


def test_the_large_case_spans_several_chunks() -> None:
    assert MANY_CHUNKS > 2 * FP32_CHUNK


@pytest.mark.parametrize("numel", [4096, 4097, MANY_CHUNKS])
@pytest.mark.parametrize("dtype,launcher", ROUTES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_served_kernel_path(dtype: torch.dtype, launcher, numel: int) -> None:
    """Each launcher the registry may route a dtype to is right for that dtype on this torch
    (1,200,007 elements spans several chunks of the low-precision paths)."""
    routed = registry.kernels.entry("sgd", CPU, dtype).launcher
    if not LAUNCHERS[launcher](CPU, dtype):
        assert routed is not launcher, f"{launcher.__name__} is routed {dtype} although it does not serve it"
        return
    assert _launcher_errors(launcher, dtype, numel) <= 3 * 2 * torch.finfo(dtype).eps


def test_each_dtype_routes_to_the_most_specific_serving_launcher() -> None:
    FusedSGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # registers the plugin
    for dtype in DTYPES:
        serving = [
            launcher
            for launcher in (sgd_c_half, sgd_native_fused, sgd_native_fused_fp32_chunks)
            if LAUNCHERS[launcher](CPU, dtype)
        ]
        expected = serving[0] if serving else sgd_composite
        assert registry.kernels.entry("sgd", CPU, dtype).launcher is expected, dtype


# ----- the C kernel (sgd_c_half) against the composite, flag by flag -------------------------
FLAG_CASES = [
    dict(
        lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
    )
    for momentum in (0.0, 0.9)
    for dampening in ((0.0, 0.3) if momentum else (0.0,))
    for nesterov in ((False, True) if momentum and not dampening else (False,))
    for weight_decay in (0.0, 1e-2)
    for maximize in (False, True)
]
C_NUMEL = 200_003
"""Several 32,768-element pieces of the C kernel (so its OpenMP threads split them), odd length."""


def _c_and_composite(dtype: torch.dtype, hp: dict, poison: bool = False) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(len(str(hp)) + (7 if poison else 0))
    data = [torch.randn(C_NUMEL, generator=generator, dtype=torch.float64).to(dtype) for _ in range(3)]
    if poison:  # inf and NaN in parameters, gradients and momentum
        for tensor, values in zip(data, ((math.inf, 11), (math.nan, 77_777), (-math.inf, 199_999))):
            tensor[values[1]] = values[0]
        data[1][5] = -math.inf
    ours, theirs = [t.clone() for t in data], [t.clone() for t in data]
    for step in range(3):
        grad = torch.randn(C_NUMEL, generator=generator, dtype=torch.float64).to(dtype)
        if poison:
            grad[100_000] = math.nan
        sgd_c_half(ours[0], grad, {"momentum_buffer": ours[2]}, hp, RunInfo.whole(ours[0], first_step=step == 0))
        sgd_composite(
            theirs[0], grad, {"momentum_buffer": theirs[2]}, hp, RunInfo.whole(theirs[0], first_step=step == 0)
        )
    return ours, theirs


@pytest.mark.parametrize("hp", FLAG_CASES, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items() if k != "lr"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_c_kernel_matches_the_composite_for_every_flag_combination(dtype: torch.dtype, hp: dict) -> None:
    """Both compute in fp32 and round once: parameters and momentum agree within one ulp of the
    largest value (fused multiply-adds may round differently); the C kernel must be available
    wherever a C compiler is (CI has one)."""
    require_library(c_library(), C_SOURCE)
    assert c_half_serves(CPU, dtype)
    ours, theirs = _c_and_composite(dtype, hp)
    for mine, reference in zip(ours, theirs):
        assert relative_error(mine, reference) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_c_kernel_propagates_inf_and_nan_like_the_composite(dtype: torch.dtype) -> None:
    """inf and NaN in parameters, gradients and momentum end up in the same places, with the same signs."""
    require_library(c_library(), C_SOURCE)
    ours, theirs = _c_and_composite(dtype, FLAG_CASES[-1], poison=True)
    for mine, reference in zip(ours, theirs):
        assert torch.equal(mine.isnan(), reference.isnan())
        assert torch.equal(mine.isinf(), reference.isinf()) and torch.equal(mine[mine.isinf()], reference[mine.isinf()])
        finite = mine.isfinite()
        assert relative_error(mine[finite], reference[finite]) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_c_kernel_result_does_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    """The update is element-wise: one thread and torch's default give the same bits."""
    require_library(c_library(), C_SOURCE)
    hp = FLAG_CASES[-1]
    threads = torch.get_num_threads()
    results = []
    for count in (1, max(2, threads)):
        torch.set_num_threads(count)
        try:
            results.append(_c_and_composite(dtype, hp)[0])
        finally:
            torch.set_num_threads(threads)
    for one, many in zip(*results):
        assert torch.equal(one.view(torch.int16), many.view(torch.int16))


def test_without_a_compiler_low_precision_falls_back_to_torch_ops(tmp_path) -> None:
    """In a process where no C compiler works (CC points nowhere, empty cache), fp16/bf16 route to
    the torch-op launchers, clipping uses torch ops, and a training step still runs and says why."""
    script = """
import torch
from fused_core import gradients, grad_norm, native, registry
from fused_sgd import FusedSGD
from fused_sgd.kernels import C_SOURCE, fp32_native_fused_serves
cpu = torch.device("cpu")
p = torch.randn(5000, dtype=torch.bfloat16, requires_grad=True)
p.grad = torch.randn(5000, dtype=torch.bfloat16)
opt = FusedSGD([p], lr=0.1, momentum=0.9)
opt.clip_grad_norm_fused_(1.0)
opt.step()
for dtype in (torch.float16, torch.bfloat16):
    expected = "sgd_native_fused_fp32_chunks" if fp32_native_fused_serves(cpu, dtype) else "sgd_composite"
    assert registry.kernels.entry("sgd", cpu, dtype).launcher.__name__ == expected, dtype
    assert not grad_norm.serves(cpu, dtype)
assert "no-such-compiler" in native.unavailable_reason(C_SOURCE)
assert gradients.library() is None  # gradients are read from Python
print("fell back")
"""
    nowhere = str(tmp_path / "no-such-compiler")
    env = {**os.environ, "CC": nowhere, "CXX": nowhere, "FUSED_OPTIM_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("FUSED_OPTIM_DISABLE_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fell back" in done.stdout, done.stderr
    assert not any((tmp_path / "cache").glob("*.so"))
