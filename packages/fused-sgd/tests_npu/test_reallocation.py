"""Re-allocation on the NPU: what torch_npu's NpuFusedSGD calls "unpredictable" is detected and
re-adopted here, for ND and private-format parameters, and the updates go on matching torch."""

from __future__ import annotations

import pytest
import torch
from npu_suite import FIXED_RTOL, FRACTAL_Z, NC1HWC0, ND, copies, make_params, max_error, run_fixed, torch_sgd

from fused_sgd import FusedSGD

HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
SHAPES = [(16, 3, 3, 3), (16,), (8, 5, 3, 3), (10, 64), (10,)]


def _params(device, torch_npu, formats):
    params = make_params(device, shapes=SHAPES)
    for p, fmt in zip(params, formats):
        p.data = torch_npu.npu_format_cast(p.data, fmt)
    return params


@pytest.mark.parametrize("fmt", [ND, FRACTAL_Z], ids=["ND", "FRACTAL_Z"])
def test_p_data_same_shape_is_readopted_with_momentum_kept(device, private_formats, fmt: int) -> None:
    torch_npu = private_formats
    formats = [fmt, ND, NC1HWC0, ND, ND]
    ours = _params(device, torch_npu, formats)
    theirs = copies(ours, torch_npu)
    optimizer, reference = FusedSGD(ours, **HP), torch_sgd(theirs, **HP)
    run_fixed(optimizer, ours, 3)
    run_fixed(reference, theirs, 3)

    new = torch.randn(SHAPES[0], generator=torch.Generator().manual_seed(9)).to(device)
    ours[0].data = torch_npu.npu_format_cast(new.clone(), fmt)
    theirs[0].data = torch_npu.npu_format_cast(new.clone(), fmt)
    run_fixed(optimizer, ours, 3, first_step=3)
    run_fixed(reference, theirs, 3, first_step=3)
    assert max_error(ours, theirs) <= FIXED_RTOL
    assert torch_npu.get_npu_format(ours[0]) == fmt
    flat = optimizer.get_combined_params()[0]
    assert flat.data_ptr() <= ours[0].data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()


def test_zero_grad_set_to_none_then_backward(device, private_formats) -> None:
    torch_npu = private_formats
    ours = _params(device, torch_npu, [FRACTAL_Z, ND, NC1HWC0, ND, ND])
    theirs = copies(ours, torch_npu)
    optimizer, reference = FusedSGD(ours, **HP), torch_sgd(theirs, **HP)
    for step in range(6):
        for opt, params in ((optimizer, ours), (reference, theirs)):
            opt.zero_grad(set_to_none=True)
            loss = sum((p.float() * (i + step + 1)).square().mean() for i, p in enumerate(params) if i != step % 5)
            loss.backward()  # one parameter a step gets no gradient and is skipped
            opt.step()
    assert max_error(ours, theirs) <= FIXED_RTOL


def _move(params, reference, target: torch.device) -> None:
    for p in params:
        p.data = p.data.to(target)
        p.grad = None
    if reference is not None:  # torch.optim.SGD does not move its state; do it by hand
        for state in reference.state.values():
            state["momentum_buffer"] = state["momentum_buffer"].to(target)


def _moved_run(device, torch_npu, targets):
    ours = _params(device, torch_npu, [FRACTAL_Z, ND, NC1HWC0, ND, ND])
    theirs = copies(ours, torch_npu)
    optimizer, reference = FusedSGD(ours, **HP), torch_sgd(theirs, **HP)
    run_fixed(optimizer, ours, 3)
    run_fixed(reference, theirs, 3)
    for step, target in enumerate(targets):
        _move(ours, None, target)
        _move(theirs, reference, target)
        run_fixed(optimizer, ours, 2, first_step=10 + 2 * step)
        run_fixed(reference, theirs, 2, first_step=10 + 2 * step)
        assert all(p.device.type == target.type for p in ours)
        assert all(flat.device.type == target.type for flat in optimizer.get_combined_params())
        assert max_error(ours, theirs) <= FIXED_RTOL, f"after the move to {target}"


def test_model_moved_to_the_cpu_carries_momentum(device, private_formats) -> None:
    _moved_run(device, private_formats, [torch.device("cpu")])


def test_model_moved_back_to_the_npu_carries_momentum(device, private_formats) -> None:
    _moved_run(device, private_formats, [torch.device("cpu"), device])


@pytest.mark.parametrize("change", [(ND, FRACTAL_Z), (FRACTAL_Z, ND)], ids=["ND-to-FRACTAL_Z", "FRACTAL_Z-to-ND"])
def test_p_data_in_another_format_is_rebound_in_that_format(device, private_formats, change) -> None:
    torch_npu = private_formats
    before, after = change
    ours = _params(device, torch_npu, [ND, ND, before, ND, ND])
    theirs = copies(ours, torch_npu)
    optimizer, reference = FusedSGD(ours, **HP), torch_sgd(theirs, **HP)
    run_fixed(optimizer, ours, 3)
    run_fixed(reference, theirs, 3)
    for params in (ours, theirs):
        params[2].data = torch_npu.npu_format_cast(params[2].data.clone(), after)
    run_fixed(optimizer, ours, 3, first_step=3)
    run_fixed(reference, theirs, 3, first_step=3)
    momentum = optimizer.state[ours[2]]["momentum_buffer"]
    assert torch_npu.get_npu_format(momentum) == torch_npu.get_npu_format(ours[2]) == after
    assert max_error(ours, theirs) <= FIXED_RTOL
