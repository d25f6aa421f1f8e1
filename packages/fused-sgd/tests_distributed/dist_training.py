"""What the ranks run: models, data shards, the training loop and the comparisons.

The functions run inside a rank of a :class:`rank_pool.RankPool`, with the gloo process
group initialised (:func:`check` and the marks serve the test process). The oracle is
``torch.optim.SGD(foreach=False)`` under the same wrapper, on a model built from the same
seed, fed the same batches; each rank trains on its own shard (batches drawn from a seed
of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fused_sgd import FusedSGD
from fused_testing.parity import make_batches, make_model
from fused_testing.reference import relative_error

HYPERPARAMETERS: dict[str, Any] = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
STEPS = 12
RTOL = 1e-5
"""Relative tolerance in fp32 against torch.optim.SGD (fused_testing.reference.relative_error)."""

Batches = list[tuple[Tensor, Tensor]]

ORDERS = ["ddp-first", "optimizer-first"]
"""The orders of construction under DDP: wrap first and build the optimizer over
``ddp.parameters()`` (the usual one), or lay out the optimizer's flat buffers first."""


def torch_sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, foreach=False, **HYPERPARAMETERS)


def fused_sgd(params: Any) -> FusedSGD:
    return FusedSGD(params, **HYPERPARAMETERS)


def shard(steps: int = STEPS, *, epoch: int = 0) -> Batches:
    """This rank's batches (inputs of 64 features, 10 classes): a seed per rank and epoch."""
    return make_batches("mlp", steps, seed=1000 * (epoch + 1) + dist.get_rank())


class Branchy(nn.Module):
    """A trunk and a head, a branch that only the ranks with ``use_branch`` use, and a
    head that no rank uses: what DDP's ``find_unused_parameters=True`` is for."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        self.branch = nn.Linear(32, 10)
        self.unused = nn.Linear(32, 10)
        self.use_branch = True

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.trunk(inputs)
        out = self.head(hidden)
        return out + self.branch(hidden) if self.use_branch else out


def mlp() -> nn.Module:
    return make_model("mlp", seed=0)


def branchy(use_branch: bool) -> nn.Module:
    model = make_model(Branchy, seed=0)
    model.use_branch = use_branch
    return model


def train(
    forward: Callable[[Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor]],
    sync: Callable[[], None] | None = None,
    set_to_none: bool | None = None,
) -> None:
    """``zero_grad`` (``set_to_none=None``: each optimizer's default), forward, cross-entropy,
    backward, ``sync()``, step."""
    for inputs, targets in batches:
        if set_to_none is None:
            optimizer.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(forward(inputs), targets).backward()
        if sync is not None:
            sync()
        optimizer.step()


def average_gradients(model: nn.Module) -> None:
    """Average the gradients over the ranks, one all-reduce per parameter (a fixed summation
    order, so two runs that start equal stay equal)."""
    for param in model.parameters():
        if param.grad is not None:
            param.grad.div_(dist.get_world_size())
            dist.all_reduce(param.grad)


def max_error(model: nn.Module, reference: nn.Module) -> float:
    """The largest relative error of ``model``'s parameters against ``reference``'s."""
    expected = dict(reference.named_parameters())
    return max(relative_error(param, expected[name]) for name, param in model.named_parameters())


def spread(model: nn.Module) -> float:
    """The largest relative difference between this rank's parameters and rank 0's."""
    errors = []
    for param in model.parameters():
        rank0 = param.detach().clone()
        dist.broadcast(rank0, src=0)
        errors.append(relative_error(param, rank0))
    return max(errors)


def outcome(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    return {"error": max_error(model, reference), "spread": spread(model)}


def check(results: list[dict[str, float]]) -> None:
    """In the test process: every rank matches the oracle, and the replicas agree exactly."""
    for rank, result in enumerate(results):
        assert result["error"] <= RTOL, f"rank {rank}: relative error {result['error']:.3e} against torch.optim.SGD"
        assert result["spread"] == 0.0, f"rank {rank}: differs from rank 0 by {result['spread']:.3e}"
