"""fp16, bf16 (and fp32, fp64) parameters against a float64 reference, on every kernel path that serves them.

Tolerance: the float64 reference never rounds, while the parameter is rounded to its
dtype after every step, so after k steps the gap is at most about k half-ulps of the
largest parameter; we allow k ulps (eps * max|p| per step), and also require that we
are no further from the reference than torch.optim.SGD in the same dtype is.
"""

from __future__ import annotations

import pytest
import torch

from fused_core import registry
from fused_core.kernels import FP32_CHUNK
from fused_sgd import FusedSGD
from fused_sgd.kernels import (
    fp32_native_fused_serves,
    native_fused_agrees,
    sgd_composite,
    sgd_native_fused,
    sgd_native_fused_fp32_chunks,
)
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
        launcher(params, grad, {"momentum_buffer": buf}, HP, step == 0)
        ref.step([grad])
    return relative_error(params, ref.params[0]) + relative_error(buf, ref.momentum_buffers[0])


LAUNCHERS = {
    sgd_composite: lambda device, dtype: True,
    sgd_native_fused: native_fused_agrees,
    sgd_native_fused_fp32_chunks: fp32_native_fused_serves,
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
            launcher for launcher in (sgd_native_fused, sgd_native_fused_fp32_chunks) if LAUNCHERS[launcher](CPU, dtype)
        ]
        expected = serving[0] if serving else sgd_composite
        assert registry.kernels.entry("sgd", CPU, dtype).launcher is expected, dtype
