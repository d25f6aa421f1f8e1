"""fused-rmsprop's hook implementations: the optimizer classes and their kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl
from fused_core.kernels import segments_kernel

from . import c_launchers as c
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
    # The CPU: one pass over memory, where a build of the C kernels gave the composites' bits.
    for kernel, flat, segments in (
        ("rmsprop", c.rmsprop_c_flat, c.rmsprop_c_segments),
        ("rmsprop_tf", c.rmsprop_tf_c_flat, c.rmsprop_tf_c_segments),
        ("adadelta", c.adadelta_c_flat, c.adadelta_c_segments),
    ):
        register(kernel, "cpu", flat, dtypes=c.c_serves)
        register(segments_kernel(kernel), "cpu", segments, dtypes=c.c_serves)
