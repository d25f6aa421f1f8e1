"""fused_testing's conformance suite (issue 16, item 2), run for FusedSGD and NpuFusedSGD.

The reference is ``torch.optim.SGD(foreach=False)``: bit for bit in fp32 and fp64; in fp16 and
bf16 no further from a float64 run of it than torch itself in that dtype. What the suite
covers is listed in :mod:`fused_testing.conformance`.

Known difference (strict xfails below): when a parameter's dtype changes between steps
(``model.to(dtype)``, ``model.half()``, ``p.data = p.data.double()``), torch.optim.SGD keeps the
momentum buffer in the dtype it was created in (fp32: then fp16 parameters keep an fp32
buffer, fp64 ones are updated from an fp32 one); FusedSGD rebuilds its flat buffers in the new
dtype and converts the buffer with them, so the values differ from the next step on::

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = FusedSGD([p], lr=0.1, momentum=0.9)  # or torch.optim.SGD(..., foreach=False)
    p.grad = torch.tensor([0.3, 0.7, -1.1]); opt.step()
    p.data = p.data.double()                   # what model.to(torch.float64) does
    p.grad = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64); opt.step()
    opt.state[p]["momentum_buffer"].dtype      # torch: float32; FusedSGD: float64
    p                                          # differs from torch's in the 9th digit

A round trip without a step in between (``model.to(torch.float64).to(torch.float32)``) is exact
and passes (``test_reallocation``).
"""

from __future__ import annotations

import functools

import pytest
import torch

from fused_core import InvalidHyperparameterError
from fused_sgd import FusedSGD, NpuFusedSGD
from fused_testing.conformance import OptimizerConformance

TORCH_SGD = functools.partial(torch.optim.SGD, foreach=False)
STATE_FOLLOWS_DTYPE = (
    "FusedSGD converts the momentum buffer to the parameters' new dtype when they change dtype "
    "between steps (model.to); torch.optim.SGD keeps the buffer's dtype (see this module's docstring)"
)


class TestFusedSGDConformance(OptimizerConformance):
    optimizer_cls = FusedSGD
    reference_cls = TORCH_SGD
    configs = {
        "plain": dict(lr=0.1),
        "momentum_wd": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
        "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "dampening_maximize": dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True),
    }
    state_keys = ("momentum_buffer",)
    exact_dtypes = (torch.float32, torch.float64)
    bad_hyperparameters = [
        (dict(lr=-1.0), ValueError),
        (dict(momentum=-0.5), ValueError),
        (dict(weight_decay=-1e-2), ValueError),
        (dict(momentum=0.0, nesterov=True), ValueError),
        (dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError),
        (dict(lr=float("nan")), InvalidHyperparameterError),
        (dict(lr="0.1"), InvalidHyperparameterError),
        (dict(differentiable=True), ValueError),
    ]
    expected_failures = {
        f"test_dtype_change[{name}]": STATE_FOLLOWS_DTYPE for name in ("momentum_wd", "nesterov", "dampening_maximize")
    }


class TestNpuFusedSGDConformance(OptimizerConformance):
    """torch_npu's signature: ``lr`` required, no ``maximize``; ``zero_grad()`` keeps zeroed gradients."""

    optimizer_cls = NpuFusedSGD
    reference_cls = TORCH_SGD
    configs = {
        "plain": dict(lr=0.1),
        "momentum_wd": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
        "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "dampening": dict(lr=0.1, momentum=0.5, dampening=0.3),
    }
    state_keys = ("momentum_buffer",)
    exact_dtypes = (torch.float32, torch.float64)
    zero_grad_set_to_none_default = False
    bad_hyperparameters = [
        (dict(lr=-1.0), ValueError),
        (dict(momentum=0.0, nesterov=True), (ValueError, TypeError)),
        (dict(maximize=True), TypeError),  # not in torch_npu's signature
    ]
    expected_failures = {
        f"test_dtype_change[{name}]": STATE_FOLLOWS_DTYPE for name in ("momentum_wd", "nesterov", "dampening")
    }


def test_npu_fused_sgd_requires_lr() -> None:
    """torch_npu's signature: ``lr`` has no default (the suite's configs always pass one)."""
    with pytest.raises((TypeError, ValueError), match="lr"):
        NpuFusedSGD([torch.nn.Parameter(torch.randn(3))])
