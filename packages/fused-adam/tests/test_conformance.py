"""fused_testing's conformance suite, run for FusedAdam, FusedAdamW, NpuFusedAdam and NpuFusedAdamW.

The references are ``torch.optim.Adam(foreach=False)`` and ``torch.optim.AdamW(foreach=False)``: bit
for bit in fp32 (under ``FUSED_OPTIM_TORCH_SQRT``, see conftest.py) and fp64; in fp16 and bf16 no
further from a float64 run than torch itself in that dtype. The ``...DefaultSqrt`` classes run the
suite again as users run it, with fp32's correctly rounded square root: fp32 within ``rtol`` 1e-6 of
torch's for-loop (whose MKL root is 1 ulp off on some values), and no further from a float64 run than
torch (``test_low_precision`` over fp32 too). What the suite covers is listed in
:mod:`fused_testing.conformance`.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW, NpuFusedAdam, NpuFusedAdamW
from fused_core import InvalidHyperparameterError
from fused_testing.conformance import OptimizerConformance

TORCH_ADAM = functools.partial(torch.optim.Adam, foreach=False)
TORCH_ADAMW = functools.partial(torch.optim.AdamW, foreach=False)
STATE_FOLLOWS_DTYPE = (
    "fused optimizers convert their state to the parameters' new dtype when they change dtype "
    "between steps (model.to); torch.optim keeps each state tensor's dtype (docs/migration.md)"
)
BAD = [
    (dict(lr=-1.0), ValueError),
    (dict(eps=-1e-8), ValueError),
    (dict(betas=(1.0, 0.999)), ValueError),
    (dict(betas=(0.9, -0.1)), ValueError),
    (dict(weight_decay=-1e-2), ValueError),
    (dict(lr=float("nan")), InvalidHyperparameterError),
    (dict(lr="0.1"), InvalidHyperparameterError),
]
SHARED = dict(
    state_keys=("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    exact_dtypes=(torch.float32, torch.float64),
    second_group={"lr": 1e-3, "amsgrad": True},
)


def configs(weight_decay: float) -> dict[str, dict]:
    return {
        "plain": dict(lr=1e-2),
        "wd": dict(lr=1e-2, weight_decay=weight_decay),
        "amsgrad_maximize": dict(lr=5e-3, betas=(0.8, 0.99), weight_decay=weight_decay, amsgrad=True, maximize=True),
        "tensor_lr": dict(lr=torch.tensor(1e-2), eps=1e-6, weight_decay=weight_decay),
    }


def dtype_change(names) -> dict[str, str]:
    return {f"test_dtype_change[{name}]": STATE_FOLLOWS_DTYPE for name in names}


class TestFusedAdamConformance(OptimizerConformance):
    optimizer_cls = FusedAdam
    reference_cls = TORCH_ADAM
    configs = configs(1e-2)
    bad_hyperparameters = [*BAD, (dict(differentiable=True), ValueError), (dict(capturable=True), ValueError)]
    expected_failures = dtype_change(configs)
    locals().update(SHARED)


class TestFusedAdamWConformance(OptimizerConformance):
    optimizer_cls = FusedAdamW
    reference_cls = TORCH_ADAMW
    configs = configs(1e-1)
    bad_hyperparameters = [*BAD, (dict(differentiable=True), ValueError)]
    expected_failures = dtype_change(configs)
    locals().update(SHARED)


class TestNpuFusedAdamConformance(OptimizerConformance):
    """torch_npu's signature (no ``maximize``); ``zero_grad()`` keeps zeroed gradients."""

    optimizer_cls = NpuFusedAdam
    reference_cls = TORCH_ADAM
    configs = {"amsgrad_wd": dict(lr=5e-3, weight_decay=1e-2, amsgrad=True)}
    zero_grad_set_to_none_default = False
    bad_hyperparameters = [*BAD, (dict(maximize=True), TypeError)]
    expected_failures = dtype_change(configs)
    locals().update(SHARED)


class TestNpuFusedAdamWConformance(OptimizerConformance):
    optimizer_cls = NpuFusedAdamW
    reference_cls = TORCH_ADAMW
    configs = {"amsgrad_wd": dict(lr=5e-3, weight_decay=1e-1, amsgrad=True)}
    zero_grad_set_to_none_default = False
    bad_hyperparameters = [*BAD, (dict(maximize=True), TypeError)]
    expected_failures = dtype_change(configs)
    locals().update(SHARED)


def test_registered_by_name() -> None:
    import fused_core

    params = [torch.nn.Parameter(torch.randn(3))]
    assert isinstance(fused_core.create_optimizer("adamw", params, lr=1e-3), FusedAdamW)
    assert type(fused_core.create_optimizer("adam", params, lr=1e-3)) is FusedAdam


@pytest.mark.parametrize("cls", [NpuFusedAdam, NpuFusedAdamW])
def test_torch_npu_defaults(cls) -> None:
    """torch_npu's signatures: NpuFusedAdam weight_decay 0, NpuFusedAdamW 1e-2, both amsgrad False."""
    opt = cls([torch.nn.Parameter(torch.randn(3))])
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["amsgrad"]) == (1e-3, (0.9, 0.999), 1e-8, False)
    assert group["weight_decay"] == (1e-2 if cls is NpuFusedAdamW else 0)


DEFAULT_SQRT = dict(
    exact_dtypes=(torch.float64,),
    rtol=1e-6,
    low_precision_dtypes=(torch.float32, torch.float16, torch.bfloat16),
    pytestmark=pytest.mark.usefixtures("default_sqrt"),
)


class TestFusedAdamDefaultSqrt(TestFusedAdamConformance):
    locals().update(DEFAULT_SQRT)


class TestFusedAdamWDefaultSqrt(TestFusedAdamWConformance):
    locals().update(DEFAULT_SQRT)
