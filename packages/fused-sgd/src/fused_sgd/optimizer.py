"""FusedSGD and NpuFusedSGD."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import required

from fused_core import FusedOptimizer, KeepsGradients

from .hyperparams import SGDHyperparams


class FusedSGD(FusedOptimizer):
    r"""SGD with momentum, Nesterov momentum, weight decay and maximize, over flat buffers.

    Step for step the same as ``torch.optim.SGD(foreach=False)``::

        for t = 1, 2, ...:
            g = -∇θ f(θ_{t-1}) if maximize else ∇θ f(θ_{t-1})
            if λ != 0:  g = g + λ θ_{t-1}
            if μ != 0:
                b_t = g if t == 1 else μ b_{t-1} + (1 - τ) g
                g = g + μ b_t if nesterov else b_t
            θ_t = θ_{t-1} - γ g

    Args:
        params: tensors, param-group dicts, or ``(name, tensor)`` pairs from
            ``model.named_parameters()``.
        lr: learning rate γ (default 1e-3, as torch; a number or a one-element tensor).
        momentum: μ (default 0).
        dampening: τ (default 0).
        weight_decay: λ, L2 penalty (default 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted and stored in the param groups as in torch; changes nothing (the
            step is always fused).
        fused: the same.
        differentiable: must be False (no autograd through a fused step).

    On the first ``step()`` every parameter moves into a flat buffer per (device,
    dtype); momentum buffers follow the same layout. Gradients are read where they lie
    (``p.grad is g`` stays true), and a parameter whose ``.grad`` is None is skipped, as in
    torch. ``zero_grad()`` is torch's (``set_to_none=True``: every ``.grad`` becomes None).
    """

    name = "sgd"
    hyperparameters = SGDHyperparams
    kernel = "sgd"
    state_names = ("momentum_buffer",)
    plugin = "fused_sgd.plugin"
    # What torch.optim.SGD's __setstate__ fills into param groups saved by an older torch.
    group_defaults = dict(nesterov=False, maximize=False, foreach=None, differentiable=False, fused=False)

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults)

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """As torch.optim.SGD: momentum buffers exist only once a step ran with momentum != 0."""
        return self.state_names if group["momentum"] != 0 else ()

    def converted_scalars(self, group: dict[str, Any]) -> dict[str, float]:
        """What torch.optim.SGD's step passes as ``alpha`` and so converts to the parameters' dtype:
        ``lr`` (a number), ``weight_decay`` when used, ``1 - dampening`` with momentum and
        ``momentum`` with Nesterov (``momentum`` itself multiplies and is never converted)."""
        scalars = {}
        if not isinstance(group["lr"], torch.Tensor):
            scalars["lr"] = group["lr"]
        if group["weight_decay"] != 0:
            scalars["weight_decay"] = group["weight_decay"]
        if group["momentum"] != 0:
            scalars["1 - dampening"] = 1 - group["dampening"]
        if group["nesterov"]:
            scalars["momentum"] = group["momentum"]
        return scalars


class NpuFusedSGD(KeepsGradients, FusedSGD):
    """:class:`FusedSGD` under torch_npu's name and exact signature (``lr`` required), on every
    device; ``zero_grad()`` keeps the gradients, zeroed, as torch_npu's does."""

    def __init__(
        self,
        params: Any,
        lr: Any = required,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov)
