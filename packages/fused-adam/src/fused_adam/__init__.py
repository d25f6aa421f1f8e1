"""fused-adam: tensor-fused Adam and AdamW, drop-ins for torch.optim.Adam/AdamW and torch_npu's
NpuFusedAdam/NpuFusedAdamW."""

from .hyperparams import AdamHyperparams
from .npu import NpuFusedAdam, NpuFusedAdamW
from .optimizer import FusedAdam, FusedAdamW

__all__ = ["AdamHyperparams", "FusedAdam", "FusedAdamW", "NpuFusedAdam", "NpuFusedAdamW"]
__version__ = "0.1.0"
