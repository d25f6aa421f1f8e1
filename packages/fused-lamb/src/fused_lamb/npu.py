"""NpuFusedLamb and NpuFusedAdamP: the optimizers under torch_npu's names, signatures, defaults
and ``zero_grad()`` default (``set_to_none=False``: the gradients are kept, zeroed)."""

from __future__ import annotations

from typing import Any

from fused_core import KeepsGradients

from .optimizer import FusedAdamP, FusedLamb

TORCH_NPU_MAX_WEIGHT_NORM = 10.0
"""torch_npu's NpuFusedLamb (as cybertronai's pytorch-lamb) clamps each weight norm to [0, 10]."""


class NpuFusedLamb(KeepsGradients, FusedLamb):
    """torch_npu's NpuFusedLamb: :class:`FusedLamb` without bias correction, with decoupled weight
    decay, the trust ratio for every parameter (``use_nvlamb``), the weight norm clamped to 10,
    and, with ``use_global_grad_norm``, the gradients divided by the global norm where it exceeds
    1 (``max_grad_norm=1``). ``adam=True``: trust ratio 1. On every device; ``zero_grad()`` keeps
    the gradients, zeroed, as torch_npu's fused optimizers do."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0,
        adam: bool = False,
        use_global_grad_norm: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            bias_correction=False,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            max_grad_norm=1.0 if use_global_grad_norm else None,
            use_nvlamb=True,
            adam=adam,
            max_weight_norm=TORCH_NPU_MAX_WEIGHT_NORM,
        )


class NpuFusedAdamP(KeepsGradients, FusedAdamP):
    """:class:`FusedAdamP` under torch_npu's name and signature, on every device; ``zero_grad()``
    keeps the gradients, zeroed, as torch_npu's fused optimizers do."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, delta, wd_ratio, nesterov)
