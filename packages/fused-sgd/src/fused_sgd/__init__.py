"""fused-sgd: tensor-fused SGD, a drop-in for torch.optim.SGD and torch_npu's NpuFusedSGD."""

from .hyperparams import SGDHyperparams
from .optimizer import FusedSGD, NpuFusedSGD

__all__ = ["FusedSGD", "NpuFusedSGD", "SGDHyperparams"]
__version__ = "0.1.0"
