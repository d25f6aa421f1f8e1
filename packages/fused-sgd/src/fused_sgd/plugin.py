"""fused-sgd's hook implementations: the optimizer class and its kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl
from fused_core.kernels import segments_kernel

from .kernels import (
    c_flat_serves,
    c_segments_serve,
    fp32_native_fused_serves,
    native_fused_agrees,
    sgd_c_flat,
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
    # CUDA (later registrations win): torch's fused op where it is right for the dtype itself,
    # else its fp32 version over upcast chunks for fp16/bf16, else the composite. Not on the CPU,
    # where every launcher of a dtype must give the composite's bits (see fused_sgd.kernels).
    register("sgd", "cuda", sgd_native_fused_fp32_chunks, dtypes=fp32_native_fused_serves)
    register("sgd", "cuda", sgd_native_fused, dtypes=native_fused_agrees)
    # Flat slices on the CPU: the compiled one-pass kernel, where a build passed its bit-exact self-check.
    register("sgd", "cpu", sgd_c_flat, dtypes=c_flat_serves)
    # Every dtype on the CPU, gradients read where they lie: the same C kernel.
    register(segments_kernel("sgd"), "cpu", sgd_c_segments, dtypes=c_segments_serve)
