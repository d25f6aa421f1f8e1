r"""RMSpropTF against a float64 oracle written from torch_npu's NpuFusedRMSpropTF's formulas (not from
its code, nor from ours), and the conformance suite for FusedRMSpropTF and NpuFusedRMSpropTF, whose
reference is :class:`fused_rmsprop.reference.RMSpropTF` (torch ops per tensor).

The oracle, per parameter (v starts at 1, ḡ and b at 0)::

    g = ±grad;  θ = (1 - λ) θ if decoupled_decay else g = g + λ θ
    v = α v + (1 - α) g²
    d = sqrt(v - ḡ² + ε) with ḡ = α ḡ + (1 - α) g if centered, else sqrt(v + ε)
    b = μ b + (γ if lr_in_momentum else 1) · g / d;  θ = θ - (b if lr_in_momentum else γ b)   (μ > 0)
    θ = θ - γ g / d                                                                        (μ = 0)

Each of the ways RMSpropTF differs from torch's RMSprop (ε inside the root, v starting at one, the
learning rate inside the momentum buffer, a decoupled decay not scaled by the learning rate) is
shown to move the result further from the oracle than the tolerance the optimizer meets.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from fused_rmsprop import FusedRMSpropTF, NpuFusedRMSpropTF
from fused_rmsprop.reference import RMSpropTF
from fused_testing.conformance import OptimizerConformance, draw_seed
from fused_testing.oracle import UpdateOracle


def make_oracle(
    *, eps_in_root: bool = True, v_start: float = 1.0, lr_in_buffer: bool = True, decay_times_lr: bool = False
):
    """The float64 RMSpropTF update (``oracle_step``'s signature); the keywords switch on one mistake each."""

    def update(
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        *,
        lr: Any,
        alpha: float = 0.9,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        decoupled_decay: bool = False,
        lr_in_momentum: bool = True,
        maximize: bool = False,
        **_: Any,
    ) -> torch.Tensor:
        gamma = float(lr)
        g = -grad if maximize else grad
        if weight_decay != 0 and decoupled_decay:
            param = param * (1 - (gamma * weight_decay if decay_times_lr else weight_decay))
        elif weight_decay != 0:
            g = g + weight_decay * param
        state["step"] = state.get("step", torch.zeros((), dtype=torch.float64)) + 1
        v = alpha * state.get("square_avg", torch.full_like(param, v_start)) + (1 - alpha) * g * g
        state["square_avg"] = v
        if centered:
            mean = alpha * state.get("grad_avg", torch.zeros_like(param)) + (1 - alpha) * g
            state["grad_avg"] = mean
            v = v - mean * mean
        d = torch.sqrt(v + eps) if eps_in_root else torch.sqrt(v) + eps
        if momentum <= 0:
            return param - gamma * g / d
        in_buffer = lr_in_momentum and lr_in_buffer
        b = momentum * state.get("momentum_buffer", torch.zeros_like(param)) + (gamma if in_buffer else 1.0) * g / d
        state["momentum_buffer"] = b
        return param - (b if in_buffer else gamma * b)

    return update


rmsprop_tf_oracle = make_oracle()
"""The right one."""

MISTAKES = {
    "eps_outside_the_root": dict(eps_in_root=False),
    "square_avg_from_zero": dict(v_start=0.0),
    "lr_outside_the_buffer": dict(lr_in_buffer=False),
    "decay_scaled_by_lr": dict(decay_times_lr=True),
}
CONFIGS = {
    "momentum_lr_in_buffer_small_v": dict(lr=1e-2, alpha=0.5, momentum=0.9, eps=1e-2),
    "centered_decoupled": dict(lr=1e-2, alpha=0.8, centered=True, weight_decay=0.1, decoupled_decay=True, eps=1e-3),
    "centered_momentum_l2_maximize": dict(
        lr=3e-3, centered=True, momentum=0.5, weight_decay=1e-2, maximize=True, eps=1e-4, lr_in_momentum=False
    ),
}
SHAPES = ((64, 33), (1000,), (7,))
STEPS = 6
TOLERANCE = 2e-5
"""Relative to the largest distance the oracle's parameters moved: fp32's roundings stay far within it."""


def run(cls, config: dict, dtype: torch.dtype, seed: int, oracle_fn=None) -> list[torch.Tensor]:
    """How far STEPS steps from random parameters with random gradients (lr halved after the third
    step) move the parameters: of ``cls`` in ``dtype``, or of the float64 oracle ``oracle_fn``."""
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) * 0.01 for shape in SHAPES]
    grads = [
        [torch.randn(shape, generator=generator, dtype=torch.float64) * 0.1 for shape in SHAPES] for _ in range(STEPS)
    ]
    if oracle_fn is not None:
        oracle = UpdateOracle(oracle_fn, start, **config)
        for step in range(STEPS):
            if step == 3:
                oracle.hyperparameters["lr"] = config["lr"] / 2
            oracle.step(grads[step])
        return [p - p0 for p, p0 in zip(oracle.params, start)]
    params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in start]
    optimizer = cls(params, **config)
    for step in range(STEPS):
        if step == 3:
            for group in optimizer.param_groups:
                group["lr"] = config["lr"] / 2
        for p, g in zip(params, grads[step]):
            p.grad = g.to(dtype)
        optimizer.step()
    return [p.detach().double() - p0 for p, p0 in zip(params, start)]


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max |a - b| relative to the largest |b| (b: the oracle's moves)."""
    scale = max(float(x.abs().max()) for x in b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("cls", [FusedRMSpropTF, RMSpropTF], ids=["FusedRMSpropTF", "reference"])
def test_fp32_and_fp64_against_the_float64_oracle(cls, config) -> None:
    """FusedRMSpropTF (and the reference module): in fp32 within TOLERANCE of the float64 oracle, in fp64 1e-12."""
    seed = draw_seed()
    oracle = run(None, config, torch.float64, seed, rmsprop_tf_oracle)
    assert distance(run(cls, config, torch.float32, seed), oracle) < TOLERANCE, f"seed {seed}"
    assert distance(run(cls, config, torch.float64, seed), oracle) < 1e-12, f"seed {seed}"


@pytest.mark.parametrize("mistake", MISTAKES.values(), ids=MISTAKES.keys())
def test_each_difference_from_torch_is_visible(mistake) -> None:
    """A formula with one of torch.optim.RMSprop's choices instead of torch_npu's lands further than
    10 x TOLERANCE from the oracle in one of the configs, so the test above would catch it."""
    seed = draw_seed()
    wrong = make_oracle(**mistake)
    distances = [
        distance(
            run(None, config, torch.float64, seed, wrong), run(None, config, torch.float64, seed, rmsprop_tf_oracle)
        )
        for config in CONFIGS.values()
    ]
    assert max(distances) > 10 * TOLERANCE, f"seed {seed}: {distances}"


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_reference_foreach_is_the_same(config) -> None:
    """RMSpropTF(foreach=True), torch._foreach_* ops over each group, gives foreach=False's bits (the CPU)."""
    seed = draw_seed()
    one = run(functools.partial(RMSpropTF, foreach=False), config, torch.float32, seed)
    lists = run(functools.partial(RMSpropTF, foreach=True), config, torch.float32, seed)
    assert all(torch.equal(a, b) for a, b in zip(one, lists)), f"seed {seed}"


def test_square_avg_starts_at_one() -> None:
    """TensorFlow's initialisation: after one step from g = 0, ``square_avg`` is α (torch's would be 0)."""
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = FusedRMSpropTF([param], alpha=0.8)
    param.grad = torch.zeros(5)
    optimizer.step()
    assert torch.allclose(optimizer.state[param]["square_avg"], torch.full((5,), 0.8))
    assert math.isclose(float(optimizer.state[param]["step"]), 1.0)


REFERENCE = functools.partial(RMSpropTF, foreach=False)
STATE_KEYS = ("step", "square_avg", "momentum_buffer", "grad_avg")
STATE_FOLLOWS_DTYPE = (
    "fused optimizers convert their state to the parameters' new dtype when they change dtype "
    "between steps (model.to); the reference keeps each state tensor's dtype (docs/migration.md)"
)
BAD = [
    (dict(lr=-1.0), ValueError),
    (dict(eps=-1e-8), ValueError),
    (dict(weight_decay=-1e-2), ValueError),
    (dict(alpha=-0.1), ValueError),
    (dict(momentum=-0.5), ValueError),
    (dict(lr=float("nan")), (ValueError, TypeError)),
    (dict(decoupled_decay=1), (ValueError, TypeError)),
]
CONFORMANCE_CONFIGS = {
    "plain": dict(lr=1e-2),
    "wd_momentum": dict(lr=1e-2, momentum=0.9, weight_decay=1e-2),
    "centered_decoupled_maximize": dict(
        lr=5e-3, alpha=0.95, centered=True, weight_decay=1e-3, decoupled_decay=True, maximize=True, momentum=0.5,
        lr_in_momentum=False,
    ),
    "centered_momentum_tensor_lr": dict(lr=torch.tensor(1e-2), momentum=0.5, centered=True, eps=1e-6),
}  # fmt: skip


class TestFusedRMSpropTFConformance(OptimizerConformance):
    optimizer_cls = FusedRMSpropTF
    reference_cls = REFERENCE
    configs = CONFORMANCE_CONFIGS
    state_keys = STATE_KEYS
    exact_dtypes = (torch.float32, torch.float64)
    oracle_update = staticmethod(rmsprop_tf_oracle)
    second_group = {"lr": 1e-3, "momentum": 0.9, "centered": True}
    bad_hyperparameters = BAD
    expected_failures = {f"test_dtype_change[{name}]": STATE_FOLLOWS_DTYPE for name in CONFORMANCE_CONFIGS}


class TestNpuFusedRMSpropTFConformance(OptimizerConformance):
    """torch_npu's signature (no ``maximize``); ``zero_grad()`` keeps zeroed gradients."""

    optimizer_cls = NpuFusedRMSpropTF
    reference_cls = REFERENCE
    configs = {"centered_momentum_wd": dict(lr=5e-3, momentum=0.9, centered=True, weight_decay=1e-2)}
    state_keys = STATE_KEYS
    exact_dtypes = (torch.float32, torch.float64)
    oracle_update = staticmethod(rmsprop_tf_oracle)
    zero_grad_set_to_none_default = False
    bad_hyperparameters = [*BAD, (dict(maximize=True), TypeError)]
    expected_failures = {"test_dtype_change[centered_momentum_wd]": STATE_FOLLOWS_DTYPE}
