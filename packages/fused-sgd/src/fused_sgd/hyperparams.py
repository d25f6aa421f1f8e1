"""SGD's hyperparameters and their rules, as a pydantic model.

The rules are torch.optim.SGD's and torch_npu's NpuFusedSGD's: ``lr``,
``momentum`` and ``weight_decay`` are finite and >= 0; Nesterov momentum needs
``momentum > 0`` and ``dampening == 0``. Strings, None, bools and containers are
rejected rather than coerced.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, StrictBool, model_validator

from fused_core.hyperparams import LearningRate, NonNegativeReal, Real


class SGDHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    momentum: NonNegativeReal = 0.0
    dampening: Real = 0.0
    weight_decay: NonNegativeReal = 0.0
    nesterov: StrictBool = False
    maximize: StrictBool = False

    @model_validator(mode="after")
    def _nesterov_needs_plain_momentum(self) -> SGDHyperparams:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "'nesterov': Nesterov momentum requires momentum > 0 and dampening == 0 "
                f"(got momentum={self.momentum}, dampening={self.dampening})"
            )
        return self
