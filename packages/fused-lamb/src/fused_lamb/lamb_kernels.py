r"""The Lamb update on flat slices.

For every parameter :math:`\theta` with gradient :math:`g`, at its step :math:`t`, with the
global gradient norm :math:`G` (over every parameter of the optimizer, computed once per step)::

    g   = g / (G / max_grad_norm)        if max_grad_norm is set and G > max_grad_norm
    g   = g + λ θ                        if not adam_w_mode and λ != 0   (L2)
    m   = β1 m + β3 g                    β3 = 1 - β1 with grad_averaging, else 1
    v   = β2 v + (1 - β2) g²
    u   = (m / b1) / (sqrt(v / b2) + ε)  b1, b2 = 1 - β1^t, 1 - β2^t with bias_correction, else 1
    u   = u + λ θ                        if adam_w_mode and λ != 0       (decoupled)
    w   = min(||θ||, max_weight_norm)    ||.||: the parameter's 2-norm, summed in fp64
    r   = w / ||u||   if w > 0 and ||u|| > 0, else 1
    r   = 1           if adam, or if λ == 0 and not use_nvlamb
    θ   = θ - γ r u

* :func:`lamb_composite`: torch ops over the run's slices, any device and dtype; both norms per
  parameter from :func:`fused_core.reductions.segment_norms` (no loop over parameters), the
  trust ratio expanded to the elements; fp16/bf16 in fp32, a few whole parameters at a time
  (:func:`fused_lamb.layerwise.in_fp32_runs`), rounded once. The elementwise ops are those of
  :class:`fused_lamb.reference.Lamb` in its order.
* :func:`lamb_c_flat` and :func:`lamb_c_segments` (CPU, fp32/fp64/bf16/fp16): ``csrc/lamb.c``, two
  passes over memory (moments and both norms, then the step), checked against the composite when
  the library loads (:func:`c_kernel_matches_composite`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fused_core.kernels import RunInfo, as_float
from fused_core.reductions import segment_norms

from .layerwise import count_step, expand, in_fp32_runs

MOMENTS = ("exp_avg", "exp_avg_sq")


def uses_trust_ratio(hp: Mapping[str, Any]) -> bool:
    """Whether the trust ratio scales the step: not in ``adam`` mode; with ``weight_decay == 0`` only
    with ``use_nvlamb`` (apex's rule; torch_npu's NpuFusedLamb sets it)."""
    return not hp["adam"] and (hp["use_nvlamb"] or hp["weight_decay"] != 0)


def clip_divisor(hp: Mapping[str, Any], device: torch.device) -> torch.Tensor | None:
    """What the gradients are divided by: ``G / max_grad_norm`` where the global norm ``G`` (a step
    value, ``hp["global_grad_norm"]``) exceeds ``max_grad_norm``, else 1 (a 0-dim tensor: no host
    sync); None without ``max_grad_norm``."""
    max_norm = hp["max_grad_norm"]
    if max_norm is None:
        return None
    norm = hp["global_grad_norm"].to(device)
    return torch.where(norm > max_norm, norm / max_norm, torch.ones_like(norm))


def bias_corrections(hp: Mapping[str, Any], step: float) -> tuple[float, float]:
    """``(1 - β1^t, 1 - β2^t)`` with ``bias_correction``, else ``(1, 1)``."""
    beta1, beta2 = hp["betas"]
    return (1 - beta1**step, 1 - beta2**step) if hp["bias_correction"] else (1.0, 1.0)


def trust_ratio(weight_norm: torch.Tensor, update_norm: torch.Tensor, hp: Mapping[str, Any]) -> torch.Tensor:
    """Per parameter: ``min(w, max_weight_norm) / u`` where both norms are > 0, else 1."""
    if hp["max_weight_norm"] is not None:
        weight_norm = weight_norm.clamp(max=hp["max_weight_norm"])
    usable = (weight_norm > 0) & (update_norm > 0)
    return torch.where(usable, weight_norm / update_norm, torch.ones_like(weight_norm))


def lamb_direction(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    hp: Mapping[str, Any],
    step: float,
    clip: torch.Tensor | None,
) -> torch.Tensor:
    """Update the moments ``m``, ``v`` in place and return ``u``, the step before the trust ratio."""
    (beta1, beta2), weight_decay = hp["betas"], hp["weight_decay"]
    if clip is not None:
        g = g / clip
    if not hp["adam_w_mode"] and weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    m.mul_(beta1).add_(g, alpha=1 - beta1 if hp["grad_averaging"] else 1.0)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1, bias_correction2 = bias_corrections(hp, step)
    if hp["bias_correction"]:
        u = (m / bias_correction1).div_((v / bias_correction2).sqrt_().add_(hp["eps"]))
    else:
        u = m / v.sqrt().add_(hp["eps"])
    if hp["adam_w_mode"] and weight_decay != 0:
        u.add_(p, alpha=weight_decay)
    return u


def _update(
    p: torch.Tensor,
    g: torch.Tensor,
    moments: Sequence[torch.Tensor],
    run: RunInfo,
    hp: Mapping[str, Any],
    step: float,
    clip: torch.Tensor | None,
) -> None:
    u = lamb_direction(p, g, moments[0], moments[1], hp, step, clip)
    if uses_trust_ratio(hp):
        ratio = trust_ratio(segment_norms(p, run.offsets, run.numels), segment_norms(u, run.offsets, run.numels), hp)
        p.addcmul_(u, expand(ratio.to(p.dtype), run, p.numel()), value=-as_float(hp["lr"]))
    else:
        p.sub_(u.mul_(as_float(hp["lr"])))


def lamb_composite(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """Lamb from torch ops over one run (one step count); fp16/bf16 through fp32, rounded once."""
    step = count_step(state, run, MOMENTS)
    clip = clip_divisor(hp, params.device)
    in_fp32_runs(
        lambda p, g, moments, piece: _update(p, g, moments, piece, hp, step, clip),
        params,
        grads,
        [state[name] for name in MOMENTS],
        run,
    )
