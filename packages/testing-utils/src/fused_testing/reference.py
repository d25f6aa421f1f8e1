r"""A float64 reference SGD, written from the math rather than from torch.optim.

The update is the one ``torch.optim.SGD`` documents (and implements with
``foreach=False``). With learning rate :math:`\gamma`, weight decay
:math:`\lambda`, momentum :math:`\mu` and dampening :math:`\tau`, one step on
parameter :math:`\theta_{t-1}` with gradient :math:`\nabla_\theta f_t` is::

    g_t = -∇f_t(θ_{t-1})  if maximize  else  ∇f_t(θ_{t-1})
    if λ ≠ 0:   g_t = g_t + λ θ_{t-1}
    if μ ≠ 0:
        b_t = g_t                            if t = 1 (no momentum buffer yet)
        b_t = μ b_{t-1} + (1 - τ) g_t        otherwise
        g_t = g_t + μ b_t   if nesterov  else  b_t
    θ_t = θ_{t-1} - γ g_t

Everything is computed in float64 on copies, so the result is an oracle for
optimizers running in float32, float16 or bfloat16: feed it the gradients the
optimizer under test saw, upcast, and compare with :func:`relative_error`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ReferenceSGD", "relative_error", "sgd_reference_step"]


def _f64(t: Tensor) -> Tensor:
    """A detached float64 copy on ``t``'s device that never aliases ``t``."""
    return t.detach().to(dtype=torch.float64, copy=True)


def _check_hyperparameters(momentum: float, dampening: float, nesterov: bool) -> None:
    # Nesterov's look-ahead is defined only on an undamped momentum buffer;
    # torch.optim.SGD rejects the same combinations.
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def sgd_reference_step(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One SGD step in float64; returns ``(new_param, new_momentum_buffer)``.

    The inputs are not modified. ``momentum_buffer`` is ``None`` before the
    first step; the returned buffer is ``None`` exactly when ``momentum == 0``.
    See the module docstring for the math.
    """
    _check_hyperparameters(momentum, dampening, nesterov)
    if param.shape != grad.shape:
        raise ValueError(f"param shape {tuple(param.shape)} != grad shape {tuple(grad.shape)}")
    theta = _f64(param)
    g = _f64(grad)
    lr = float(lr)

    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * theta
    buf: Tensor | None = None
    if momentum != 0:
        if momentum_buffer is None:
            buf = g.clone()
        else:
            buf = momentum * _f64(momentum_buffer) + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return theta - lr * g, buf


class ReferenceSGD:
    """Float64 SGD over copies of a list of tensors, one param group.

    ``hyperparams`` is a plain dict, like a torch param group, so a test can
    change ``lr`` between steps the way a scheduler would. Passing ``None`` as
    a gradient skips that parameter: its value and momentum buffer stay as
    they are, matching ``torch.optim.SGD`` for parameters whose ``.grad`` is
    ``None``.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        lr: float | Tensor,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
    ) -> None:
        _check_hyperparameters(momentum, dampening, nesterov)
        self.params: list[Tensor] = [_f64(p) for p in params]
        self.momentum_buffers: list[Tensor | None] = [None] * len(self.params)
        self.hyperparams: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }

    def step(self, grads: Sequence[Tensor | None]) -> None:
        """Apply one step; ``grads[i]`` belongs to ``params[i]`` (any dtype)."""
        if len(grads) != len(self.params):
            raise ValueError(f"expected {len(self.params)} grads, got {len(grads)}")
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            self.params[i], self.momentum_buffers[i] = sgd_reference_step(
                self.params[i], grad, self.momentum_buffers[i], **self.hyperparams
            )


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max|actual - expected| / max(max|expected|, tiny)``, in float64.

    Normalising by the largest magnitude of ``expected`` (not element-wise)
    keeps elements near zero from dominating. Non-finite differences give
    ``inf`` so that a NaN never passes a ``<= rtol`` check.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0
    a = actual.detach().to(device=expected.device, dtype=torch.float64)
    e = expected.detach().to(torch.float64)
    diff = (a - e).abs().max().item()
    if not math.isfinite(diff):
        return float("inf")
    scale = max(e.abs().max().item(), torch.finfo(torch.float64).tiny)
    return diff / scale
