"""FusedSGD under torch_npu.npu.amp (GradScaler and autocast), against torch.optim.SGD under the same.

A skipped (overflow) step must leave parameters and momentum untouched, bitwise, and both
optimizers must skip the same steps. Overflows come from a loss scale too large for fp16
autocast (2**60 at the first step), which any NPU reports, or from an inf written into a
gradient, which the scaler finds by inspecting the values.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from npu_suite import cast_like_torch_npu, max_error, torch_sgd

from fused_sgd import FusedSGD, NpuFusedSGD
from fused_testing.parity import make_batches, make_model

HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
STEPS = 8
AMP_RTOL = 1e-3  # fp16 autocast: a reduction order that differs between runs moves results by fp16 ulps

CASES = {
    "first-step-overflow": dict(init_scale=2.0**60, backoff_factor=2.0**-50, poison_at=()),
    "inf-written-mid-run": dict(init_scale=2.0**16, backoff_factor=0.5, poison_at=(3, 6)),
}


def _snapshot(model, optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    return tensors + [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in optimizer.state]


def _amp_run(make_optimizer, device, torch_npu, *, formats: bool, init_scale, backoff_factor, poison_at) -> dict:
    model = make_model("convnet", device=device)
    if formats:
        cast_like_torch_npu(model, torch_npu)
    optimizer = make_optimizer(model.parameters())
    scaler = torch_npu.npu.amp.GradScaler(init_scale=init_scale, backoff_factor=backoff_factor, growth_interval=3)
    skipped, scales = [], []
    for step, (inputs, targets) in enumerate(make_batches("convnet", STEPS, seed=13, device=device)):
        optimizer.zero_grad()
        with torch_npu.npu.amp.autocast():
            outputs = model(inputs)
        scaler.scale(F.cross_entropy(outputs.float(), targets)).backward()
        if step in poison_at:
            list(model.parameters())[1].grad[5] = float("inf")  # the first conv's bias (ND)
        before = _snapshot(model, optimizer)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scale)
        if scaler.get_scale() < scale:
            skipped.append(step)
            after = _snapshot(model, optimizer)
            assert len(after) == len(before)
            assert all(torch.equal(a, b) for a, b in zip(after, before)), f"step {step} changed a tensor"
    return dict(model=model, optimizer=optimizer, skipped=skipped, scales=scales)


@pytest.mark.parametrize("formats", [False, True], ids=["default-formats", "private-formats"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cls", [FusedSGD, NpuFusedSGD], ids=lambda cls: cls.__name__)
def test_overflow_steps_are_skipped_and_the_rest_match_torch(
    device, private_formats, cls, case: str, formats: bool
) -> None:
    torch_npu = private_formats
    settings: dict[str, Any] = dict(formats=formats, **CASES[case])
    ours = _amp_run(lambda params: cls(params, **HP), device, torch_npu, **settings)
    theirs = _amp_run(lambda params: torch_sgd(params, **HP), device, torch_npu, **settings)
    expected = [0] if case.startswith("first") else list(CASES[case]["poison_at"])
    assert theirs["skipped"] == expected, f"torch.optim.SGD under this GradScaler skipped {theirs['skipped']}"
    assert ours["skipped"] == expected and ours["scales"] == theirs["scales"]
    assert max_error(list(ours["model"].parameters()), list(theirs["model"].parameters())) <= AMP_RTOL
