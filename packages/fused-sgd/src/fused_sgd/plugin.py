"""fused-sgd's hook implementations: the optimizer class and its kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl
from fused_core.kernels import segments_kernel

from .kernels import (
    c_half_serves,
    c_segments_serve,
    fp32_native_fused_serves,
    native_fused_agrees,
    sgd_c_half,
    sgd_c_segments,
    sgd_composite,
    sgd_native_fused,
    sgd_native_fused_fp32_chunks,
)
from .optimizer import FusedSGD


@hookimpl
def register_optimizers(register: Callable[[type], None]) -> None:
    register(FusedSGD)


@hookimpl
def register_kernels(register: Callable[..., Any]) -> None:
    register("sgd", "*", sgd_composite)
    for device_type in ("cpu", "cuda"):
        # Later registrations win: torch's fused op where it is right for the dtype itself,
        # else its fp32 version over upcast chunks for fp16/bf16, else the composite.
        register("sgd", device_type, sgd_native_fused_fp32_chunks, dtypes=fp32_native_fused_serves)
        register("sgd", device_type, sgd_native_fused, dtypes=native_fused_agrees)
    # fp16/bf16 on the CPU: the compiled one-pass kernel, where a C compiler built it and it is right.
    register("sgd", "cpu", sgd_c_half, dtypes=c_half_serves)
    # Every dtype on the CPU, gradients read where they lie: the C kernel, where it agrees with the composite.
    register(segments_kernel("sgd"), "cpu", sgd_c_segments, dtypes=c_segments_serve)
