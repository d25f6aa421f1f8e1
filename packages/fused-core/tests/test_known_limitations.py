"""The documented limits of the per-step staleness check (docs/constraints.md, "What we cannot
see"), one test each, marked ``xfail(strict=True)``: they show the limit is real, and the suite
turns red as soon as one is lifted (then drop its marker and move the test next to its topic).
``pytest --runxfail`` shows the failures themselves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_testing import relative_error

bug = pytest.mark.xfail(strict=True)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10))


def _batch(generator: torch.Generator):
    return torch.randn(32, 48, generator=generator), torch.randint(0, 10, (32,), generator=generator)


@bug(reason="staleness check misses a gradient set to None mid-run while the old one is still referenced")
def test_middle_grad_set_to_none_while_referenced_elsewhere(signum, generator) -> None:
    """Layout.is_current watches storage use counts, the gradless parameters, and the gradient
    object and data pointer of the first and last parameter of each run. ``p.grad = None`` on a
    parameter inside a run drops no use count while the old gradient tensor is referenced
    elsewhere (here a gradient logger): the step still runs that parameter on its stale flat
    gradient instead of skipping it, as torch.optim does."""
    model = _mlp()
    twin = copy.deepcopy(model)
    optimizer = signum.Signum(model.parameters(), lr=0.01)
    reference = signum.Reference(twin.parameters(), lr=0.01)
    for step in range(4):
        batch = _batch(generator)
        for m, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(m(batch[0]), batch[1]).backward()
        logged = {name: p.grad for name, p in model.named_parameters()}  # e.g. a gradient-norm logger
        if step == 3:  # skip the middle layer's update this step
            model[2].weight.grad = None
            twin[2].weight.grad = None
        optimizer.step()
        reference.step()
        for (name, p), r in zip(model.named_parameters(), twin.parameters()):
            assert relative_error(p, r) <= 1e-6, f"step {step}: {name}"
    assert len(logged) == 6


@bug(reason="staleness check misses a re-pointed parameter mid-run when a new view keeps the use count")
def test_middle_param_reassigned_while_a_new_view_exists(signum, generator) -> None:
    """``p.data = new`` on a parameter inside a run drops one use count of the flat param buffer,
    a new ``detach()`` of another parameter adds one, and the run's first and last parameters
    are untouched: the step updates the old slot, ``p`` itself is never updated."""
    params = [nn.Parameter(torch.randn(1000, generator=generator)) for _ in range(3)]
    optimizer = signum.Signum(params, lr=0.1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    kept = params[0].detach()  # e.g. a snapshot holding one tensor
    new = torch.randn(1000, generator=generator)
    params[1].data = new.clone()
    optimizer.step()
    assert kept.shape == (1000,)
    assert not torch.equal(params[1].detach(), new), "parameter 1 was not updated"
