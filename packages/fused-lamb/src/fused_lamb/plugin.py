"""fused-lamb's hook implementations: the optimizer classes and their kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl
from fused_core.kernels import segments_kernel

from .adamp_kernels import adamp_composite
from .lamb_kernels import c_serves, lamb_c_flat, lamb_c_segments, lamb_composite
from .optimizer import FusedAdamP, FusedLamb


@hookimpl
def register_optimizers(register: Callable[[type], None]) -> None:
    register(FusedLamb)
    register(FusedAdamP)


@hookimpl
def register_kernels(register: Callable[..., Any]) -> None:
    register("lamb", "*", lamb_composite)  # torch ops: any device, any dtype
    register("adamp", "*", adamp_composite)
    # The CPU: Lamb's C kernel (two passes over memory, gradients read where they lie), where a
    # build agreed with the composite.
    register("lamb", "cpu", lamb_c_flat, dtypes=c_serves)
    register(segments_kernel("lamb"), "cpu", lamb_c_segments, dtypes=c_serves)
