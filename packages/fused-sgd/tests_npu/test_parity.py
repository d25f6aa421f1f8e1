"""FusedSGD and NpuFusedSGD on the NPU against torch.optim.SGD(foreach=False) on the NPU."""

from __future__ import annotations

import pytest
import torch
from npu_suite import FIXED_RTOL, copies, grid, grid_id, make_params, max_error, run_fixed, torch_sgd, train_pair

from fused_sgd import FusedSGD, NpuFusedSGD
from fused_testing.reference import ReferenceSGD

STEPS = 10


def _two_groups(params: list) -> list[dict]:
    return [{"params": params[0::2]}, {"params": params[1::2], "lr": 0.02}]


@pytest.mark.parametrize("hp", grid(), ids=grid_id)
def test_fused_sgd_matches_torch_over_the_grid(device: torch.device, hp: dict) -> None:
    ours = make_params(device)
    theirs = copies(ours)
    optimizer = FusedSGD(_two_groups(ours), lr=0.05, **hp)
    reference = torch_sgd(_two_groups(theirs), lr=0.05, **hp)
    run_fixed(optimizer, ours, STEPS)
    run_fixed(reference, theirs, STEPS)
    assert all(p.device.type == "npu" for p in ours)
    assert max_error(ours, theirs) <= FIXED_RTOL
    if hp["momentum"]:
        buffers = [optimizer.state[p]["momentum_buffer"] for p in ours]
        assert max_error(buffers, [reference.state[q]["momentum_buffer"] for q in theirs]) <= FIXED_RTOL


@pytest.mark.parametrize("hp", grid(maximize=False), ids=grid_id)
def test_npu_fused_sgd_matches_torch_over_the_grid(device: torch.device, hp: dict) -> None:
    ours = make_params(device)
    theirs = copies(ours)
    run_fixed(NpuFusedSGD(ours, 0.05, **hp), ours, STEPS)  # torch_npu's positional signature
    run_fixed(torch_sgd(theirs, lr=0.05, **hp), theirs, STEPS)
    assert max_error(ours, theirs) <= FIXED_RTOL


def _error_against_float64(optimizer_cls, device: torch.device, dtype: torch.dtype, **extra) -> float:
    """Eight steps on the NPU against the float64 reference run on the CPU with the same gradients."""
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    params = make_params(device, dtype, shapes=[(4095,), (10, 100), (7, 11)])
    reference = ReferenceSGD([p.detach().cpu() for p in params], **hp)
    optimizer = optimizer_cls(params, **hp, **extra)
    for step in range(8):
        generator = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.to(device)
        optimizer.step()
        reference.step(grads)
    return max_error(params, reference.params)


def test_each_dtype_is_as_close_to_a_float64_reference_as_torch(device: torch.device, dtype: torch.dtype) -> None:
    """fp16/bf16 are computed in fp32 and rounded once per step; fp32 as torch does."""
    ours = _error_against_float64(FusedSGD, device, dtype)
    torch_error = _error_against_float64(torch.optim.SGD, device, dtype, foreach=False)
    eps = torch.finfo(dtype).eps
    assert ours <= 8 * eps, f"{dtype}: {ours:.3e} > 8 ulps"
    assert ours <= torch_error + eps, f"{dtype}: ours {ours:.3e} vs torch.optim.SGD {torch_error:.3e}"


@pytest.mark.parametrize("model_kind", ["mlp", "convnet", "deep-mlp"])
@pytest.mark.parametrize("cls", [FusedSGD, NpuFusedSGD], ids=lambda cls: cls.__name__)
def test_training_matches_torch(device: torch.device, model_kind: str, cls) -> None:
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    pair = train_pair(
        lambda model: torch_sgd(model.parameters(), **hp),
        lambda model: cls(model.parameters(), **hp),
        device,
        model_kind=model_kind,
    )
    pair.assert_parity()
    assert pair.losses_b[0] != pair.losses_b[-1]  # training really moved the parameters


def test_mixed_dtypes_in_one_group(device: torch.device) -> None:
    """fp32 and fp16 parameters in one group (torch_npu's example has both): one bucket each."""
    params = make_params(device, shapes=[(6, 3), (12, 3)]) + make_params(device, torch.float16, seed=1)
    theirs = copies(params)
    optimizer = FusedSGD(params, lr=0.05, momentum=0.9)
    run_fixed(optimizer, params, STEPS)
    run_fixed(torch_sgd(theirs, lr=0.05, momentum=0.9), theirs, STEPS)
    assert [flat.dtype for flat in optimizer.get_combined_params()] == [torch.float32, torch.float16]
    assert max_error(params[:2], theirs[:2]) <= FIXED_RTOL
    assert max_error(params[2:], theirs[2:]) <= STEPS * torch.finfo(torch.float16).eps
