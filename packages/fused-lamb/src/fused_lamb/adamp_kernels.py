r"""The AdamP update on flat slices.

For every parameter :math:`\theta` with gradient :math:`g`, at its step :math:`t` (Heo et al.,
2021, Algorithm 2, as clovaai/AdamP and torch_npu's NpuFusedAdamP compute it)::

    m   = β1 m + (1 - β1) g
    v   = β2 v + (1 - β2) g²
    d   = sqrt(v) / sqrt(1 - β2^t) + ε
    u   = (β1 m + (1 - β1) g) / d      if nesterov, else m / d
    if θ has two or more dimensions (a "matrix"):
        cos(x, y) = |<x, y>| / (||x|| + ε) / (||y|| + ε)
        channel-wise, each row θ_c of θ.reshape(θ.size(0), -1) of n_c elements:
            if max_c cos(g_c, θ_c) < δ / sqrt(n_c):   project every row, ρ = wd_ratio
        else layer-wise, over all n elements:
            if cos(g, θ) < δ / sqrt(n):               project the whole, ρ = wd_ratio
        projecting x (a row, or the whole):  x̂ = θ_x / (||θ_x|| + ε),  u_x = u_x - x̂ <x̂, u_x>
    ρ   = 1 where nothing was projected
    θ   = θ (1 - γ λ ρ)                 if λ > 0
    θ   = θ - γ / (1 - β1^t) · u

* :func:`adamp_composite`: torch ops over the run's slices, any device and dtype: the sums over
  rows and parameters from :mod:`fused_core.reductions` (through
  :class:`fused_lamb.layerwise.Channels`), never a loop over parameters; fp16/bf16 in fp32, a few
  whole parameters at a time, rounded once. The elementwise ops are those of
  :class:`fused_lamb.reference.AdamP` in its order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fused_core.kernels import RunInfo, as_float
from fused_core.reductions import result_dtype

from .layerwise import Channels, count_step, expand, in_fp32_runs

MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_direction(
    g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hp: Mapping[str, Any], step: float
) -> torch.Tensor:
    """Update ``m`` and ``v`` in place, return ``u`` (Adam's direction, without ``γ / (1 - β1^t)``)."""
    beta1, beta2 = hp["betas"]
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(hp["eps"])
    if hp["nesterov"]:
        return (beta1 * m + (1 - beta1) * g) / denom
    return m / denom


def cosine(dot: torch.Tensor, sumsq_x: torch.Tensor, sumsq_y: torch.Tensor, eps: float) -> torch.Tensor:
    """``|<x, y>| / (||x|| + ε) / (||y|| + ε)`` from the dot product and the sums of squares."""
    return dot.abs() / sumsq_x.sqrt().add_(eps) / sumsq_y.sqrt().add_(eps)


def project(
    p: torch.Tensor, g: torch.Tensor, u: torch.Tensor, channels: Channels, hp: Mapping[str, Any]
) -> torch.Tensor:
    """Project ``u`` in place where the gradient is nearly orthogonal to the weights (channel-wise
    first, else layer-wise, matrices only); returns which slots were projected (bool, per slot)."""
    eps, delta = hp["eps"], hp["delta"]
    dtype = result_dtype(p.dtype)
    gp, gg, pp = channels.sums(g, p), channels.sums(g), channels.sums(p)
    slot_of_channel = channels.slot_of_channel
    threshold_rows = (delta / channels.row_numel.double().sqrt()).to(dtype=dtype, device=p.device)
    threshold_layer = (delta / channels.run.numels.double().sqrt()).to(dtype=dtype, device=p.device)
    matrix = channels.matrix.to(p.device)
    by_rows = matrix & (channels.slot_max(cosine(gp, gg, pp, eps)) < threshold_rows)
    layer_gp, layer_gg, layer_pp = (channels.to_slots(sums) for sums in (gp, gg, pp))
    by_layer = matrix & ~by_rows & (cosine(layer_gp, layer_gg, layer_pp, eps) < threshold_layer)
    projected = by_rows | by_layer
    if not bool(projected.any()):
        return projected
    # Per channel: the norm to divide by (its row's, or its parameter's) and which channels move.
    row_norm, layer_norm = pp.sqrt().add_(eps), layer_pp.sqrt().add_(eps)
    norm = torch.where(by_rows[slot_of_channel], row_norm, layer_norm[slot_of_channel])
    moved = projected[slot_of_channel]
    p_n = p / channels.expand(torch.where(moved, norm, torch.ones_like(norm)), gap=1.0).to(p.dtype)
    row_dot = channels.sums(p_n, u)
    dot = torch.where(by_rows[slot_of_channel], row_dot, channels.to_slots(row_dot)[slot_of_channel])
    u.sub_(p_n * channels.expand(torch.where(moved, dot, torch.zeros_like(dot))).to(p.dtype))
    return projected


def _update(
    p: torch.Tensor,
    g: torch.Tensor,
    moments: Sequence[torch.Tensor],
    run: RunInfo,
    hp: Mapping[str, Any],
    step: float,
) -> None:
    lr, weight_decay = as_float(hp["lr"]), hp["weight_decay"]
    u = adam_direction(g, moments[0], moments[1], hp, step)
    channels = Channels(run, p.numel(), p.device)
    projected = project(p, g, u, channels, hp) if bool(channels.matrix.any()) else None
    if weight_decay > 0:
        if projected is None or not bool(projected.any()):
            p.mul_(1 - lr * weight_decay * 1)
        else:
            ratio = torch.ones(run.slots, dtype=torch.float64).masked_fill_(projected.cpu(), hp["wd_ratio"])
            factor = (1 - lr * weight_decay * ratio).to(p.dtype)
            p.mul_(expand(factor.to(p.device), run, p.numel()))
    p.add_(u, alpha=-(lr / (1 - hp["betas"][0] ** step)))


def adamp_composite(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """AdamP from torch ops over one run (one step count); fp16/bf16 through fp32, rounded once."""
    step = count_step(state, run, MOMENTS)
    in_fp32_runs(
        lambda p, g, moments, piece: _update(p, g, moments, piece, hp, step),
        params,
        grads,
        [state[name] for name in MOMENTS],
        run,
    )
