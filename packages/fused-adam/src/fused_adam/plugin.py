"""fused-adam's hook implementations: the optimizer classes and their kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl
from fused_core.kernels import segments_kernel

from .bert_adam import FusedBertAdam
from .bert_kernels import bert_adam_composite
from .kernels import adam_c_flat, adam_c_segments, adam_composite, adam_native_fused, c_serves, native_fused_agrees
from .optimizer import FusedAdam, FusedAdamW


@hookimpl
def register_optimizers(register: Callable[[type], None]) -> None:
    register(FusedAdam)
    register(FusedAdamW)
    register(FusedBertAdam)


@hookimpl
def register_kernels(register: Callable[..., Any]) -> None:
    register("adam", "*", adam_composite)
    # CUDA: torch's fused op, where it matches the composite for the dtype.
    register("adam", "cuda", adam_native_fused, dtypes=native_fused_agrees)
    # The CPU: one pass over memory, where a build of the C kernel gave the composite's bits.
    register("adam", "cpu", adam_c_flat, dtypes=c_serves)
    register(segments_kernel("adam"), "cpu", adam_c_segments, dtypes=c_serves)
    register("bert_adam", "*", bert_adam_composite)  # BertAdam: torch ops, any device and dtype
