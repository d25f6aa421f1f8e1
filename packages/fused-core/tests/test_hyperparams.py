"""validate_group and the building blocks of a plugin's hyperparameter model: wrong types,
out-of-range and non-finite values and missing fields are InvalidHyperparameterError naming
the field and where it was found; a one-element tensor lr is accepted."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from fused_core import InvalidHyperparameterError
from fused_core.hyperparams import LearningRate, NonNegativeReal, Real, validate_group


class Small(BaseModel):
    """A small model using every building block."""

    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    decay: NonNegativeReal = 0.0
    shift: Real = 0.0
    beta: Annotated[NonNegativeReal, Field(lt=1)] = 0.5
    flag: StrictBool = False


WHERE = "Small param group 3"
NOT_NUMBERS = ["0.1", None, [0.1], True, {"lr": 0.1}, 1 + 2j]


def _fails(group: dict, *fields: str, where: str = WHERE, partial: bool = False) -> str:
    with pytest.raises(InvalidHyperparameterError) as info:
        validate_group(Small, group, where=where, partial=partial)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    message = str(info.value)
    assert where in message
    for field in fields:
        assert f"'{field}'" in message, message
    return message


@pytest.mark.parametrize("field", ["lr", "decay", "shift", "beta"])
@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_wrong_types_are_rejected(field: str, value: object) -> None:
    group = {"lr": 0.1, field: value}
    message = _fails(group, field)
    assert f"{value!r}" in message  # what was given is shown


@pytest.mark.parametrize("field", ["lr", "decay", "beta"])
@pytest.mark.parametrize("value", [-1e-3, -1.0, math.nan, math.inf, -math.inf])
def test_negative_and_non_finite_are_rejected(field: str, value: float) -> None:
    _fails({"lr": 0.1, field: value}, field)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_real_must_be_finite(value: float) -> None:
    _fails({"lr": 0.1, "shift": value}, "shift")


@pytest.mark.parametrize("value", [1.0, 1.5])
def test_field_constraints_of_the_plugin_apply(value: float) -> None:
    _fails({"lr": 0.1, "beta": value}, "beta")


def test_flag_is_strict() -> None:
    _fails({"lr": 0.1, "flag": 1}, "flag")
    _fails({"lr": 0.1, "flag": "true"}, "flag")


def test_every_failing_field_is_named() -> None:
    message = _fails({"lr": -1, "decay": "x", "beta": 2.0}, "lr", "decay", "beta")
    assert "'shift'" not in message and "'flag'" not in message


def test_missing_required_field() -> None:
    _fails({"decay": 0.1}, "lr")


def test_partial_ignores_missing_fields_only() -> None:
    assert validate_group(Small, {"decay": 0.1}, where=WHERE, partial=True) is None
    assert validate_group(Small, {}, where=WHERE, partial=True) is None
    _fails({"decay": -0.1}, "decay", partial=True)
    _fails({"lr": "0.1"}, "lr", partial=True)


def test_valid_values_are_returned_and_unknown_keys_ignored() -> None:
    group = {
        "params": [torch.zeros(3)],
        "lr": 0.25,
        "decay": 2,
        "shift": -3.5,
        "beta": Fraction(3, 4),  # any numbers.Real
        "flag": True,
        "foreach": None,
    }
    values = validate_group(Small, group, where=WHERE)
    assert values == Small(lr=0.25, decay=2.0, shift=-3.5, beta=0.75, flag=True)
    assert validate_group(Small, {"lr": 0}, where=WHERE).lr == 0.0


@pytest.mark.parametrize("lr", [torch.tensor(0.1), torch.tensor([0.01]), torch.tensor([[0.5]], dtype=torch.float64)])
def test_one_element_tensor_lr_is_accepted(lr: torch.Tensor) -> None:
    assert validate_group(Small, {"lr": lr}, where=WHERE).lr is lr


@pytest.mark.parametrize(
    "lr",
    [
        torch.tensor([0.1, 0.2]),
        torch.tensor([]),
        torch.tensor(1),  # integer
        torch.tensor(-0.1),
        torch.tensor(math.nan),
        torch.tensor([math.inf]),
    ],
    ids=["two-elements", "empty", "integer", "negative", "nan", "inf"],
)
def test_other_tensor_lr_is_rejected(lr: torch.Tensor) -> None:
    _fails({"lr": lr}, "lr")


def test_optimizer_validates_defaults_and_each_group(signum, generator) -> None:
    params = [torch.nn.Parameter(torch.randn(200, 30, generator=generator)) for _ in range(2)]
    with pytest.raises(InvalidHyperparameterError, match="Signum defaults.*'lr'"):
        signum.Signum(params, lr="0.1")
    with pytest.raises(InvalidHyperparameterError, match="Signum param group 1.*'beta'"):
        signum.Signum([{"params": params[:1]}, {"params": params[1:], "beta": 1.0}], lr=0.1)
    with pytest.raises(InvalidHyperparameterError, match="Signum param group 0.*'lr'"):
        signum.Signum(params)  # lr is required
    optimizer = signum.Signum([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], lr=0.1)
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.5]
    with pytest.raises(InvalidHyperparameterError, match="Signum param group 2.*'lr'"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))], "lr": -1.0})
    assert len(optimizer.param_groups) == 2
    saved = optimizer.state_dict()
    saved["param_groups"][1]["beta"] = math.nan
    with pytest.raises(InvalidHyperparameterError, match="state_dict param group 1.*'beta'"):
        optimizer.load_state_dict(saved)
