r"""A per-tensor Lion, written the obvious way: the reference :class:`~fused_lion.FusedLion` is
checked against (bit for bit in fp32 and fp64), and the competitor ``fused-optim bench`` runs
(``foreach=True``).

torch has no Lion. This one follows the paper's reference implementation (Chen et al. 2023,
"Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675; google/automl's
``lion/lion_pytorch.py``): its defaults, its state name ``exp_avg`` and its arithmetic, op for op,
plus torch's ``maximize``. For a parameter :math:`\theta` with gradient :math:`g` and momentum
:math:`m` (zero before the parameter's first step)::

    g = -g                             if maximize
    θ = θ (1 - γλ)                     if λ != 0   param.mul_(1 - lr * weight_decay)
    c = β1 m + (1 - β1) g                          exp_avg * beta1 + grad * (1 - beta1)
    θ = θ - γ sign(c)                              param.add_(c.sign_(), alpha=-lr)
    m = β2 m + (1 - β2) g                          exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)

``sign(0) = 0`` (torch.sign; on the CPU torch.sign of NaN is 0 too). The paper's code multiplies by
``1 - lr * weight_decay`` also when it is 1; skipping it changes no bit. A tensor ``lr`` is used as
torch.optim uses one: ``1 - lr * weight_decay`` is computed in its dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fused_core.hyperparams import validate_group
from fused_core.kernels import as_scalar

from .hyperparams import LionHyperparams

GROUP_DEFAULTS = dict(maximize=False, foreach=None)
"""What a param group saved without them (by the paper's Lion, or lion-pytorch's) gets on loading."""


def lion_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, group: Mapping[str, Any]) -> None:
    """One tensor's Lion step, in place, with ``group``'s ``lr``, ``betas``, ``weight_decay`` and
    ``maximize``: the operations of the module docstring, in its order."""
    lr, (beta1, beta2), weight_decay = as_scalar(group["lr"]), group["betas"], group["weight_decay"]
    if group["maximize"]:
        grad = -grad
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    update = exp_avg * beta1 + grad * (1 - beta1)
    param.add_(update.sign_(), alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def lion_foreach_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], group: Mapping[str, Any]
) -> None:
    """:func:`lion_update_` over lists of tensors, with ``torch._foreach_*`` ops (the same operations
    in the same order, one launch per operation and list where the device has multi-tensor kernels)."""
    if not params:
        return
    lr, (beta1, beta2), weight_decay = as_scalar(group["lr"]), group["betas"], group["weight_decay"]
    if group["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    updates = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(updates, torch._foreach_mul(grads, 1 - beta1))
    torch._foreach_sign_(updates)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


class Lion(torch.optim.Optimizer):
    """Lion, per tensor: ``Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
    foreach=False)``, the paper's defaults. State: ``state[p]["exp_avg"]``. ``foreach=True`` runs
    :func:`lion_foreach_` per param group, else :func:`lion_update_` per parameter (the same bits
    in fp32 and fp64 on the CPU; in bf16 torch's CPU ``_foreach_mul_`` rounds some products otherwise)."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, foreach=foreach)
        validate_group(LionHyperparams, defaults, where="Lion defaults")
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            if group["foreach"]:
                lion_foreach_(params, [p.grad for p in params], exp_avgs, group)
            else:
                for p, exp_avg in zip(params, exp_avgs):
                    lion_update_(p, p.grad, exp_avg, group)
        return loss
