"""Lion's hyperparameters and their rules, as a pydantic model.

The rules are those of the paper's reference implementation (google/automl, ``lion/lion_pytorch.py``),
which are torch.optim.Adam's: ``lr`` finite and >= 0, each beta in [0, 1); ``weight_decay`` finite and
>= 0 as in torch (the reference does not check it). ``maximize`` is torch's flag; ``foreach`` is
accepted as in torch and changes nothing (the step is always fused). Betas must be numbers.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from fused_core.hyperparams import LearningRate, NonNegativeReal

Beta = Annotated[NonNegativeReal, Field(lt=1)]


class LionHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    betas: tuple[Beta, Beta] = (0.9, 0.99)
    weight_decay: NonNegativeReal = 0.0
    maximize: StrictBool = False
    foreach: StrictBool | None = None
