"""fused_testing's conformance suite, run for FusedLamb, NpuFusedLamb, FusedAdamP and NpuFusedAdamP.

No torch.optim class exists for either, so the references are :mod:`fused_lamb.reference`'s
per-tensor ``Lamb`` and ``AdamP`` (``foreach=False``), written from the papers and checked against
torch_npu's and apex's sources (test_math.py checks them, and the fused classes, against float64
formulas). On the CPU, Lamb's C kernel serves (its own sqrt and order of additions: a few ulps
from the torch-ops composite, which test_launchers.py shows bit for bit with the reference in
fp32); AdamP's projection sums rows in another order than the reference. So both are compared
within a relative 1e-6 (a wrong formula is off by far more). fp16/bf16: no further from a float64
run than the reference in that dtype.
"""

from __future__ import annotations

import pytest
import torch

import fused_core
from fused_core import InvalidHyperparameterError
from fused_lamb import FusedAdamP, FusedLamb, NpuFusedAdamP, NpuFusedLamb
from fused_lamb.reference import AdamP, Lamb, NpuAdamP, NpuLamb
from fused_testing.conformance import OptimizerConformance

STATE_FOLLOWS_DTYPE = (
    "fused optimizers convert their state to the parameters' new dtype when they change dtype "
    "between steps (model.to); torch.optim-style references keep each state tensor's dtype"
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
SHARED = dict(state_keys=("step", "exp_avg", "exp_avg_sq"))


class ClosureWithinTolerance:
    """Replaces the suite's ``test_closure``, which requires the losses the closures return at
    every step to be equal bit for bit even outside ``exact_dtypes``: after the first step the two
    optimizers' parameters differ in the last bits here, and so do the losses computed from them.
    The same checks otherwise: ``step(closure)`` runs the closure with gradients enabled, returns
    its loss, and steps as the reference (within ``rtol``)."""

    rtol = 1e-6

    def test_closure(self, config) -> None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        start = [torch.randn(shape, generator=generator) for shape in ((64, 32), (64,), (5, 3, 2))]
        sides = []
        for factory in (self.optimizer_cls, self.reference_cls):
            params = [torch.nn.Parameter(value.clone()) for value in start]
            sides.append((params, factory(params, **config)))
        for step in range(5):
            weights = [torch.randn(value.shape, generator=generator) for value in start]
            returned = []
            for params, optimizer in sides:
                losses = []

                def closure(params=params, optimizer=optimizer, losses=losses, weights=weights) -> torch.Tensor:
                    optimizer.zero_grad()
                    loss = sum((w * p + 0.5 * p * p).sum() for w, p in zip(weights, params))
                    loss.backward()
                    losses.append(loss)
                    return loss

                with torch.no_grad():
                    returned.append((optimizer.step(closure), losses))
            for loss, losses in returned:
                assert len(losses) == 1 and loss is losses[0] and loss.requires_grad, f"step {step + 1}"
            for fused, reference in zip(*(params for params, _ in sides)):
                torch.testing.assert_close(
                    fused, reference, rtol=self.rtol, atol=self.rtol * float(reference.detach().abs().max())
                )


def dtype_change(names) -> dict[str, str]:
    return {f"test_dtype_change[{name}]": STATE_FOLLOWS_DTYPE for name in names}


UNDERFLOW = (
    "fp16 cannot hold the second moment of globally clipped gradients: with the global norm clipped "
    "to 1 over ~137k elements, (1 - beta2) g^2 ~ 1e-8 is below fp16's smallest subnormal (6e-8), so the "
    "stored exp_avg_sq rounds to 0 while each step's fp32 math sees the new term: a few elements "
    "get a near-zero denominator and the trust ratio gives them most of the step. The per-tensor "
    "reference in fp16 rounds every term to 0 and steps along m / eps, by chance closer to float64 "
    "(docs/optimizers/lamb.md: keep such models in bf16 or fp32)"
)
LAMB_BAD = [
    *BAD,
    (dict(amsgrad=True), ValueError),
    (dict(max_grad_norm=0.0), ValueError),
    (dict(max_weight_norm=-1.0), ValueError),
    (dict(adam="yes"), InvalidHyperparameterError),
]
LAMB_CONFIGS = {
    "l2_no_averaging": dict(lr=1e-2, weight_decay=0.1, adam_w_mode=False, grad_averaging=False, max_grad_norm=None),
    "nvlamb_clamped": dict(
        lr=1e-2, weight_decay=0.0, use_nvlamb=True, max_weight_norm=2.0, bias_correction=False, max_grad_norm=None
    ),
    # Clipping on, but never reached: the division by 1 is exact.
    "adam_tensor_lr": dict(lr=torch.tensor(1e-2), betas=(0.8, 0.99), adam=True, max_grad_norm=1e9),
}


class TestFusedLambConformance(ClosureWithinTolerance, OptimizerConformance):
    """Without global clipping."""

    optimizer_cls = FusedLamb
    reference_cls = Lamb
    configs = LAMB_CONFIGS
    rtol = 1e-6
    second_group = {"lr": 1e-3, "adam": True}
    bad_hyperparameters = LAMB_BAD
    expected_failures = dtype_change(LAMB_CONFIGS)
    locals().update(SHARED)


CLIPPED_CONFIGS = {
    # apex's defaults: bias correction, decoupled weight decay 0.01, global clipping at 1 (reached here).
    "apex_defaults": dict(lr=1e-2),
    # Clipped mildly (test_parity's gradients only), so that exp_avg_sq stays above fp16's subnormals.
    "clipped_l2": dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=1e-2, adam_w_mode=False, max_grad_norm=350.0),
}


