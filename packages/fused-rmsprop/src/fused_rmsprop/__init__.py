"""fused-rmsprop: tensor-fused RMSprop, RMSpropTF and Adadelta, drop-ins for torch.optim.RMSprop and
torch.optim.Adadelta and for torch_npu's NpuFusedRMSprop, NpuFusedRMSpropTF and NpuFusedAdadelta."""

from .hyperparams import AdadeltaHyperparams, RMSpropHyperparams, RMSpropTFHyperparams
from .npu import NpuFusedAdadelta, NpuFusedRMSprop, NpuFusedRMSpropTF
from .optimizer import FusedAdadelta, FusedRMSprop, FusedRMSpropTF

__all__ = [
    "AdadeltaHyperparams",
    "FusedAdadelta",
    "FusedRMSprop",
    "FusedRMSpropTF",
    "NpuFusedAdadelta",
    "NpuFusedRMSprop",
    "NpuFusedRMSpropTF",
    "RMSpropHyperparams",
    "RMSpropTFHyperparams",
]
__version__ = "0.1.0"
