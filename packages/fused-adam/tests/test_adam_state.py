"""Adam's state through the core: per-parameter ``step`` with gradients that come and go, state
that exists only in some param groups (amsgrad), and checkpoints from older torch and torch_npu.

Every comparison is with ``torch.optim.Adam/AdamW(foreach=False)``, bit for bit in fp32, on both of
the CPU's launch paths: the C segment kernel (gradients read where they lie) and the torch-ops
composite over flat runs (``FUSED_OPTIM_DISABLE_NATIVE``-like: the C launchers unregistered).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW
from fused_core import InvalidHyperparameterError, registry
from fused_core.kernels import same_bits

SIZES = (3, 64, 1000, 7, 4099)


@pytest.fixture(params=["c_segments", "composite"])
def launch_path(request, monkeypatch):
    """Run a test on the C kernel (the CPU default) and on the composite alone."""
    FusedAdam([torch.nn.Parameter(torch.zeros(1))])  # registers the plugin
    if request.param == "composite":
        from fused_adam import kernels

        monkeypatch.setattr(kernels, "c_library", lambda: None)  # what c_serves asks
        registry.kernels._resolved.clear()
        registry.kernels._verdicts.clear()
    yield request.param
    registry.kernels._resolved.clear()
    registry.kernels._verdicts.clear()


def pair(cls, reference, **config):
    generator = torch.Generator().manual_seed(7)
    ours = [torch.nn.Parameter(torch.randn(n, generator=generator)) for n in SIZES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs, cls(ours, **config), reference(theirs, foreach=False, **config)


def step_both(ours, theirs, a, b, has_grad, generator):
    for p, q, present in zip(ours, theirs, has_grad):
        g = torch.randn(p.shape, generator=generator) if present else None
        p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
    a.step()
    b.step()


def assert_same(a, b, ours, theirs):
    for p, q in zip(ours, theirs):
        assert same_bits(p.detach(), q.detach())
        mine, ref = a.state.get(p, {}), b.state.get(q, {})
        assert list(mine) == list(ref)
        for key in ref:
            assert same_bits(mine[key], ref[key]), key
            if key == "step":
                assert mine[key].dim() == 0 and mine[key].dtype == torch.float32 and mine[key].device.type == "cpu"


@pytest.mark.parametrize("cls,reference", [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)])
def test_gradients_that_come_and_go_keep_per_parameter_steps(launch_path, cls, reference) -> None:
    """Late first gradients, frozen and unfrozen parameters: each keeps its own ``step``, and its
    bias correction follows it, as torch's."""
    ours, theirs, a, b = pair(cls, reference, lr=1e-2, weight_decay=1e-2, amsgrad=True)
    expected = "adam_c_segments" if launch_path == "c_segments" else "adam_composite"
    assert set(a.launchers().values()) == {expected}
    generator = torch.Generator().manual_seed(8)
    pattern = [
        (1, 0, 1, 1, 0),
        (1, 1, 0, 1, 0),
        (0, 1, 1, 1, 1),
        (1, 1, 1, 0, 1),
        (1, 1, 1, 1, 1),
    ]
    for has_grad in pattern:
        step_both(ours, theirs, a, b, has_grad, generator)
        assert_same(a, b, ours, theirs)
    assert [int(a.state[p]["step"]) for p in ours] == [4, 4, 4, 4, 3]


def test_amsgrad_switched_on_later_is_refused_and_nothing_moves() -> None:
    """torch.optim.Adam fails with KeyError('max_exp_avg_sq'); here a clear error, before any update."""
    ours, theirs, a, b = pair(FusedAdam, torch.optim.Adam, lr=1e-2)
    generator = torch.Generator().manual_seed(9)
    step_both(ours, theirs, a, b, (1,) * len(SIZES), generator)
    a.param_groups[0]["amsgrad"] = True
    before = [p.detach().clone() for p in ours]
    steps = [a.state[p]["step"].clone() for p in ours]
    for p in ours:
        p.grad = torch.ones_like(p)
    with pytest.raises(InvalidHyperparameterError, match="max_exp_avg_sq.*amsgrad"):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, before))
    assert all(torch.equal(a.state[p]["step"], s) for p, s in zip(ours, steps))
    a.param_groups[0]["amsgrad"] = False  # switched back: steps again, as torch would
    a.step()


def test_amsgrad_only_in_one_group_has_torchs_state_keys(launch_path) -> None:
    ours, theirs, _, _ = pair(FusedAdam, torch.optim.Adam)
    a = FusedAdam([{"params": ours[:2], "amsgrad": True}, {"params": ours[2:]}], lr=1e-2)
    b = torch.optim.Adam([{"params": theirs[:2], "amsgrad": True}, {"params": theirs[2:]}], lr=1e-2, foreach=False)
    generator = torch.Generator().manual_seed(10)
    for _ in range(3):
        step_both(ours, theirs, a, b, (1,) * len(SIZES), generator)
        assert_same(a, b, ours, theirs)
    assert "max_exp_avg_sq" in a.state_dict()["state"][0] and "max_exp_avg_sq" not in a.state_dict()["state"][2]


@pytest.mark.parametrize("saved_step", [2, 2.0, "tensor"])
def test_checkpoints_with_number_steps_load(saved_step) -> None:
    """torch_npu's NpuFusedAdam saves ``step`` as an int, older torch as a float: both load (as torch's
    ``Adam.__setstate__`` converts them) and the next step matches torch loading the same state."""
    ours, theirs, a, b = pair(FusedAdam, torch.optim.Adam, lr=1e-2)
    generator = torch.Generator().manual_seed(11)
    for _ in range(2):
        step_both(ours, theirs, a, b, (1,) * len(SIZES), generator)
    saved = copy.deepcopy(b.state_dict())
    for values in saved["state"].values():
        values["step"] = torch.tensor(2.0) if saved_step == "tensor" else saved_step
    a.load_state_dict(saved)
    step_both(ours, theirs, a, b, (1,) * len(SIZES), generator)
    assert_same(a, b, ours, theirs)
    assert all(a.state[p]["step"].dtype == torch.float32 for p in ours)


def test_a_loaded_step_is_copied_not_shared() -> None:
    """Loading torch's live state_dict copies its ``step`` tensors into the flat table: stepping
    one optimizer never advances the other's counts."""
    ours, theirs, a, b = pair(FusedAdamW, torch.optim.AdamW, lr=1e-2)
    generator = torch.Generator().manual_seed(12)
    step_both(ours, theirs, a, b, (1,) * len(SIZES), generator)
    a.load_state_dict(b.state_dict())
    for p in ours:
        p.grad = torch.ones_like(p)
    a.step()
    assert [int(b.state[q]["step"]) for q in theirs] == [1] * len(SIZES)
    assert [int(a.state[p]["step"]) for p in ours] == [2] * len(SIZES)
