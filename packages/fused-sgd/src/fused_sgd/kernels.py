r"""The SGD update on flat slices, once per backend.

With gradient :math:`g_t`, parameters :math:`\theta_t`, learning rate :math:`\gamma`,
momentum :math:`\mu`, dampening :math:`\tau`, weight decay :math:`\lambda`
(torch.optim.SGD's algorithm, step for step)::

    g  = -g_t if maximize else g_t
    g  = g + λ θ_{t-1}                       if λ != 0
    if μ != 0:
        b_t = g                              on the first step
        b_t = μ b_{t-1} + (1 - τ) g          afterwards
        g   = g + μ b_t  if nesterov else b_t
    θ_t = θ_{t-1} - γ g

Three launchers implement it:

* :func:`sgd_composite`: torch ops on the flat slices, for any device and dtype;
  fp16/bf16 slices are computed in fp32 (in cache-sized chunks) and rounded once.
* :func:`sgd_native_fused`: torch's own fused SGD op (``torch._fused_sgd_``) over the
  whole slice, for the dtypes where :func:`native_fused_agrees` has checked it against
  :func:`sgd_composite` on the device at hand (torch 2.13's CPU build: fp32 only).
* :func:`sgd_native_fused_fp32_chunks`: for fp16/bf16 where only the fp32 fused op is
  right: cache-sized chunks are upcast, updated by the fp32 fused op, and rounded once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from fused_core.kernels import LOW_PRECISION, as_float, in_fp32_chunks


def _update(
    param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, hp: Mapping[str, Any], first_step: bool
) -> None:
    """The update, in place, on tensors of one dtype (fp32 or fp64 here)."""
    momentum, weight_decay = hp["momentum"], hp["weight_decay"]
    d_p = grad.neg() if hp["maximize"] else grad
    if weight_decay != 0:
        d_p = d_p.add(param, alpha=weight_decay)
    if momentum != 0 and buf is not None:
        if first_step:
            buf.copy_(d_p)
        else:
            buf.mul_(momentum).add_(d_p, alpha=1 - hp["dampening"])
        d_p = d_p.add(buf, alpha=momentum) if hp["nesterov"] else buf
    param.add_(d_p, alpha=-as_float(hp["lr"]))


def _momentum_buffer(state: Mapping[str, torch.Tensor], hp: Mapping[str, Any]) -> torch.Tensor | None:
    return state["momentum_buffer"] if hp["momentum"] != 0 else None


def sgd_composite(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    first_step: bool,
) -> None:
    """SGD from torch ops; low-precision slices go through fp32 chunk by chunk."""
    in_fp32_chunks(lambda p, g, b: _update(p, g, b, hp, first_step), params, grads, _momentum_buffer(state, hp))


def _fused_op(
    params: torch.Tensor, grads: torch.Tensor, buf: torch.Tensor | None, hp: Mapping[str, Any], first_step: bool
) -> None:
    torch._fused_sgd_(
        [params],
        [grads],
        [] if buf is None else [buf],
        weight_decay=hp["weight_decay"],
        momentum=hp["momentum"],
        lr=as_float(hp["lr"]),
        dampening=hp["dampening"],
        nesterov=hp["nesterov"],
        maximize=hp["maximize"],
        is_first_step=first_step,
    )


def sgd_native_fused(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    first_step: bool,
) -> None:
    """One call of torch's fused SGD op over the whole slice."""
    _fused_op(params, grads, _momentum_buffer(state, hp), hp, first_step)


def sgd_native_fused_fp32_chunks(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    first_step: bool,
) -> None:
    """fp16/bf16 slices through torch's fp32 fused op, chunk by chunk."""
    in_fp32_chunks(lambda p, g, b: _fused_op(p, g, b, hp, first_step), params, grads, _momentum_buffer(state, hp))


def fp32_native_fused_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Route a low-precision dtype to :func:`sgd_native_fused_fp32_chunks` when the fp32 op is right."""
    return dtype in LOW_PRECISION and native_fused_agrees(device, torch.float32)


_PROBE_CASES = (
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False),
    dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.0, nesterov=False, maximize=True),
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.02, nesterov=False, maximize=False),
)


@functools.cache
def native_fused_agrees(device: torch.device, dtype: torch.dtype, numel: int = 4099) -> bool:
    """Whether ``torch._fused_sgd_`` matches :func:`sgd_composite` on ``device`` for ``dtype``.

    Runs a first and a second step of each probe case on fresh random data and
    allows 4 units in the last place of ``dtype``, relative to the largest value.
    """
    if not hasattr(torch, "_fused_sgd_"):
        return False
    generator = torch.Generator().manual_seed(0)
    tolerance = 4 * torch.finfo(dtype).eps
    try:
        for hp in _PROBE_CASES:
            data = [torch.randn(numel, generator=generator, dtype=torch.float64).to(device, dtype) for _ in range(3)]
            ours = [t.clone() for t in data]
            theirs = [t.clone() for t in data]
            for first_step in (True, False):
                sgd_composite(ours[0], ours[1], {"momentum_buffer": ours[2]}, hp, first_step)
                sgd_native_fused(theirs[0], theirs[1], {"momentum_buffer": theirs[2]}, hp, first_step)
            for mine, native in zip(ours, theirs):
                scale = mine.double().abs().max().clamp_min(1e-30)
                if ((mine.double() - native.double()).abs().max() / scale).item() > tolerance:
                    return False
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True
