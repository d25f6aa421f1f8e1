"""fused-sgd's hook implementations: the optimizer class and its kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl

from .kernels import native_fused_agrees, sgd_composite, sgd_native_fused
from .optimizer import FusedSGD


@hookimpl
def register_optimizers(register: Callable[[type], None]) -> None:
    register(FusedSGD)


@hookimpl
def register_kernels(register: Callable[..., Any]) -> None:
    register("sgd", "*", sgd_composite)
    for device_type in ("cpu", "cuda"):
        register("sgd", device_type, sgd_native_fused, dtypes=native_fused_agrees)
