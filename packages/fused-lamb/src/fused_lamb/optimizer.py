"""FusedLamb and FusedAdamP: layer-wise Adam variants over flat buffers."""

from __future__ import annotations

from typing import Any

from fused_core import FusedOptimizer

from .hyperparams import AdamPHyperparams, LambHyperparams


class FillsMissingGroupKeys(FusedOptimizer):
    """Param groups loaded from a checkpoint that lacks some of this optimizer's keys (torch_npu's
    NpuFusedLamb saves only ``lr``, ``betas``, ``eps`` and ``weight_decay``) get them from the
    optimizer's defaults, the settings it was built with."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = state.get("defaults", getattr(self, "defaults", {}))
        for group in state.get("param_groups", []):
            for key, value in defaults.items():
                group.setdefault(key, value)
        super().__setstate__(state)


class FusedLamb(FillsMissingGroupKeys):
    r"""Lamb (You et al., 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes") over flat buffers: apex's FusedLAMB options, and torch_npu's NpuFusedLamb as settings.

    For every parameter with a gradient, at its step :math:`t`, with :math:`G` the global gradient
    norm over the whole optimizer (computed once per step)::

        g = g / (G / max_grad_norm)          if max_grad_norm is not None and G > max_grad_norm
        g = g + λθ                           if not adam_w_mode and λ != 0
        m = β1 m + β3 g                      β3 = 1 - β1 if grad_averaging else 1
        v = β2 v + (1 - β2) g²
        u = (m / b1) / (sqrt(v / b2) + ε)    b1 = 1 - β1^t, b2 = 1 - β2^t if bias_correction else 1
        u = u + λθ                           if adam_w_mode and λ != 0
        w = min(||θ||, max_weight_norm)      (no clamp when max_weight_norm is None)
        r = w / ||u|| if w > 0 and ||u|| > 0 else 1
        r = 1 if adam or (λ == 0 and not use_nvlamb)
        θ = θ - γ r u

    Args: apex's ``FusedLAMB(params, lr, bias_correction, betas, eps, weight_decay, amsgrad,
    adam_w_mode, grad_averaging, max_grad_norm, use_nvlamb)`` with its defaults (keywords from
    ``amsgrad`` on; ``amsgrad`` must be False; no ``set_grad_none``: ``zero_grad(set_to_none=...)``),
    ``max_grad_norm=None`` for no clipping, plus torch_npu's ``adam`` (trust ratio 1: Adam
    without bias correction) and ``max_weight_norm`` (torch_npu clamps ``||θ||`` to 10). Every
    option is a param-group hyperparameter. ``lr`` may be a one-element tensor (read as a number).

    State: ``state[p]["step"]`` (a 0-dim float32 tensor), ``"exp_avg"``, ``"exp_avg_sq"``.
    """

    name = "lamb"
    hyperparameters = LambHyperparams
    kernel = "lamb"
    elementwise = False  # trust ratio and global gradient norm: over whole parameters
    scalar_state_names = ("step",)
    state_names = ("exp_avg", "exp_avg_sq")
    plugin = "fused_lamb.plugin"

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        use_nvlamb: bool = False,
        adam: bool = False,
        max_weight_norm: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            adam_w_mode=adam_w_mode,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            use_nvlamb=use_nvlamb,
            adam=adam,
            max_weight_norm=max_weight_norm,
        )
        super().__init__(params, defaults)

    def step_values(self) -> dict[str, Any]:
        """The global gradient norm, once per step, when a param group clips by it."""
        if any(group["max_grad_norm"] is not None for group in self.param_groups):
            return {"global_grad_norm": self.grad_norm()}
        return {}


class FusedAdamP(FillsMissingGroupKeys):
    r"""AdamP (Heo et al., 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights") over flat buffers, as clovaai/AdamP and torch_npu's NpuFusedAdamP.

    For every parameter with a gradient, at its step :math:`t`::

        m = β1 m + (1 - β1) g
        v = β2 v + (1 - β2) g²
        d = sqrt(v) / sqrt(1 - β2^t) + ε
        u = (β1 m + (1 - β1) g) / d if nesterov else m / d
        ρ = 1
        for view in (rows of θ.reshape(θ.size(0), -1), all of θ):   θ of two or more dimensions only
            cos = |<g, θ>| / (||g|| + ε) / (||θ|| + ε)          per row of the view
            if max(cos) < δ / sqrt(row length):
                θ̂ = θ / (||θ|| + ε);  u = u - θ̂ <θ̂, u>;  ρ = wd_ratio  (per row of the view)
                stop
        θ = θ (1 - γ λ ρ)   if λ > 0
        θ = θ - γ / (1 - β1^t) · u

    Args: clovaai's and torch_npu's (their defaults). ``lr`` may be a one-element tensor (read as
    a number). State: ``state[p]["step"]`` (a 0-dim float32 tensor), ``"exp_avg"``, ``"exp_avg_sq"``.
    """

    name = "adamp"
    hyperparameters = AdamPHyperparams
    kernel = "adamp"
    elementwise = False  # the projection: over whole parameters
    scalar_state_names = ("step",)
    state_names = ("exp_avg", "exp_avg_sq")
    plugin = "fused_lamb.plugin"

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
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov
        )
        super().__init__(params, defaults)


__all__ = ["FillsMissingGroupKeys", "FusedAdamP", "FusedLamb"]
