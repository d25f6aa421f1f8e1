"""fused-lion: tensor-fused Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

from .hyperparams import LionHyperparams
from .optimizer import FusedLion

__all__ = ["FusedLion", "LionHyperparams"]
__version__ = "0.1.0"
