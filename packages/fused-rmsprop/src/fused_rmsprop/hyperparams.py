"""The hyperparameters of RMSprop, RMSpropTF and Adadelta and their rules, as pydantic models.

The rules are torch's (torch.optim.RMSprop, torch.optim.Adadelta) and torch_npu's
(NpuFusedRMSpropTF): ``lr``, ``eps``, ``weight_decay``, ``momentum`` and ``alpha`` finite and >= 0;
Adadelta's ``rho`` in [0, 1]. ``foreach`` is accepted as in torch and changes nothing (the step is
always fused); ``capturable`` and ``differentiable`` must be False.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from fused_core.hyperparams import LearningRate, NonNegativeReal, unsupported_if_true


def no_graph_capture(torch_class: str) -> AfterValidator:
    return AfterValidator(unsupported_if_true("CUDA graph capture of the step", f"{torch_class}(capturable=True)"))


def no_autograd(torch_class: str) -> AfterValidator:
    return AfterValidator(unsupported_if_true("autograd through the step", f"{torch_class}(differentiable=True)"))


class RMSpropHyperparams(BaseModel):
    """torch.optim.RMSprop's: ``alpha`` >= 0 (no upper bound, as torch)."""

    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    alpha: NonNegativeReal = 0.99
    eps: NonNegativeReal = 1e-8
    weight_decay: NonNegativeReal = 0.0
    momentum: NonNegativeReal = 0.0
    centered: StrictBool = False
    capturable: Annotated[StrictBool, no_graph_capture("torch.optim.RMSprop")] = False
    foreach: StrictBool | None = None
    maximize: StrictBool = False
    differentiable: Annotated[StrictBool, no_autograd("torch.optim.RMSprop")] = False


class RMSpropTFHyperparams(BaseModel):
    """torch_npu's NpuFusedRMSpropTF's, with ``maximize`` and ``foreach`` as torch's optimizers have them."""

    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    alpha: NonNegativeReal = 0.9
    eps: NonNegativeReal = 1e-10
    weight_decay: NonNegativeReal = 0.0
    momentum: NonNegativeReal = 0.0
    centered: StrictBool = False
    decoupled_decay: StrictBool = False
    lr_in_momentum: StrictBool = True
    foreach: StrictBool | None = None
    maximize: StrictBool = False


class AdadeltaHyperparams(BaseModel):
    """torch.optim.Adadelta's: ``rho`` in [0, 1]."""

    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    rho: Annotated[NonNegativeReal, Field(le=1)] = 0.9
    eps: NonNegativeReal = 1e-6
    weight_decay: NonNegativeReal = 0.0
    foreach: StrictBool | None = None
    capturable: Annotated[StrictBool, no_graph_capture("torch.optim.Adadelta")] = False
    maximize: StrictBool = False
    differentiable: Annotated[StrictBool, no_autograd("torch.optim.Adadelta")] = False
