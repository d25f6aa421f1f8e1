"""FusedRMSprop, FusedRMSpropTF and FusedAdadelta: torch.optim.RMSprop, torch_npu's RMSpropTF and
torch.optim.Adadelta over flat buffers."""

from __future__ import annotations

from typing import Any

import torch

from fused_core import FusedOptimizer

from .hyperparams import AdadeltaHyperparams, RMSpropHyperparams, RMSpropTFHyperparams

RMSPROP_GROUP_DEFAULTS = dict(
    momentum=0, centered=False, foreach=None, maximize=False, differentiable=False, capturable=False
)
"""What torch.optim.RMSprop's ``__setstate__`` fills into param groups saved by an older torch."""
RMSPROP_TF_GROUP_DEFAULTS = dict(
    momentum=0, centered=False, decoupled_decay=False, lr_in_momentum=False, foreach=None, maximize=False
)
"""What a param group saved without them means to torch_npu's NpuFusedRMSpropTF (which reads a
missing ``decoupled_decay`` or ``lr_in_momentum`` as False)."""
ADADELTA_GROUP_DEFAULTS = dict(foreach=None, maximize=False, differentiable=False, capturable=False)
"""What torch.optim.Adadelta's ``__setstate__`` fills into param groups saved by an older torch."""


class FusedRMSprop(FusedOptimizer):
    r"""RMSprop (Hinton's lecture 6e; centered: Graves 2013) over flat buffers.

    Step for step the same as ``torch.optim.RMSprop(foreach=False)``, for every parameter with a gradient::

        g = -∇θ f(θ) if maximize else ∇θ f(θ)
        if λ != 0:  g = g + λθ
        v = α v + (1 - α) g²
        if centered:  ḡ = ḡ + (1 - α)(g - ḡ);  a = sqrt(v - ḡ²) + ε
        else:         a = sqrt(v) + ε
        if μ > 0:  b = μ b + g / a;  θ = θ - γ b
        else:      θ = θ - γ g / a

    with v, ḡ, b starting at zero. Args: torch.optim.RMSprop's (``lr`` may be a one-element
    tensor). ``foreach`` is stored in the param groups and changes nothing; ``capturable`` and
    ``differentiable`` must be False.

    State, as torch's: ``state[p]["step"]`` (a 0-dim float32 tensor), ``"square_avg"``, and
    ``"momentum_buffer"`` with momentum > 0, ``"grad_avg"`` when centered; ``state_dict()`` loads
    into torch.optim.RMSprop and back.
    """

    name = "rmsprop"
    hyperparameters = RMSpropHyperparams
    kernel = "rmsprop"
    scalar_state_names = ("step",)
    state_names = ("square_avg", "momentum_buffer", "grad_avg")
    plugin = "fused_rmsprop.plugin"
    group_defaults = RMSPROP_GROUP_DEFAULTS

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            alpha=alpha,
            eps=eps,
            centered=centered,
            weight_decay=weight_decay,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """As torch.optim.RMSprop: ``momentum_buffer`` only with momentum > 0, ``grad_avg`` only when centered."""
        return (
            ("step", "square_avg")
            + (("momentum_buffer",) if group["momentum"] > 0 else ())
            + (("grad_avg",) if group["centered"] else ())
        )

    def converted_scalars(self, group: dict[str, Any]) -> dict[str, float]:
        """What torch.optim.RMSprop's step passes as ``alpha=`` and so converts to the parameters'
        dtype: the weight decay, and ``lr`` (a number) with momentum."""
        scalars = {"weight_decay": group["weight_decay"]} if group["weight_decay"] != 0 else {}
        if group["momentum"] > 0 and not isinstance(group["lr"], torch.Tensor):
            scalars["lr"] = group["lr"]
        return scalars


