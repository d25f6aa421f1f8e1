r"""RMSpropTF per tensor: the reference :class:`fused_rmsprop.FusedRMSpropTF` is checked against, and
the per-tensor update its composite launcher runs over flat slices.

There is no torch class for it; the math is torch_npu's ``NpuFusedRMSpropTF`` (after timm's
``RMSpropTF``, itself TensorFlow's ``RMSPropOptimizer``). With learning rate :math:`\gamma`,
smoothing constant :math:`\alpha`, :math:`\epsilon`, weight decay :math:`\lambda` and momentum
:math:`\mu`, one step of a parameter :math:`\theta` with gradient :math:`g` is::

    g = -g                                        maximize
    θ = θ - λ θ                                   decoupled_decay, λ != 0 (not scaled by γ)
    g = g + λ θ                                   otherwise, λ != 0
    v = v + (1 - α)(g² - v)                       v starts at 1, not 0
    ḡ = ḡ + (1 - α)(g - ḡ);  a = sqrt(v - ḡ² + ε)   centered (ḡ starts at 0)
    a = sqrt(v + ε)                               otherwise: ε inside the square root
    b = μ b + γ g / a;  θ = θ - b                 μ > 0 and lr_in_momentum (b starts at 0)
    b = μ b + g / a;    θ = θ - γ b               μ > 0, not lr_in_momentum
    θ = θ - γ g / a                               μ = 0

Each line is the torch op torch_npu uses (``add_(alpha=)``, ``addcmul``, ``addcdiv``), in its
order, in the tensors' dtype. The tests check this against a float64 oracle written from the
formulas above (``tests/test_rmsprop_tf.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fused_core.kernels import as_scalar

__all__ = ["RMSpropTF", "rmsprop_tf_update"]


def rmsprop_tf_update(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    grad_avg: Tensor | None,
    momentum_buffer: Tensor | None,
    *,
    lr: Any,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    decoupled_decay: bool,
    lr_in_momentum: bool,
    maximize: bool,
    sqrt: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """One RMSpropTF step of one tensor, in place (``grad`` is only read). ``grad_avg`` is None
    unless centered, ``momentum_buffer`` None unless ``momentum > 0``; ``lr`` a number or a
    one-element tensor; ``sqrt`` the square root (None: ``torch.sqrt``; the fused optimizer's fp16/bf16
    updates pass :func:`fused_rmsprop.kernels.low_precision_sqrt`'s)."""
    lr = as_scalar(lr)
    sqrt = torch.sqrt if sqrt is None else sqrt
    grad = -grad if maximize else grad
    if weight_decay != 0:
        if decoupled_decay:
            param.add_(param, alpha=-weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    square_avg.add_(grad.pow(2).sub_(square_avg), alpha=1 - alpha)
    if grad_avg is not None:
        grad_avg.add_(grad.sub(grad_avg), alpha=1 - alpha)
        avg = sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1).add_(eps))
    else:
        avg = sqrt(square_avg.add(eps))
    if momentum_buffer is None:
        param.addcdiv_(grad, avg, value=-lr)
    elif lr_in_momentum:
        momentum_buffer.mul_(momentum).addcdiv_(grad, avg, value=lr)
        param.sub_(momentum_buffer)
    else:
        momentum_buffer.mul_(momentum).addcdiv_(grad, avg)
        param.add_(momentum_buffer, alpha=-lr)


def _foreach_rmsprop_tf(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor] | None,
    momentum_buffers: list[Tensor] | None,
    group: dict[str, Any],
) -> None:
    """:func:`rmsprop_tf_update` over lists, with ``torch._foreach_*`` ops (the same ops, the same bits)."""
    lr, alpha, eps, weight_decay = float(group["lr"]), group["alpha"], group["eps"], group["weight_decay"]
    if group["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        if group["decoupled_decay"]:
            torch._foreach_add_(params, params, alpha=-weight_decay)
        else:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    squares = torch._foreach_pow(grads, 2)
    torch._foreach_sub_(squares, square_avgs)
    torch._foreach_add_(square_avgs, squares, alpha=1 - alpha)
    if grad_avgs is not None:
        torch._foreach_add_(grad_avgs, torch._foreach_sub(grads, grad_avgs), alpha=1 - alpha)
        avgs = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
        torch._foreach_add_(avgs, eps)
    else:
        avgs = torch._foreach_add(square_avgs, eps)
    torch._foreach_sqrt_(avgs)
    if momentum_buffers is None:
        torch._foreach_addcdiv_(params, grads, avgs, value=-lr)
        return
    torch._foreach_mul_(momentum_buffers, group["momentum"])
    if group["lr_in_momentum"]:
        torch._foreach_addcdiv_(momentum_buffers, grads, avgs, value=lr)
        torch._foreach_sub_(params, momentum_buffers)
    else:
        torch._foreach_addcdiv_(momentum_buffers, grads, avgs)
        torch._foreach_add_(params, momentum_buffers, alpha=-lr)


class RMSpropTF(torch.optim.Optimizer):
    """torch_npu's NpuFusedRMSpropTF per tensor (see the module docstring), on any device: the
    signature of :class:`fused_rmsprop.FusedRMSpropTF`, whose state it keeps (``step`` as a 0-dim
    float32 tensor, ``square_avg``, ``momentum_buffer`` with momentum > 0, ``grad_avg`` when
    centered). ``foreach=True`` updates each param group's tensors with ``torch._foreach_*`` ops
    (lists grouped by device and dtype); ``foreach=False`` one tensor at a time."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: Any = 1e-2,
        alpha: float = 0.9,
        eps: float = 1e-10,
        weight_decay: float = 0,
        momentum: float = 0.0,
        centered: bool = False,
        decoupled_decay: bool = False,
        lr_in_momentum: bool = True,
        *,
        foreach: bool = False,
        maximize: bool = False,
    ) -> None:
        for name, value in (("lr", lr), ("alpha", alpha), ("eps", eps), ("weight_decay", weight_decay)):
            if not 0.0 <= value:
                raise ValueError(f"Invalid {name} value: {value}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
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

    def prepared_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[param]
        if len(state) == 0:
            scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.zeros((), dtype=scalar_dtype)
            state["square_avg"] = torch.ones_like(param, memory_format=torch.preserve_format)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self.prepared_state(p, group) for p in params]
            with_momentum, centered = group["momentum"] > 0, group["centered"]
            if group["foreach"]:
                by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
                for index, p in enumerate(params):
                    by_kind.setdefault((p.device, p.dtype), []).append(index)
                for indices in by_kind.values():
                    _foreach_rmsprop_tf(
                        [params[i] for i in indices],
                        [params[i].grad for i in indices],
                        [states[i]["square_avg"] for i in indices],
                        [states[i]["grad_avg"] for i in indices] if centered else None,
                        [states[i]["momentum_buffer"] for i in indices] if with_momentum else None,
                        group,
                    )
                continue
            for p, s in zip(params, states):
                rmsprop_tf_update(
                    p, p.grad, s["square_avg"], s.get("grad_avg") if centered else None,
                    s.get("momentum_buffer") if with_momentum else None,
                    lr=group["lr"], alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                    momentum=group["momentum"], decoupled_decay=group["decoupled_decay"],
                    lr_in_momentum=group["lr_in_momentum"], maximize=group["maximize"],
                )  # fmt: skip
        return loss
