"""fused-lion's hook implementations: the optimizer class and its kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl
from fused_core.kernels import segments_kernel

from .kernels import c_serves, lion_c_flat, lion_c_segments, lion_composite
from .optimizer import FusedLion


@hookimpl
def register_optimizers(register: Callable[[type], None]) -> None:
    register(FusedLion)


@hookimpl
def register_kernels(register: Callable[..., Any]) -> None:
    register("lion", "*", lion_composite)  # torch ops: any device, any dtype
    # The CPU: one pass over memory, where a build of the C kernel gave the composite's bits.
    register("lion", "cpu", lion_c_flat, dtypes=c_serves)
    register(segments_kernel("lion"), "cpu", lion_c_segments, dtypes=c_serves)
