"""NpuFusedAdam and NpuFusedAdamW: the optimizers under torch_npu's names, signatures and
``zero_grad()`` default (``set_to_none=False``: the gradients are kept, zeroed)."""

from __future__ import annotations

from typing import Any

from fused_core import KeepsGradients

from .optimizer import FusedAdam, FusedAdamW


class NpuFusedAdam(KeepsGradients, FusedAdam):
    """:class:`FusedAdam` under torch_npu's name and signature, on every device; ``zero_grad()``
    keeps the gradients, zeroed, as torch_npu's fused optimizers do."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)


class NpuFusedAdamW(KeepsGradients, FusedAdamW):
    """:class:`FusedAdamW` under torch_npu's name and signature, on every device; ``zero_grad()``
    keeps the gradients, zeroed, as torch_npu's fused optimizers do."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)
