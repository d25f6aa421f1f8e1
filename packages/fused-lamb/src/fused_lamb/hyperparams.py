"""Lamb's and AdamP's hyperparameters and their rules, as pydantic models.

Both follow torch.optim.Adam's rules for what they share with it (neither torch_npu's
NpuFusedAdamP nor apex's FusedLAMB checks anything; NpuFusedLamb checks these): ``lr`` and ``eps``
finite and >= 0, each beta in [0, 1), ``weight_decay`` finite and >= 0. Lamb's ``max_grad_norm``
and ``max_weight_norm`` are finite and > 0, or None (no clipping, no clamp); ``amsgrad`` must be
False, as apex's FusedLAMB requires. AdamP's ``delta`` and ``wd_ratio`` are finite and >= 0.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from fused_core.hyperparams import LearningRate, NonNegativeReal, unsupported_if_true

Beta = Annotated[NonNegativeReal, Field(lt=1)]
PositiveReal = Annotated[NonNegativeReal, Field(gt=0)]
NoAmsgrad = AfterValidator(unsupported_if_true("AMSGrad in Lamb", "FusedAdam(amsgrad=True)"))


class LambHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    bias_correction: StrictBool = True
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNegativeReal = 1e-6
    weight_decay: NonNegativeReal = 0.01
    amsgrad: Annotated[StrictBool, NoAmsgrad] = False
    adam_w_mode: StrictBool = True
    grad_averaging: StrictBool = True
    max_grad_norm: PositiveReal | None = 1.0
    use_nvlamb: StrictBool = False
    adam: StrictBool = False
    max_weight_norm: PositiveReal | None = None


class AdamPHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNegativeReal = 1e-8
    weight_decay: NonNegativeReal = 0.0
    delta: NonNegativeReal = 0.1
    wd_ratio: NonNegativeReal = 0.1
    nesterov: StrictBool = False
