"""State and param groups through the core, against torch: checkpoints from older torch (param groups
without the newer keys) and from torch_npu (``step`` an int), momentum switched on after the first
step, and hyperparameters that overflow a low-precision dtype."""

from __future__ import annotations

import copy

import pytest
import torch

from fused_core import HyperparameterOverflowError, InvalidHyperparameterError
from fused_core.kernels import same_bits
from fused_rmsprop import FusedAdadelta, FusedRMSprop, FusedRMSpropTF
from fused_rmsprop.optimizer import RMSPROP_TF_GROUP_DEFAULTS

SIZES = (3, 64, 1000)
PAIRS = [(FusedRMSprop, torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9)), (FusedAdadelta, torch.optim.Adadelta, {})]


def pair(cls, reference, **config):
    generator = torch.Generator().manual_seed(7)
    ours = [torch.nn.Parameter(torch.randn(n, generator=generator)) for n in SIZES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs, cls(ours, **config), reference(theirs, foreach=False, **config)


def step_both(ours, theirs, a, b, generator) -> None:
    for p, q in zip(ours, theirs):
        g = torch.randn(p.shape, generator=generator)
        p.grad, q.grad = g.clone(), g.clone()
    a.step()
    b.step()


def assert_same(a, b, ours, theirs) -> None:
    for p, q in zip(ours, theirs):
        assert same_bits(p.detach(), q.detach())
        assert list(a.state[p]) == list(b.state[q])
        for key, value in b.state[q].items():
            assert same_bits(a.state[p][key], value), key


@pytest.mark.parametrize("cls,reference,config", PAIRS, ids=["RMSprop", "Adadelta"])
@pytest.mark.parametrize("saved_step", [2, 2.0], ids=["int", "float"])
def test_old_checkpoints_load_as_torch_loads_them(cls, reference, config, saved_step) -> None:
    """A state_dict whose param groups lack the keys torch added later (``foreach``, ``maximize``,
    ``capturable``, ``differentiable``; RMSprop's ``momentum`` kept) and whose ``step`` is a number
    (older torch: a float; torch_npu: an int): loaded into ours and into torch, the same param groups,
    and the next steps the same bits."""
    ours, theirs, a, b = pair(cls, reference, **config)
    generator = torch.Generator().manual_seed(8)
    for _ in range(2):
        step_both(ours, theirs, a, b, generator)
    saved = copy.deepcopy(b.state_dict())
    for group in saved["param_groups"]:
        for key in ("foreach", "maximize", "capturable", "differentiable", "centered"):
            group.pop(key, None)
    for values in saved["state"].values():
        values["step"] = saved_step
    a.load_state_dict(copy.deepcopy(saved))
    b.load_state_dict(copy.deepcopy(saved))
    assert [dict(g, params=None) for g in a.param_groups] == [dict(g, params=None) for g in b.param_groups]
    for _ in range(2):
        step_both(ours, theirs, a, b, generator)
        assert_same(a, b, ours, theirs)
    assert all(a.state[p]["step"].dtype == torch.float32 and float(a.state[p]["step"]) == 4 for p in ours)


def test_rmsprop_tf_groups_saved_without_the_tf_flags_read_them_as_torch_npu_does() -> None:
    """torch_npu reads a missing ``decoupled_decay`` or ``lr_in_momentum`` as False (``'lr_in_momentum' in
    group and group['lr_in_momentum']``), though the constructor's default is True."""
    params = [torch.nn.Parameter(torch.randn(4))]
    optimizer = FusedRMSpropTF(params, momentum=0.9)
    saved = optimizer.state_dict()
    for key in ("decoupled_decay", "lr_in_momentum", "maximize", "foreach"):
        del saved["param_groups"][0][key]
    optimizer.load_state_dict(saved)
    assert {key: optimizer.param_groups[0][key] for key in RMSPROP_TF_GROUP_DEFAULTS} == dict(
        RMSPROP_TF_GROUP_DEFAULTS, momentum=0.9
    )


@pytest.mark.parametrize("flag", [dict(momentum=0.9), dict(centered=True)], ids=["momentum", "centered"])
def test_state_switched_on_later_is_refused_and_nothing_moves(flag) -> None:
    """torch.optim.RMSprop fails with a KeyError when momentum or centering is switched on after a
    parameter's first step (its state lacks the buffer); here a clear error, before any update."""
    ours, theirs, a, b = pair(FusedRMSprop, torch.optim.RMSprop, lr=1e-2)
    generator = torch.Generator().manual_seed(9)
    step_both(ours, theirs, a, b, generator)
    a.param_groups[0].update(flag)
    b.param_groups[0].update(flag)
    before = [p.detach().clone() for p in ours]
    for p, q in zip(ours, theirs):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    with pytest.raises(KeyError):
        b.step()
    with pytest.raises(InvalidHyperparameterError, match="momentum_buffer|grad_avg"):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, before))


@pytest.mark.parametrize(
    "cls,reference,config",
    [
        (FusedRMSprop, torch.optim.RMSprop, dict(weight_decay=1e5)),
        (FusedRMSprop, torch.optim.RMSprop, dict(lr=1e5, momentum=0.5)),
        (FusedAdadelta, torch.optim.Adadelta, dict(lr=1e5)),
        (FusedAdadelta, torch.optim.Adadelta, dict(weight_decay=1e5)),
    ],
    ids=["rmsprop-weight_decay", "rmsprop-lr-momentum", "adadelta-lr", "adadelta-weight_decay"],
)
def test_hyperparameters_that_overflow_fp16_are_refused_as_torch_refuses_them(cls, reference, config) -> None:
    """torch's step converts ``alpha=`` arguments to the parameters' dtype and raises where they overflow
    it; ours refuses the same values, before any update."""
    ours, theirs, a, b = pair(cls, reference, **config)
    for p, q in zip(ours, theirs):
        p.data, q.data = p.data.half(), q.data.half()
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    with pytest.raises(RuntimeError, match="overflow"):
        b.step()
    before = [p.detach().clone() for p in ours]
    with pytest.raises(HyperparameterOverflowError):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, before))


@pytest.mark.parametrize(
    "cls,reference,config",
    [
        (FusedRMSprop, torch.optim.RMSprop, dict(lr=1e5)),  # addcdiv's value is not checked
        (FusedRMSprop, torch.optim.RMSprop, dict(alpha=1e6)),
    ],
    ids=["rmsprop-lr", "rmsprop-alpha"],
)
def test_hyperparameters_torch_does_not_check_are_not_refused(cls, reference, config) -> None:
    ours, theirs, a, b = pair(cls, reference, **config)
    for p, q in zip(ours, theirs):
        p.data, q.data = p.data.half(), q.data.half()
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    b.step()
    a.step()
