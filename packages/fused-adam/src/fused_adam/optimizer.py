"""FusedAdam and FusedAdamW: torch.optim.Adam and AdamW over flat buffers."""

from __future__ import annotations

from typing import Any

import torch

from fused_core import FusedOptimizer

from .hyperparams import AdamHyperparams

TORCH_GROUP_DEFAULTS = dict(
    amsgrad=False,
    maximize=False,
    foreach=None,
    capturable=False,
    differentiable=False,
    decoupled_weight_decay=False,
    fused=None,
)
"""What torch.optim.Adam's ``__setstate__`` fills into param groups saved by an older torch."""


class FusedAdam(FusedOptimizer):
    r"""Adam (and AdamW, with ``decoupled_weight_decay=True``) over flat buffers.

    Step for step the same as ``torch.optim.Adam(foreach=False)``, for every parameter with a
    gradient (:math:`t` is the parameter's own step count)::

        t = t + 1
        g = -∇θ f(θ) if maximize else ∇θ f(θ)
        if λ != 0:  θ = θ (1 - γλ) if decoupled_weight_decay else (g = g + λθ)
        m = m + (1 - β1)(g - m)
        v = β2 v + (1 - β2) g²
        v̂ = max(v̂, v) if amsgrad else v
        θ = θ - γ / (1 - β1^t) · m / (sqrt(v̂) / sqrt(1 - β2^t) + ε)

    Args: torch.optim.Adam's. ``lr`` may be a one-element tensor (computed in its dtype, as
    torch). ``foreach`` and ``fused`` are stored in the param groups and change nothing (the step
    is always fused); ``capturable`` and ``differentiable`` must be False.

    State, as torch's: ``state[p]["step"]`` (a 0-dim float32 tensor), ``"exp_avg"``, ``"exp_avg_sq"``
    and, with amsgrad, ``"max_exp_avg_sq"``; ``state_dict()`` loads into torch.optim.Adam and back.
    """

    name = "adam"
    hyperparameters = AdamHyperparams
    kernel = "adam"
    scalar_state_names = ("step",)
    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    plugin = "fused_adam.plugin"
    group_defaults = TORCH_GROUP_DEFAULTS

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """As torch.optim.Adam: ``max_exp_avg_sq`` only with amsgrad."""
        return ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 4 if group["amsgrad"] else 3]

    def converted_scalars(self, group: dict[str, Any]) -> dict[str, float]:
        """What torch.optim.Adam's step passes to ops as Python numbers, so converts to the
        parameters' dtype: the step size at its largest (the first step), and the weight decay."""
        lr, beta1, weight_decay = group["lr"], group["betas"][0], group["weight_decay"]
        scalars = {} if isinstance(lr, torch.Tensor) else {"lr / (1 - beta1)": lr / (1 - beta1)}
        if weight_decay != 0 and not group["decoupled_weight_decay"]:
            scalars["weight_decay"] = weight_decay
        elif weight_decay != 0 and not isinstance(lr, torch.Tensor):
            scalars["1 - lr * weight_decay"] = 1 - lr * weight_decay
        return scalars


class FusedAdamW(FusedAdam):
    """:class:`FusedAdam` with decoupled weight decay: ``torch.optim.AdamW(foreach=False)``, step for step."""

    name = "adamw"

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
