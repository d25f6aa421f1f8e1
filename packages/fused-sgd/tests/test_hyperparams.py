"""FusedSGD's and NpuFusedSGD's hyperparameter rules: clear errors naming the field, nothing mutated."""

from __future__ import annotations

import inspect

import pytest
import torch

from fused_core import InvalidHyperparameterError
from fused_sgd import FusedSGD, NpuFusedSGD


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))]


BAD = [
    ({"lr": -0.1}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": float("inf")}, "lr"),
    ({"lr": "0.1"}, "lr"),
    ({"lr": None}, "lr"),
    ({"lr": [0.1]}, "lr"),
    ({"lr": 0.1, "momentum": -0.9}, "momentum"),
    ({"lr": 0.1, "momentum": float("nan")}, "momentum"),
    ({"lr": 0.1, "momentum": "0.9"}, "momentum"),
    ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay"),
    ({"lr": 0.1, "weight_decay": float("inf")}, "weight_decay"),
    ({"lr": 0.1, "dampening": float("nan")}, "dampening"),
    ({"lr": 0.1, "nesterov": "yes"}, "nesterov"),
    ({"lr": 0.1, "nesterov": True}, "nesterov"),
    ({"lr": 0.1, "nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
]


@pytest.mark.parametrize("cls", [FusedSGD, NpuFusedSGD])
@pytest.mark.parametrize("kwargs,field", BAD, ids=lambda x: repr(x))
def test_bad_hyperparameters_name_the_field(cls, kwargs: dict, field: str) -> None:
    params = _params()
    before = [p.detach().clone() for p in params]
    with pytest.raises(InvalidHyperparameterError, match=f"'{field}'"):
        cls(params, **kwargs)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_torch_rejects_the_same_values() -> None:
    """Our rules are at least torch's: whatever torch.optim.SGD rejects, we reject."""
    for kwargs, _ in BAD:
        try:
            torch.optim.SGD(_params(), **kwargs)
        except (ValueError, TypeError):
            with pytest.raises(InvalidHyperparameterError):
                FusedSGD(_params(), **kwargs)


def test_nesterov_conflict_is_value_error_and_type_error() -> None:
    for kwargs in ({"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.5}):
        with pytest.raises(ValueError):
            NpuFusedSGD(_params(), lr=0.1, nesterov=True, **kwargs)
        with pytest.raises(TypeError):
            NpuFusedSGD(_params(), lr=0.1, nesterov=True, **kwargs)


def test_missing_lr_is_value_error() -> None:
    with pytest.raises(ValueError, match="'lr'"):
        NpuFusedSGD(_params())
    with pytest.raises(ValueError, match="param group 1.*'lr'"):
        NpuFusedSGD([{"params": _params()[:1], "lr": 0.1}, {"params": _params()[1:]}])


def test_bad_param_group_and_add_param_group_leave_optimizer_unchanged() -> None:
    params = _params()
    with pytest.raises(InvalidHyperparameterError, match="param group 1.*'momentum'"):
        FusedSGD([{"params": params[:1]}, {"params": params[1:], "momentum": -1.0}], lr=0.1)
    opt = FusedSGD(params[:1], lr=0.1)
    with pytest.raises(InvalidHyperparameterError, match="param group 1.*'weight_decay'"):
        opt.add_param_group({"params": params[1:], "weight_decay": float("nan")})
    assert len(opt.param_groups) == 1


def test_valid_values_are_kept_as_given() -> None:
    lr = torch.tensor(0.05)
    opt = FusedSGD(_params(), lr=lr, momentum=1, weight_decay=0, nesterov=True)
    group = opt.param_groups[0]
    assert group["lr"] is lr and group["momentum"] == 1 and group["nesterov"] is True and group["maximize"] is False


def test_signatures() -> None:
    npu = inspect.signature(NpuFusedSGD)
    assert list(npu.parameters) == ["params", "lr", "momentum", "dampening", "weight_decay", "nesterov"]
    assert [npu.parameters[n].default for n in ("momentum", "dampening", "weight_decay", "nesterov")] == [
        0,
        0,
        0,
        False,
    ]
    fused = inspect.signature(FusedSGD)
    assert list(fused.parameters)[:6] == list(npu.parameters)
    assert fused.parameters["maximize"].kind is inspect.Parameter.KEYWORD_ONLY
    assert issubclass(FusedSGD, torch.optim.Optimizer) and issubclass(NpuFusedSGD, FusedSGD)
