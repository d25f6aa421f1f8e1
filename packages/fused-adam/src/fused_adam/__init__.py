"""fused-adam: tensor-fused Adam and AdamW, drop-ins for torch.optim.Adam/AdamW and torch_npu's
NpuFusedAdam/NpuFusedAdamW; and BertAdam, torch_npu's NpuFusedBertAdam."""

from .bert_adam import FusedBertAdam, NpuFusedBertAdam
from .bert_hyperparams import BertAdamHyperparams
from .hyperparams import AdamHyperparams
from .npu import NpuFusedAdam, NpuFusedAdamW
from .optimizer import FusedAdam, FusedAdamW

__all__ = [
    "AdamHyperparams",
    "BertAdamHyperparams",
    "FusedAdam",
    "FusedAdamW",
    "FusedBertAdam",
    "NpuFusedAdam",
    "NpuFusedAdamW",
    "NpuFusedBertAdam",
]
__version__ = "0.1.0"