class TestFusedLambClippedConformance(ClosureWithinTolerance, OptimizerConformance):
    """With global clipping reached: the global norm divides every gradient, and fused-core's
    (fp64 sums in its C kernel, fp32 chunk norms where torch ops compute it) and the reference's
    (fp64 sums) differ by up to ~1e-6 relative."""

    optimizer_cls = FusedLamb
    reference_cls = Lamb
    configs = CLIPPED_CONFIGS
    rtol = 1e-5
    second_group = {"lr": 1e-3, "max_grad_norm": None}
    bad_hyperparameters = LAMB_BAD
    expected_failures = {**dtype_change(CLIPPED_CONFIGS), "test_low_precision[apex_defaults-float16]": UNDERFLOW}
    locals().update(SHARED)


class TestNpuFusedLambConformance(ClosureWithinTolerance, OptimizerConformance):
    """torch_npu's signature; ``zero_grad()`` keeps zeroed gradients."""

    optimizer_cls = NpuFusedLamb
    reference_cls = NpuLamb
    configs = {"wd": dict(lr=1e-2, weight_decay=1e-2), "adam": dict(lr=1e-2, adam=True)}
    rtol = 1e-6
    zero_grad_set_to_none_default = False
    second_group = {"lr": 1e-3, "weight_decay": 0.1}
    bad_hyperparameters = [*BAD, (dict(max_grad_norm=1.0), TypeError)]
    expected_failures = dtype_change(configs)
    locals().update(SHARED)


class TestNpuFusedLambGlobalNormConformance(ClosureWithinTolerance, OptimizerConformance):
    """torch_npu's ``use_global_grad_norm``: the gradients divided by the global norm above 1
    (within 1e-5, as :class:`TestFusedLambClippedConformance`)."""

    optimizer_cls = NpuFusedLamb
    reference_cls = NpuLamb
    configs = {"global_norm_wd": dict(lr=1e-2, weight_decay=1e-2, use_global_grad_norm=True)}
    rtol = 1e-5
    # exp_avg = beta1 m + (1 - beta1) g / norm cancels to ~5e-6 on some elements: the norm's rounding
    # (~1e-7 relative) then reaches it ~1e-10 apart (seed 1564952800), beyond 1e-5 of it.
    atol = 1e-9
    zero_grad_set_to_none_default = False
    bad_hyperparameters = [*BAD, (dict(max_grad_norm=1.0), TypeError)]
    expected_failures = {**dtype_change(configs), "test_low_precision[global_norm_wd-float16]": UNDERFLOW}
    locals().update(SHARED)


