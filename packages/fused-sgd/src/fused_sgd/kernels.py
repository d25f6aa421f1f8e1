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

Two launchers implement it:

* :func:`sgd_composite`: torch ops on the flat slices, for any device and dtype;
  fp16/bf16 slices are computed in fp32 (in cache-sized chunks) and rounded once.
* :func:`sgd_native_fused`: torch's own fused SGD op (``torch._fused_sgd_``) over the
  whole slice. It is routed to a (device, dtype) only after
  :func:`native_fused_agrees` has checked it against :func:`sgd_composite` on that
  device and dtype: on torch 2.13's CPU build it is right for fp32 only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
CHUNK = 1 << 18
"""Elements per fp32 chunk of the low-precision path: 3 chunks stay within a core's cache."""


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


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
    param.add_(d_p, alpha=-_scalar(hp["lr"]))


def sgd_composite(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    first_step: bool,
) -> None:
    """SGD from torch ops; low-precision slices go through fp32 chunk by chunk."""
    buf = state.get("momentum_buffer") if hp["momentum"] != 0 else None
    if params.dtype not in LOW_PRECISION:
        _update(params, grads, buf, hp, first_step)
        return
    for start in range(0, params.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        param32 = params[part].float()
        if buf is None:
            _update(param32, grads[part].float(), None, hp, first_step)
        else:
            buf32 = buf[part].float()
            _update(param32, grads[part].float(), buf32, hp, first_step)
            buf[part].copy_(buf32)
        params[part].copy_(param32)


def sgd_native_fused(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    first_step: bool,
) -> None:
    """One call of torch's fused SGD op over the whole slice."""
    momentum = hp["momentum"]
    torch._fused_sgd_(
        [params],
        [grads],
        [state["momentum_buffer"]] if momentum != 0 else [],
        weight_decay=hp["weight_decay"],
        momentum=momentum,
        lr=_scalar(hp["lr"]),
        dampening=hp["dampening"],
        nesterov=hp["nesterov"],
        maximize=hp["maximize"],
        is_first_step=first_step,
    )


_PROBE_CASES = (
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False),
    dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.0, nesterov=False, maximize=True),
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.02, nesterov=False, maximize=False),
)


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
