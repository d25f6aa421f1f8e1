"""The documented limits of the per-step staleness check (docs/constraints.md, "What we cannot
see"), one test each, marked ``xfail(strict=True)``: they show the limit is real, and the suite
turns red as soon as one is lifted (then drop its marker and move the test next to its topic).
``pytest --runxfail`` shows the failures themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bug = pytest.mark.xfail(strict=True)


@bug(reason="without the CPU gradient reader, a re-pointed parameter is missed if a new view keeps the use count")
def test_middle_param_reassigned_while_a_new_view_exists(signum, generator) -> None:
    """``p.data = new`` on a parameter inside a group's range drops one use count of the flat param
    buffer, a new ``detach()`` of another parameter adds one, and the range's first and last
    parameters are untouched: the step updates the old slot, ``p`` itself is never updated. (With
    the CPU gradient reader and a segment launcher, as FusedSGD has, every parameter's address is
    checked at every step; this plugin has no segment launcher.)"""
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
