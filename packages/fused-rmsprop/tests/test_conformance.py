"""fused_testing's conformance suite, run for every class fused-rmsprop ships.

The references: ``torch.optim.RMSprop(foreach=False)`` and ``torch.optim.Adadelta(foreach=False)``
(bit for bit in fp32 and fp64; in fp16 and bf16 no further from a float64 run than torch itself in
that dtype), RMSpropTF's suites are in ``test_rmsprop_tf.py``, with its float64 oracle. What the suite covers is
listed in :mod:`fused_testing.conformance`.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fused_core import InvalidHyperparameterError
from fused_rmsprop import (
    FusedAdadelta,
    FusedRMSprop,
    FusedRMSpropTF,
    NpuFusedAdadelta,
    NpuFusedRMSprop,
    NpuFusedRMSpropTF,
)
from fused_testing.conformance import OptimizerConformance

TORCH_RMSPROP = functools.partial(torch.optim.RMSprop, foreach=False)
TORCH_ADADELTA = functools.partial(torch.optim.Adadelta, foreach=False)
STATE_FOLLOWS_DTYPE = (
    "fused optimizers convert their state to the parameters' new dtype when they change dtype "
    "between steps (model.to); torch.optim keeps each state tensor's dtype (docs/migration.md)"
)
BAD = [
    (dict(lr=-1.0), ValueError),
    (dict(eps=-1e-8), ValueError),
    (dict(weight_decay=-1e-2), ValueError),
    (dict(lr=float("nan")), InvalidHyperparameterError),
    (dict(lr="0.1"), InvalidHyperparameterError),
]
BAD_RMSPROP = [*BAD, (dict(alpha=-0.1), ValueError), (dict(momentum=-0.5), ValueError)]
BAD_ADADELTA = [*BAD, (dict(rho=1.1), ValueError), (dict(rho=-0.1), ValueError)]
RMSPROP_STATE = ("step", "square_avg", "momentum_buffer", "grad_avg")
EXACT = (torch.float32, torch.float64)


ADADELTA_FP16_SUBNORMAL = (
    "Adadelta in fp16 with torch's defaults (lr=1, eps=1e-6): acc_delta starts at about eps = 1e-6 in nearly "
    "every element (the first step saturates at sqrt(eps / (1 - rho))), 17 fp16 subnormal steps (2^-24), so "
    "rounding it is one shared bias, not random error; at step 2 torch's per-op roundings happen to offset part "
    "of that bias, and ours (fp32 math, one rounding) is about 1.2x further from float64 on average "
    "(docs/optimizers/adadelta.md)"
)


CENTERED_FP16 = (
    "centered RMSprop keeps square_avg and grad_avg in fp16, whose range the square average of a small gradient "
    "element leaves (0.01 g**2 < 2**-25 for |g| < 1.7e-3 with alpha=0.99): v - grad_avg**2 then goes negative "
    "and its square root NaN, now in torch's run, now in ours (each rounds differently), as docs/optimizers/"
    "rmsprop.md says; the suite's fp16 check, which wants ours finite where torch's breaks down, is run for the "
    "configs without centering (test_fp16_without_centering)"
)


def dtype_change(names) -> dict[str, str]:
    return {f"test_dtype_change[{name}]": STATE_FOLLOWS_DTYPE for name in names}


RMSPROP_CONFIGS = {
    "plain": dict(lr=1e-2),
    "wd_momentum": dict(lr=1e-2, momentum=0.9, weight_decay=1e-2),
    "centered_maximize": dict(lr=5e-3, alpha=0.9, centered=True, maximize=True, weight_decay=1e-2),
    "centered_momentum_tensor_lr": dict(lr=torch.tensor(1e-2), momentum=0.5, centered=True, eps=1e-6),
}
ADADELTA_CONFIGS = {
    "plain": dict(lr=1.0),
    # eps >= 1e-4: acc_delta (about eps) above fp16's subnormal range, where the suite's per-parameter
    # bound (in units of eps * |value|) is finer than fp16's spacing there (2^-24).
    "wd_maximize": dict(lr=0.5, rho=0.8, weight_decay=1e-2, maximize=True, eps=1e-3),
    "tensor_lr": dict(lr=torch.tensor(0.9), eps=3e-4),
}


class TestFusedRMSpropConformance(OptimizerConformance):
    optimizer_cls = FusedRMSprop
    reference_cls = TORCH_RMSPROP
    configs = RMSPROP_CONFIGS
    state_keys = RMSPROP_STATE
    exact_dtypes = EXACT
    second_group = {"lr": 1e-3, "momentum": 0.9, "centered": True}
    low_precision_dtypes = (torch.bfloat16,)  # fp16: test_fp16_without_centering (CENTERED_FP16)
    bad_hyperparameters = [*BAD_RMSPROP, (dict(differentiable=True), ValueError), (dict(capturable=True), ValueError)]
    expected_failures = dtype_change(RMSPROP_CONFIGS)


@pytest.mark.parametrize("name", ["plain", "wd_momentum"])
def test_fp16_without_centering(name) -> None:
    """The suite's fp16 check (no further from float64 than torch in fp16) for the configs whose
    state stays within fp16's range (CENTERED_FP16)."""
    TestFusedRMSpropConformance().test_low_precision(RMSPROP_CONFIGS[name], torch.float16)


