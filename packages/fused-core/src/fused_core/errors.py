"""Exceptions raised by fused-core. Every message names the offending parameter, field or plugin."""

from __future__ import annotations


class FusedOptimError(Exception):
    """Base class of every fused-optim error."""


class InvalidHyperparameterError(FusedOptimError, ValueError, TypeError):
    """A hyperparameter failed validation.

    It is both a ``ValueError`` (what torch.optim and torch_npu raise) and a
    ``TypeError`` (what torch_npu's documentation names for the Nesterov
    conflict), so code written against either catches it.
    """


class HyperparameterOverflowError(InvalidHyperparameterError, RuntimeError):
    """A hyperparameter is finite but too large for the parameters' dtype: torch's step raises
    ``RuntimeError`` ("value cannot be converted to type ... without overflow"), and so do we,
    before anything is updated."""


class InvalidParameterError(FusedOptimError, ValueError):
    """A parameter (or its gradient) cannot be managed by a fused optimizer."""


class ParameterReallocatedError(FusedOptimError, RuntimeError):
    """A parameter's storage changed in a way the optimizer cannot re-adopt."""


class PluginError(FusedOptimError, RuntimeError):
    """A plugin registered something invalid (a taken name, an unknown device...)."""


class UnknownOptimizerError(FusedOptimError, KeyError):
    """``create_optimizer`` was given a name no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])
