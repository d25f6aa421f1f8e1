"""fused-rmsprop's hook implementations: the optimizer classes and their kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl

from .kernels import adadelta_composite, rmsprop_composite, rmsprop_tf_composite
from .optimizer import FusedAdadelta, FusedRMSprop, FusedRMSpropTF


@hookimpl
def register_optimizers(register: Callable[[type], None]) -> None:
    register(FusedRMSprop)
    register(FusedRMSpropTF)
    register(FusedAdadelta)


@hookimpl
def register_kernels(register: Callable[..., Any]) -> None:
    # torch ops: any device, any dtype.
    register("rmsprop", "*", rmsprop_composite)
    register("rmsprop_tf", "*", rmsprop_tf_composite)
    register("adadelta", "*", adadelta_composite)
