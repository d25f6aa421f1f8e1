"""BertAdam's hyperparameters and their rules, as a pydantic model.

The rules are torch_npu's ``NpuFusedBertAdam``'s (and pytorch-pretrained-BERT's ``BertAdam``'s):
``lr`` >= 0; ``warmup`` -1 (no warmup) or in [0, 1); ``schedule`` one of ``warmup_cosine``,
``warmup_constant``, ``warmup_linear``, ``warmup_poly``; ``b1`` and ``b2`` in [0, 1); ``e`` >= 0.
Two are stricter than torch_npu's: ``weight_decay`` >= 0 (torch_npu ignores a negative one) and
``t_total`` -1 (a constant learning rate) or > 0 (torch_npu divides by 0). Every number must be a
finite real; ``max_grad_norm`` <= 0 turns clipping off, as in torch_npu.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from fused_core.hyperparams import LearningRate, NonNegativeReal, Real

Beta = Annotated[NonNegativeReal, Field(lt=1)]
Schedule = Literal["warmup_cosine", "warmup_constant", "warmup_linear", "warmup_poly"]


def minus_one_or(rule: str, holds: Callable[[float], bool]) -> AfterValidator:
    """A validator accepting -1 (off), or a value for which ``holds(value)`` is true."""

    def check(value: float) -> float:
        if value != -1 and not holds(value):
            raise ValueError(f"must be -1 or {rule}")
        return value

    return AfterValidator(check)


class BertAdamHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    warmup: Annotated[Real, minus_one_or("in [0, 1)", lambda x: 0 <= x < 1)] = -1
    t_total: Annotated[Real, minus_one_or("> 0", lambda x: x > 0)] = -1
    schedule: Schedule = "warmup_linear"
    b1: Beta = 0.9
    b2: Beta = 0.999
    e: NonNegativeReal = 1e-6
    weight_decay: NonNegativeReal = 0.01
    max_grad_norm: Real = 1.0
