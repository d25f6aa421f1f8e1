"""fused-lamb: tensor-fused Lamb and AdamP, layer-wise Adam variants over flat buffers; drop-ins
for apex's FusedLAMB and torch_npu's NpuFusedLamb and NpuFusedAdamP."""

from .hyperparams import AdamPHyperparams, LambHyperparams
from .npu import NpuFusedAdamP, NpuFusedLamb
from .optimizer import FusedAdamP, FusedLamb

__all__ = ["AdamPHyperparams", "FusedAdamP", "FusedLamb", "LambHyperparams", "NpuFusedAdamP", "NpuFusedLamb"]
__version__ = "0.1.0"
