"""NpuFusedRMSprop, NpuFusedRMSpropTF and NpuFusedAdadelta: the optimizers under torch_npu's names,
signatures and ``zero_grad()`` default (``set_to_none=False``: the gradients are kept, zeroed)."""

from __future__ import annotations

from typing import Any

from fused_core import KeepsGradients

from .optimizer import FusedAdadelta, FusedRMSprop, FusedRMSpropTF


class NpuFusedRMSprop(KeepsGradients, FusedRMSprop):
    """:class:`FusedRMSprop` under torch_npu's name and signature, on every device; ``zero_grad()``
    keeps the gradients, zeroed, as torch_npu's fused optimizers do. The centered average is
    torch's ``lerp_`` (torch_npu's ``mul_().add_()`` rounds differently; the same math)."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
    ) -> None:
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered)


class NpuFusedRMSpropTF(KeepsGradients, FusedRMSpropTF):
    """:class:`FusedRMSpropTF` under torch_npu's name and signature, on every device; ``zero_grad()``
    keeps the gradients, zeroed, as torch_npu's fused optimizers do."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        alpha: float = 0.9,
        eps: float = 1e-10,
        weight_decay: float = 0,
        momentum: float = 0.0,
        centered: bool = False,
        decoupled_decay: bool = False,
        lr_in_momentum: bool = True,
    ) -> None:
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, decoupled_decay, lr_in_momentum)


class NpuFusedAdadelta(KeepsGradients, FusedAdadelta):
    """:class:`FusedAdadelta` under torch_npu's name and signature, on every device; ``zero_grad()``
    keeps the gradients, zeroed, as torch_npu's fused optimizers do."""

    def __init__(
        self, params: Any, lr: Any = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0
    ) -> None:
        super().__init__(params, lr, rho, eps, weight_decay)
