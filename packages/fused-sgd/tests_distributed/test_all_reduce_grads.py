"""fused_core.distributed.all_reduce_grads: data parallelism without DDP, one collective per bucket.

A loop of ``backward(); all_reduce_grads(optimizer); optimizer.step()`` with FusedSGD matches
DDP with torch.optim.SGD, parameter for parameter.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from dist_training import STEPS, branchy, check, fused_sgd, mlp, outcome, shard, torch_sgd, train
from torch.nn.parallel import DistributedDataParallel as DDP

from fused_core.distributed import all_reduce_grads
from fused_testing.parity import make_model


def reference_run(model: torch.nn.Module, batches, **options) -> torch.nn.Module:
    wrapped = DDP(model, **options)
    train(wrapped, torch_sgd(wrapped.parameters()), batches)
    return model


def plain_case(set_to_none: bool) -> dict[str, float]:
    batches = shard(STEPS)
    reference = reference_run(mlp(), batches)
    model = mlp()
    optimizer = fused_sgd(model.parameters())
    train(model, optimizer, batches, sync=lambda: all_reduce_grads(optimizer), set_to_none=set_to_none)
    return outcome(model, reference)


@pytest.mark.parametrize("set_to_none", [False, True], ids=["zero_grad", "zero_grad(set_to_none=True)"])
def test_all_reduce_grads_matches_ddp(ranks, set_to_none):
    check(ranks.run(plain_case, set_to_none))


def unused_case(every_rank_uses_the_branch: bool) -> dict[str, float]:
    """Branchy: ``unused`` never gets a gradient; ``branch`` gets one on every rank, or on even ranks only."""
    use_branch = every_rank_uses_the_branch or dist.get_rank() % 2 == 0
    batches = shard(STEPS)
    reference = reference_run(branchy(use_branch), batches, find_unused_parameters=True)
    model = branchy(use_branch)
    optimizer = fused_sgd(model.parameters())
    find_unused = not every_rank_uses_the_branch
    train(model, optimizer, batches, sync=lambda: all_reduce_grads(optimizer, find_unused_parameters=find_unused))
    result = outcome(model, reference)
    result["unused_has_grad"] = float(any(p.grad is not None for p in model.unused.parameters()))
    return result


@pytest.mark.parametrize(
    "every_rank_uses_the_branch", [True, False], ids=["ranks-agree", "find_unused_parameters=True"]
)
def test_parameters_without_gradients(ranks, every_rank_uses_the_branch):
    results = ranks.run(unused_case, every_rank_uses_the_branch)
    check(results)
    assert not any(result["unused_has_grad"] for result in results), "a parameter no rank used got a gradient"


class Mixed(torch.nn.Module):
    """An fp32 trunk and an fp64 head: two buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
        self.head = torch.nn.Linear(32, 10)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.trunk(inputs)).double())


def mixed() -> torch.nn.Module:
    model = make_model(Mixed, seed=0)
    model.head.double()
    return model


def buckets_case() -> dict[str, float]:
    batches = shard(STEPS)
    reference = reference_run(mixed(), batches)
    model = mixed()
    optimizer = fused_sgd(model.parameters())
    with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as spy:
        train(model, optimizer, batches, sync=lambda: all_reduce_grads(optimizer))
    result = outcome(model, reference)
    result["all_reduces_per_step"] = spy.call_count / len(batches)
    return result


def test_one_all_reduce_per_bucket(ranks):
    results = ranks.run(buckets_case)
    check(results)
    assert {result["all_reduces_per_step"] for result in results} == {2.0}
