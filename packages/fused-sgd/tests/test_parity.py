"""FusedSGD against torch.optim.SGD(foreach=False): real models, real backward passes, >= 15 steps."""

from __future__ import annotations

import itertools

import pytest
import torch

from fused_sgd import FusedSGD, NpuFusedSGD
from fused_testing.parity import assert_parity, train_side_by_side


def _grid() -> list[dict]:
    grid = []
    for momentum, dampening, nesterov, weight_decay, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-3), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        grid.append(
            dict(
                momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize
            )
        )
    return grid


GRID = _grid()


def _two_groups(model: torch.nn.Module) -> list[dict]:
    """Two param groups with different learning rates, interleaving layers."""
    params = list(model.parameters())
    return [{"params": params[0::2]}, {"params": params[1::2], "lr": 0.02}]


@pytest.mark.parametrize("hp", GRID, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items()))
def test_two_groups_match_torch(hp: dict) -> None:
    result = train_side_by_side(
        lambda model: torch.optim.SGD(_two_groups(model), lr=0.05, foreach=False, **hp),
        lambda model: FusedSGD(_two_groups(model), lr=0.05, **hp),
        model_kind="mlp",
        steps=15,
    )
    assert_parity(result, rtol=1e-5)
    assert result.losses_a[0] != result.losses_a[-1]  # training really moved the parameters


@pytest.mark.parametrize("model_kind", ["convnet", "deep-mlp"])
def test_named_parameters_and_other_models_match_torch(model_kind: str) -> None:
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    result = train_side_by_side(
        lambda model: torch.optim.SGD(model.named_parameters(), foreach=False, **hp),
        lambda model: FusedSGD(model.named_parameters(), **hp),
        model_kind=model_kind,
        steps=15,
    )
    assert_parity(result, rtol=1e-5)
    assert result.optimizer_b.param_groups[0]["param_names"] == [n for n, _ in result.model_b.named_parameters()]


def test_npu_fused_sgd_matches_torch() -> None:
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=False)
    result = train_side_by_side(
        lambda model: torch.optim.SGD(model.parameters(), foreach=False, **hp),
        lambda model: NpuFusedSGD(model.parameters(), **hp),
        steps=15,
    )
    assert_parity(result, rtol=1e-5)


def test_scheduler_changes_between_steps_are_honoured() -> None:
    def schedule(step: int, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer) -> None:
        for opt in (opt_a, opt_b):
            for group in opt.param_groups:
                group["lr"] *= 0.8
                group["momentum"] = 0.5 if step % 2 else 0.9

    result = train_side_by_side(
        lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False),
        lambda model: FusedSGD(model.parameters(), lr=0.1, momentum=0.9),
        steps=15,
        between_steps=schedule,
    )
    assert_parity(result, rtol=1e-5)
