"""Building blocks for a plugin's pydantic hyperparameter model, and the one
function that turns a param group into validated values.

torch keeps ``param_groups`` as plain dicts (schedulers, checkpoints and
``torch.load(weights_only=True)`` rely on that), so the model is used to
*check* a group, never stored in it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from .errors import InvalidHyperparameterError


def _real_number(value: object) -> float:
    """Accept Python and numpy reals (not bool, str, None, containers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected a real number, not {type(value).__name__}")
    return float(value)


def _real_or_scalar_tensor(value: object) -> float | torch.Tensor:
    """A learning rate may be a one-element tensor, as in torch.optim."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError("a tensor learning rate must be a one-element floating-point tensor")
        number = float(value.detach().cpu().item())
    else:
        number = _real_number(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a finite number >= 0")
    return value if isinstance(value, torch.Tensor) else number


Real = Annotated[float, BeforeValidator(_real_number), Field(allow_inf_nan=False)]
"""A finite real number."""

NonNegativeReal = Annotated[float, BeforeValidator(_real_number), Field(ge=0, allow_inf_nan=False)]
"""A finite real number >= 0."""

LearningRate = Annotated[Any, BeforeValidator(_real_or_scalar_tensor)]
"""A finite learning rate >= 0, as a number or a one-element tensor."""


def unsupported_if_true(what: str, use_instead: str) -> Callable[[bool], bool]:
    """An ``AfterValidator`` for a torch.optim flag that a fused optimizer cannot honour (it is
    accepted when False, as torch's default)::

        differentiable: Annotated[StrictBool, AfterValidator(unsupported_if_true(
            "autograd through the step", "torch.optim.SGD(differentiable=True)"))] = False
    """

    def check(value: bool) -> bool:
        if value:
            raise ValueError(f"fused optimizers do not support {what}; use {use_instead}")
        return value

    return check


def validate_group(
    model: type[BaseModel],
    group: Mapping[str, Any],
    *,
    where: str,
    partial: bool = False,
) -> BaseModel | None:
    """Validate the hyperparameters of one param group (``params`` and unknown keys ignored).

    ``partial=True`` checks only the fields present (defaults before a required one
    is filled in, a saved state_dict group); it then returns None.

    Raises :class:`InvalidHyperparameterError` naming ``where`` (e.g. "FusedSGD param group 1")
    and every failing field.
    """
    values = {key: value for key, value in group.items() if key in model.model_fields}
    try:
        return model.model_validate(values)
    except ValidationError as error:
        errors = error.errors()
        if partial:
            errors = [item for item in errors if item["type"] != "missing"]
            if not errors:
                return None
        problems = []
        for item in errors:
            field = ".".join(str(part) for part in item["loc"]) or "hyperparameters"
            shown = "" if item["type"] == "missing" or not item["loc"] else f" (got {item['input']!r})"
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"'{field}': {message}{shown}")
        raise InvalidHyperparameterError(f"{where}: invalid hyperparameter " + "; ".join(problems)) from None