ADAMP_CONFIGS = {
    "plain": dict(lr=1e-2),
    "wd_nesterov": dict(lr=1e-2, weight_decay=0.1, nesterov=True),
    # delta this large projects every matrix channel-wise (the suite's gradients are far from
    # orthogonal to the weights; test_math.py crafts orthogonal ones for both views).
    "projected": dict(lr=1e-2, weight_decay=0.1, delta=1e3, wd_ratio=0.5),
    "tensor_lr": dict(lr=torch.tensor(1e-2), betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
}
ADAMP_BAD = [*BAD, (dict(delta=-0.1), ValueError), (dict(wd_ratio=-1.0), ValueError)]


class TestFusedAdamPConformance(ClosureWithinTolerance, OptimizerConformance):
    optimizer_cls = FusedAdamP
    reference_cls = AdamP
    configs = ADAMP_CONFIGS
    rtol = 1e-6
    second_group = {"lr": 1e-3, "delta": 1e3}
    bad_hyperparameters = [*ADAMP_BAD, (dict(nesterov=1), InvalidHyperparameterError)]
    expected_failures = dtype_change(ADAMP_CONFIGS)
    locals().update(SHARED)


NPU_ADAMP_CONFIGS = {"projected_nesterov": dict(lr=1e-2, weight_decay=0.1, delta=1e3, nesterov=True)}


class TestNpuFusedAdamPConformance(ClosureWithinTolerance, OptimizerConformance):
    optimizer_cls = NpuFusedAdamP
    reference_cls = NpuAdamP
    configs = NPU_ADAMP_CONFIGS
    rtol = 1e-6
    zero_grad_set_to_none_default = False
    bad_hyperparameters = ADAMP_BAD
    expected_failures = dtype_change(NPU_ADAMP_CONFIGS)
    locals().update(SHARED)


@pytest.mark.parametrize(("name", "cls"), [("lamb", FusedLamb), ("adamp", FusedAdamP)])
def test_registered_by_name(name, cls) -> None:
    params = [torch.nn.Parameter(torch.randn(3))]
    assert type(fused_core.create_optimizer(name, params, lr=1e-3)) is cls
    assert name in fused_core.available_optimizers()


def test_torch_npu_defaults() -> None:
    """torch_npu's signatures and defaults: NpuFusedLamb eps 1e-6, weight_decay 0, no clipping, no
    bias correction, the weight norm clamped to 10; NpuFusedAdamP clovaai's."""
    lamb = NpuFusedLamb([torch.nn.Parameter(torch.randn(3))]).param_groups[0]
    assert (lamb["lr"], lamb["betas"], lamb["eps"], lamb["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-6, 0)
    assert (lamb["adam"], lamb["max_grad_norm"], lamb["bias_correction"], lamb["max_weight_norm"]) == (
        False, None, False, 10.0,
    )  # fmt: skip
    assert NpuFusedLamb([torch.nn.Parameter(torch.randn(3))], use_global_grad_norm=True).defaults["max_grad_norm"] == 1
    adamp = NpuFusedAdamP([torch.nn.Parameter(torch.randn(3))]).param_groups[0]
    assert {key: adamp[key] for key in ("lr", "betas", "eps", "weight_decay", "delta", "wd_ratio", "nesterov")} == dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, delta=0.1, wd_ratio=0.1, nesterov=False
    )


def test_apex_defaults() -> None:
    """apex's FusedLAMB defaults: bias correction, eps 1e-6, weight_decay 0.01, AdamW mode, grad
    averaging, max_grad_norm 1.0, no NVLamb."""
    group = FusedLamb([torch.nn.Parameter(torch.randn(3))]).param_groups[0]
    assert {key: group[key] for key in ("lr", "bias_correction", "eps", "weight_decay", "adam_w_mode")} == dict(
        lr=1e-3, bias_correction=True, eps=1e-6, weight_decay=0.01, adam_w_mode=True
    )
    assert (group["grad_averaging"], group["max_grad_norm"], group["use_nvlamb"]) == (True, 1.0, False)
