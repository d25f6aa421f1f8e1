"""FusedSGD under DistributedDataParallel matches torch.optim.SGD under DDP, parameter for parameter.

Two orders of construction: the usual one (wrap the model in DDP, then build the optimizer
over ``ddp.parameters()``), and one where the optimizer lays out its flat buffers
(``get_combined_params()``) before the model is wrapped.
"""

from __future__ import annotations

import pytest
import torch
from dist_training import (
    ORDERS,
    STEPS,
    branchy,
    check,
    fused_sgd,
    mlp,
    outcome,
    shard,
    torch_sgd,
    train,
)
from torch.distributed import get_rank
from torch.nn.parallel import DistributedDataParallel as DDP

from fused_testing.parity import make_model

SETTINGS = {
    "default": {},
    "gradient_as_bucket_view": {"gradient_as_bucket_view": True},
    "static_graph": {"static_graph": True},
    "find_unused_parameters": {"find_unused_parameters": True},
}


def build(settings: str) -> torch.nn.Module:
    # find_unused_parameters: a branch that only even ranks use, and a head no rank uses.
    return branchy(use_branch=get_rank() % 2 == 0) if settings == "find_unused_parameters" else mlp()


def ddp_case(settings: str, order: str) -> dict[str, float]:
    options = SETTINGS[settings]
    batches = shard(STEPS)
    reference = build(settings)
    wrapped = DDP(reference, **options)
    train(wrapped, torch_sgd(wrapped.parameters()), batches)

    model = build(settings)
    if order == "ddp-first":
        wrapped = DDP(model, **options)
        optimizer = fused_sgd(wrapped.parameters())
    else:
        optimizer = fused_sgd(model.parameters())
        optimizer.get_combined_params()  # lay out the flat buffers before DDP registers its hooks
        wrapped = DDP(model, **options)
    train(wrapped, optimizer, batches)
    return outcome(model, reference)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("settings", list(SETTINGS))
def test_fused_sgd_under_ddp_matches_torch_sgd(ranks, settings, order):
    check(ranks.run(ddp_case, settings, order))


def accumulator(param: torch.Tensor) -> object:
    """The AccumulateGrad node of a leaf, where DDP (and other hooks) attach."""
    return param.view_as(param).grad_fn.next_functions[0][0]


def test_binding_keeps_each_parameters_gradient_accumulator():
    model = make_model("mlp")
    before = [accumulator(param) for param in model.parameters()]
    fused_sgd(model.parameters()).get_combined_params()
    assert all(accumulator(param) is node for param, node in zip(model.parameters(), before))
