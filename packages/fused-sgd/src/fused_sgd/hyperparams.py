"""SGD's hyperparameters and their rules, as a pydantic model.

The rules are torch.optim.SGD's and torch_npu's NpuFusedSGD's: ``lr``,
``momentum`` and ``weight_decay`` are finite and >= 0; Nesterov momentum needs
``momentum > 0`` and ``dampening == 0``. Strings, None, bools and containers are
rejected rather than coerced. ``foreach`` and ``fused`` are accepted as in torch
and change nothing (the step is always fused); ``differentiable`` must be False.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool, ValidationInfo, field_validator

from fused_core.hyperparams import LearningRate, NonNegativeReal, Real, unsupported_if_true


class SGDHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    momentum: NonNegativeReal = 0.0
    dampening: Real = 0.0
    weight_decay: NonNegativeReal = 0.0
    nesterov: StrictBool = False
    maximize: StrictBool = False
    foreach: StrictBool | None = None
    differentiable: Annotated[
        StrictBool,
        AfterValidator(unsupported_if_true("autograd through the step", "torch.optim.SGD(differentiable=True)")),
    ] = False
    fused: StrictBool | None = None

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_plain_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        # A field validator (not a model validator) so that the error names 'nesterov'.
        # momentum and dampening are validated first; one that failed is reported on its own.
        momentum, dampening = info.data.get("momentum"), info.data.get("dampening")
        if nesterov and momentum is not None and dampening is not None and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum requires momentum > 0 and dampening == 0 "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        return nesterov
