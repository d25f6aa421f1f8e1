"""State and checkpoints beyond the conformance suite: torch_npu's checkpoints (an int ``step``,
NpuFusedLamb's four param-group keys) load and continue as an uninterrupted run; the global
gradient norm is a step value, never stored; it is computed only when a group clips by it."""

from __future__ import annotations

import io

import pytest
import torch

from fused_lamb import FusedLamb, NpuFusedAdamP, NpuFusedLamb
from fused_lamb.reference import Lamb, NpuAdamP, NpuLamb

SHAPES = [(12, 10), (10,), (3, 4, 5)]
TORCH_NPU_GROUP_KEYS = {
    NpuFusedLamb: ("lr", "betas", "eps", "weight_decay"),
    NpuFusedAdamP: ("lr", "betas", "eps", "weight_decay", "delta", "wd_ratio", "nesterov"),
}
REFERENCES = {NpuFusedLamb: NpuLamb, NpuFusedAdamP: NpuAdamP}
CONFIGS = {
    NpuFusedLamb: dict(lr=1e-2, weight_decay=1e-2, use_global_grad_norm=True),
    NpuFusedAdamP: dict(lr=1e-2, weight_decay=1e-2, delta=1e3, nesterov=True),
}


def seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)))


def give(params, generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def torch_npu_checkpoint(reference: torch.optim.Optimizer, cls) -> dict:
    """What torch_npu's optimizer would have saved after the reference's steps: ``step`` a Python
    int, the moments as tensors, param groups with torch_npu's keys only; through torch.save."""
    saved = reference.state_dict()
    state = {
        index: {"step": int(entry["step"]), "exp_avg": entry["exp_avg"], "exp_avg_sq": entry["exp_avg_sq"]}
        for index, entry in saved["state"].items()
    }
    groups = [{key: group[key] for key in (*TORCH_NPU_GROUP_KEYS[cls], "params")} for group in saved["param_groups"]]
    buffer = io.BytesIO()
    torch.save({"state": state, "param_groups": groups}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls", [NpuFusedLamb, NpuFusedAdamP])
def test_torch_npu_checkpoints_load_and_continue(cls) -> None:
    generator = torch.Generator().manual_seed(seed())
    start = [torch.randn(shape, generator=generator) for shape in SHAPES]
    ref_params = [torch.nn.Parameter(value.clone()) for value in start]
    reference = REFERENCES[cls](ref_params, **CONFIGS[cls])
    for _ in range(3):
        give(ref_params, generator)
        reference.step()
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    optimizer = cls(params, **CONFIGS[cls])
    optimizer.load_state_dict(torch_npu_checkpoint(reference, cls))
    assert set(optimizer.param_groups[0]) == set(reference.param_groups[0])  # filled from the constructor's settings
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        reference.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert optimizer.state[p]["step"].dtype == torch.float32 and float(optimizer.state[p]["step"]) == 6


def test_the_global_norm_is_a_step_value_never_stored() -> None:
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = FusedLamb(params, lr=1e-2)
    give(params, torch.Generator().manual_seed(seed()))
    optimizer.step()
    saved = optimizer.state_dict()
    assert all("global_grad_norm" not in group for group in (*optimizer.param_groups, *saved["param_groups"]))
    assert all(set(entry) == {"step", "exp_avg", "exp_avg_sq"} for entry in saved["state"].values())


def test_the_global_norm_is_computed_only_when_a_group_clips(monkeypatch) -> None:
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = FusedLamb(params, lr=1e-2, max_grad_norm=None)
    calls = []
    monkeypatch.setattr(optimizer, "grad_norm", lambda *args: calls.append(args) or torch.tensor(1.0))
    give(params, torch.Generator().manual_seed(seed()))
    optimizer.step()
    assert calls == []
    optimizer.param_groups[0]["max_grad_norm"] = 5.0  # as a scheduler or the user may
    optimizer.step()
    assert len(calls) == 1


def test_groups_clip_by_their_own_threshold_against_one_global_norm() -> None:
    """Every group divides by ``G / max_grad_norm`` with the same ``G``, over all groups' gradients."""
    generator = torch.Generator().manual_seed(seed())
    start = [torch.randn(shape, generator=generator) for shape in SHAPES]
    sides = []
    for cls in (FusedLamb, Lamb):
        params = [torch.nn.Parameter(value.clone()) for value in start]
        groups = [
            {"params": params[:1], "max_grad_norm": 2.0},
            {"params": params[1:2]},
            {"params": params[2:], "max_grad_norm": None},
        ]
        sides.append((params, cls(groups, lr=1e-2, max_grad_norm=0.5)))  # fmt: skip
    for _ in range(3):
        grads = [torch.randn(value.shape, generator=generator) for value in start]
        for params, optimizer in sides:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for p, q in zip(sides[0][0], sides[1][0]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
