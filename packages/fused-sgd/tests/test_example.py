"""torch_npu's own NpuFusedSGD example, with `.npu()` dropped, runs on CPU and updates correctly."""

from __future__ import annotations

import torch

from fused_sgd import NpuFusedSGD
from fused_testing.reference import ReferenceSGD, relative_error


def test_torch_npu_example() -> None:
    params = [
        torch.arange(6).reshape(2, 3).float(),
        torch.arange(12).reshape(4, 3).float(),
        torch.arange(6).reshape(2, 3).half(),
        torch.arange(12).reshape(4, 3).half(),
        torch.arange(15).reshape(5, 3).float(),
        torch.arange(18).reshape(6, 3).half(),
        torch.arange(6).reshape(2, 3).float(),
    ]
    for i, p in enumerate(params):
        if i < len(params) - 1:
            p.requires_grad = True
            p.grad = p.clone().detach() / 100.0
    before = [p.detach().clone() for p in params]
    reference = ReferenceSGD(params, lr=0.01, momentum=0.9, weight_decay=0.001)
    reference.step([p.grad for p in params])

    opt = NpuFusedSGD(params, lr=0.01, momentum=0.9, weight_decay=0.001)
    with torch.no_grad():
        opt.step()

    # fp16 steps here (~1e-4 * |p|) are below half an fp16 ulp, so those values round back to
    # where they were, as in torch; the momentum buffers show the update was computed.
    for i, (p, expected, old) in enumerate(zip(params[:-1], reference.params, before)):
        eps = torch.finfo(p.dtype).eps
        assert relative_error(p, expected) <= eps, f"parameter {i} ({p.dtype})"
        buffer = opt.state[p]["momentum_buffer"]
        assert relative_error(buffer, reference.momentum_buffers[i]) <= eps, f"momentum of parameter {i}"
        if p.dtype == torch.float32:
            assert not torch.equal(p, old), f"parameter {i} was not updated"
    assert torch.equal(params[-1], before[-1])
    assert params[-1].grad is None
    assert len(opt.state_dict()["state"]) == 6  # momentum for the six parameters with a gradient