class FusedRMSpropTF(FusedOptimizer):
    r"""RMSprop as TensorFlow computes it, as torch_npu's ``NpuFusedRMSpropTF`` defines it, over flat buffers::

        g = -∇θ f(θ) if maximize else ∇θ f(θ)
        if λ != 0:  θ = θ - λθ if decoupled_decay else (g = g + λθ)
        v = v + (1 - α)(g² - v)
        if centered:  ḡ = ḡ + (1 - α)(g - ḡ);  a = sqrt(v - ḡ² + ε)
        else:         a = sqrt(v + ε)
        if μ > 0 and lr_in_momentum:  b = μ b + γ g / a;  θ = θ - b
        elif μ > 0:                   b = μ b + g / a;    θ = θ - γ b
        else:                         θ = θ - γ g / a

    with v starting at **one** (TensorFlow's initialisation), ḡ and b at zero. Unlike
    torch.optim.RMSprop: ε inside the square root, α = 0.9 and ε = 1e-10 by default, the learning
    rate inside the momentum buffer by default, and the decoupled decay is not scaled by the learning
    rate (torch_npu's). ``maximize`` and ``foreach`` are torch's (not torch_npu's) and default to
    what torch_npu does. State: ``step`` (a 0-dim float32 tensor), ``square_avg``, and
    ``momentum_buffer``/``grad_avg`` as torch.optim.RMSprop keeps them.
    """

    name = "rmsprop_tf"
    hyperparameters = RMSpropTFHyperparams
    kernel = "rmsprop_tf"
    scalar_state_names = ("step",)
    state_names = ("square_avg", "momentum_buffer", "grad_avg")
    plugin = "fused_rmsprop.plugin"
    group_defaults = RMSPROP_TF_GROUP_DEFAULTS

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
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            alpha=alpha,
            eps=eps,
            centered=centered,
            weight_decay=weight_decay,
            decoupled_decay=decoupled_decay,
            lr_in_momentum=lr_in_momentum,
            foreach=foreach,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    state_names_for = FusedRMSprop.state_names_for

    def converted_scalars(self, group: dict[str, Any]) -> dict[str, float]:
        """What the step (and :class:`fused_rmsprop.reference.RMSpropTF`) passes as ``alpha=`` and so
        converts to the parameters' dtype: ``1 - alpha``, the weight decay, ``lr`` (a number) where
        it scales the momentum buffer."""
        scalars = {"1 - alpha": 1 - group["alpha"]}
        if group["weight_decay"] != 0:
            scalars["weight_decay"] = group["weight_decay"]
        if group["momentum"] > 0 and not group["lr_in_momentum"] and not isinstance(group["lr"], torch.Tensor):
            scalars["lr"] = group["lr"]
        return scalars


class FusedAdadelta(FusedOptimizer):
    r"""Adadelta (Zeiler, 2012) over flat buffers.

    Step for step the same as ``torch.optim.Adadelta(foreach=False)``, for every parameter with a gradient::

        g = -∇θ f(θ) if maximize else ∇θ f(θ)
        if λ != 0:  g = g + λθ
        v = ρ v + (1 - ρ) g²
        Δ = sqrt(u + ε) / sqrt(v + ε) · g
        u = ρ u + (1 - ρ) Δ²
        θ = θ - γ Δ

    with v (``square_avg``) and u (``acc_delta``) starting at zero. Args: torch.optim.Adadelta's
    (``lr`` may be a one-element tensor). ``foreach`` is stored in the param groups and changes
    nothing; ``capturable`` and ``differentiable`` must be False. State, as torch's:
    ``state[p]["step"]`` (a 0-dim float32 tensor), ``"square_avg"``, ``"acc_delta"``.
    """

    name = "adadelta"
    hyperparameters = AdadeltaHyperparams
    kernel = "adadelta"
    scalar_state_names = ("step",)
    state_names = ("square_avg", "acc_delta")
    plugin = "fused_rmsprop.plugin"
    group_defaults = ADADELTA_GROUP_DEFAULTS

    def __init__(
        self,
        params: Any,
        lr: Any = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            capturable=capturable,
            foreach=foreach,
            differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def converted_scalars(self, group: dict[str, Any]) -> dict[str, float]:
        """What torch.optim.Adadelta's step passes as ``alpha=``: ``lr`` (a number), the weight decay."""
        scalars = {} if isinstance(group["lr"], torch.Tensor) else {"lr": group["lr"]}
        if group["weight_decay"] != 0:
            scalars["weight_decay"] = group["weight_decay"]
        return scalars
