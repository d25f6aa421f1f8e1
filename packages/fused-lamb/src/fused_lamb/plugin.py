"""fused-lamb's hook implementations: the optimizer classes and their kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fused_core import hookimpl

from .adamp_kernels import adamp_composite
from .lamb_kernels import lamb_composite
from .optimizer import FusedAdamP, FusedLamb


@hookimpl
def register_optimizers(register: Callable[[type], None]) -> None:
    register(FusedLamb)
    register(FusedAdamP)


@hookimpl
def register_kernels(register: Callable[..., Any]) -> None:
    register("lamb", "*", lamb_composite)  # torch ops: any device, any dtype
    register("adamp", "*", adamp_composite)
