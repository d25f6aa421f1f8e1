"""fused-core: what every tensor-fused optimizer shares.

Dtype buckets (:mod:`~fused_core.buckets`), flat buffers (:mod:`~fused_core.flat`),
re-allocation detection (:mod:`~fused_core.layout`), the kernel launch registry
(:mod:`~fused_core.kernels`), device backends (:mod:`~fused_core.backends`), plugin
hooks (:mod:`~fused_core.hookspecs`, :mod:`~fused_core.plugins`) and
:class:`FusedOptimizer`, the base class of every plugin's optimizer.
"""

from .errors import (
    FusedOptimError,
    HyperparameterOverflowError,
    InvalidHyperparameterError,
    InvalidParameterError,
    ParameterReallocatedError,
    PluginError,
    UnknownOptimizerError,
)
from .hookspecs import hookimpl
from .optimizer import FusedOptimizer, KeepsGradients
from .plugins import available_optimizers, create_optimizer, register_plugin, registry

__all__ = [
    "FusedOptimError",
    "FusedOptimizer",
    "HyperparameterOverflowError",
    "InvalidHyperparameterError",
    "InvalidParameterError",
    "KeepsGradients",
    "ParameterReallocatedError",
    "PluginError",
    "UnknownOptimizerError",
    "available_optimizers",
    "create_optimizer",
    "hookimpl",
    "register_plugin",
    "registry",
]
__version__ = "0.1.0"
