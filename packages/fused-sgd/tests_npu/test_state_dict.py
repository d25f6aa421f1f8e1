"""state_dict on the NPU, with private-format parameters: through a checkpoint file, into a fresh
FusedSGD, into torch.optim.SGD and back, then on as if never interrupted."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from npu_suite import (
    FIXED_RTOL,
    FRACTAL_NZ,
    FRACTAL_Z,
    NC1HWC0,
    ND,
    copies,
    make_params,
    max_error,
    run_fixed,
    torch_sgd,
)

from fused_sgd import FusedSGD

HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
SHAPES = [(16, 3, 3, 3), (16,), (8, 5, 3, 3), (20, 33), (10,)]
FORMATS = [FRACTAL_Z, ND, NC1HWC0, FRACTAL_NZ, ND]


def _params(device, torch_npu):
    params = make_params(device, shapes=SHAPES)
    for p, fmt in zip(params, FORMATS):
        p.data = torch_npu.npu_format_cast(p.data, fmt)
    return params


def _checkpoint(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("saver", "loader"), [("fused", "fused"), ("fused", "torch"), ("torch", "fused")])
def test_resume_matches_an_uninterrupted_torch_run(device, private_formats, saver: str, loader: str) -> None:
    torch_npu = private_formats
    make = {"fused": lambda params: FusedSGD(params, **HP), "torch": lambda params: torch_sgd(params, **HP)}
    first = _params(device, torch_npu)
    uninterrupted = copies(first, torch_npu)
    before = make[saver](first)
    oracle = torch_sgd(uninterrupted, **HP)
    run_fixed(before, first, 4)
    run_fixed(oracle, uninterrupted, 4)

    resumed = copies(first, torch_npu)
    after = make[loader](resumed)
    after.load_state_dict(_checkpoint(before.state_dict()))
    run_fixed(after, resumed, 4, first_step=4)
    run_fixed(oracle, uninterrupted, 4, first_step=4)
    assert max_error(resumed, uninterrupted) <= FIXED_RTOL
    if loader == "fused":
        for p, fmt in zip(resumed, FORMATS):
            assert torch_npu.get_npu_format(after.state[p]["momentum_buffer"]) == torch_npu.get_npu_format(p) == fmt


def test_state_dict_is_torchs_format(device, private_formats) -> None:
    torch_npu = private_formats
    ours = _params(device, torch_npu)
    theirs = copies(ours, torch_npu)
    optimizer, reference = FusedSGD(ours, **HP), torch_sgd(theirs, **HP)
    run_fixed(optimizer, ours, 2)
    run_fixed(reference, theirs, 2)
    mine, expected = optimizer.state_dict(), reference.state_dict()
    assert mine["state"].keys() == expected["state"].keys()
    for key, values in mine["state"].items():
        assert values.keys() == expected["state"][key].keys()
        assert max_error([values["momentum_buffer"]], [expected["state"][key]["momentum_buffer"]]) <= FIXED_RTOL
    assert [group["params"] for group in mine["param_groups"]] == [g["params"] for g in expected["param_groups"]]
