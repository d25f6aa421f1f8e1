"""Adam's hyperparameters and their rules, as a pydantic model.

The rules are torch.optim.Adam's: ``lr``, ``eps`` and ``weight_decay`` finite and >= 0, each
beta in [0, 1). ``foreach`` and ``fused`` are accepted as in torch and change nothing (the step
is always fused); ``differentiable`` and ``capturable`` must be False. Betas must be numbers
(torch also takes one-element tensors; see docs/migration.md).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from fused_core.hyperparams import LearningRate, NonNegativeReal, unsupported_if_true

Beta = Annotated[NonNegativeReal, Field(lt=1)]
NoGraphCapture = AfterValidator(
    unsupported_if_true("CUDA graph capture of the step", "torch.optim.Adam(capturable=True)")
)
NoAutograd = AfterValidator(unsupported_if_true("autograd through the step", "torch.optim.Adam(differentiable=True)"))


class AdamHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNegativeReal = 1e-8
    weight_decay: NonNegativeReal = 0.0
    amsgrad: StrictBool = False
    maximize: StrictBool = False
    foreach: StrictBool | None = None
    capturable: Annotated[StrictBool, NoGraphCapture] = False
    differentiable: Annotated[StrictBool, NoAutograd] = False
    fused: StrictBool | None = None
    decoupled_weight_decay: StrictBool = False