class TestNpuFusedRMSpropConformance(OptimizerConformance):
    """torch_npu's signature (no ``maximize``); ``zero_grad()`` keeps zeroed gradients."""

    optimizer_cls = NpuFusedRMSprop
    reference_cls = TORCH_RMSPROP
    configs = {"momentum_wd": dict(lr=5e-3, momentum=0.9, weight_decay=1e-2)}
    state_keys = RMSPROP_STATE
    exact_dtypes = EXACT
    zero_grad_set_to_none_default = False
    bad_hyperparameters = [*BAD_RMSPROP, (dict(maximize=True), TypeError)]
    expected_failures = dtype_change(configs)


class TestFusedAdadeltaConformance(OptimizerConformance):
    optimizer_cls = FusedAdadelta
    reference_cls = TORCH_ADADELTA
    configs = ADADELTA_CONFIGS
    state_keys = ("step", "square_avg", "acc_delta")
    exact_dtypes = EXACT
    second_group = {"lr": 0.1, "rho": 0.5}
    bad_hyperparameters = [*BAD_ADADELTA, (dict(differentiable=True), ValueError), (dict(capturable=True), ValueError)]
    expected_failures = {**dtype_change(ADADELTA_CONFIGS), "test_low_precision[plain-float16]": ADADELTA_FP16_SUBNORMAL}


class TestNpuFusedAdadeltaConformance(OptimizerConformance):
    optimizer_cls = NpuFusedAdadelta
    reference_cls = TORCH_ADADELTA
    configs = {"wd": dict(lr=0.5, rho=0.8, weight_decay=1e-2, eps=1e-3)}
    state_keys = ("step", "square_avg", "acc_delta")
    exact_dtypes = EXACT
    zero_grad_set_to_none_default = False
    bad_hyperparameters = [*BAD_ADADELTA, (dict(maximize=True), TypeError)]
    expected_failures = dtype_change(configs)


@pytest.mark.parametrize(
    "name,cls", [("rmsprop", FusedRMSprop), ("rmsprop_tf", FusedRMSpropTF), ("adadelta", FusedAdadelta)]
)
def test_registered_by_name(name, cls) -> None:
    import fused_core

    params = [torch.nn.Parameter(torch.randn(3))]
    assert type(fused_core.create_optimizer(name, params, lr=1e-3)) is cls


@pytest.mark.parametrize(
    "cls,expected",
    [
        (NpuFusedRMSprop, dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False)),
        (
            NpuFusedRMSpropTF,
            dict(
                lr=1e-2, alpha=0.9, eps=1e-10, weight_decay=0, momentum=0.0, centered=False, decoupled_decay=False,
                lr_in_momentum=True,
            ),
        ),
        (NpuFusedAdadelta, dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0)),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)  # fmt: skip
def test_torch_npu_defaults(cls, expected) -> None:
    """torch_npu's signatures and defaults (NpuFusedRMSpropTF: alpha 0.9, eps 1e-10, lr in the momentum)."""
    import inspect

    signature = inspect.signature(cls.__init__)
    assert list(signature.parameters)[2:] == list(expected)
    group = cls([torch.nn.Parameter(torch.randn(3))]).param_groups[0]
    assert {key: group[key] for key in expected} == expected
