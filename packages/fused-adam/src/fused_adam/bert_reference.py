r"""BertAdam per tensor, written the obvious way: the reference :class:`~fused_adam.FusedBertAdam`
is checked against (bit for bit in fp32 and fp64), and the competitor ``fused-optim bench`` runs
(``foreach=True``).

torch has no BertAdam. This is pytorch-pretrained-BERT's (``pytorch_pretrained_bert/optimization.py``,
as NVIDIA's BERT examples and torch_npu's ``NpuFusedBertAdam`` carry it on), with torch_npu's
signature, defaults, schedules and state names. For a parameter :math:`\theta` with gradient
:math:`g`, moments :math:`m, v` (zero before its first step) and its step count :math:`t` (from 0)::

    g  = g · c,  c = min(1, max_grad_norm / (‖g‖ + 1e-6))   if max_grad_norm > 0
    m  = β1 m + (1 - β1) g                exp_avg.mul_(b1).add_(g, alpha=1 - b1)
    v  = β2 v + (1 - β2) g²               exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
    u  = m / (sqrt(v) + e)                exp_avg / (exp_avg_sq.sqrt() + e)
    u  = u + λ θ          if λ > 0        update += weight_decay * param
    θ  = θ - γt u                         param.add_(-(lr_t * update))
    t  = t + 1

with :math:`\gamma_t` = :func:`scheduled_lr`. No bias correction. The torch operations on the
right are the original's, in its order. ``‖g‖`` is this parameter's gradient norm: its sum of
squares is :func:`fused_core.reductions.segment_sumsq` of the gradient alone, in the parameter's
memory order (fp64 accumulation, rounded to fp32; fp64 for fp64), which is what
:class:`~fused_adam.FusedBertAdam` computes for all parameters of a run at once; ``c`` is computed
as ``torch.nn.utils.clip_grad_norm_`` computes its coefficient. Unlike the original, the
gradient is scaled in a copy: ``.grad`` is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.optimizer import required

from fused_core.hyperparams import validate_group
from fused_core.kernels import as_float
from fused_core.reductions import segment_sumsq

from .bert_hyperparams import BertAdamHyperparams

CLIP_EPS = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` (and the original) does."""
POLY_DEGREE = 0.5


def warmup_cosine(x: float, warmup: float) -> float:
    """Linear warmup, then ``0.5 (1 + cos(π x))`` (torch_npu calls ``torch.cos`` on a float here,
    which raises; this is the original's ``math.cos``)."""
    return x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))


def warmup_constant(x: float, warmup: float) -> float:
    """Linear warmup, then 1."""
    return x / warmup if x < warmup else 1.0


def warmup_linear(x: float, warmup: float) -> float:
    """Linear warmup, then ``max((x - 1) / (warmup - 1), 0)``: down to 0 at ``x = 1`` (with ``warmup = -1``
    this starts at 1/2, as in torch_npu and pytorch-pretrained-BERT 0.5)."""
    return x / warmup if x < warmup else max((x - 1.0) / (warmup - 1.0), 0.0)


def warmup_poly(x: float, warmup: float) -> float:
    """Linear warmup, then ``(1 - x) ** 0.5``, and 0 past ``x = 1`` (torch_npu raises a complex power there)."""
    return x / warmup if x < warmup else max(1.0 - x, 0.0) ** POLY_DEGREE


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "warmup_cosine": warmup_cosine,
    "warmup_constant": warmup_constant,
    "warmup_linear": warmup_linear,
    "warmup_poly": warmup_poly,
}
"""The learning-rate factors by ``schedule`` name, of ``x = t / t_total`` and ``warmup``."""


def scheduled_lr(group: Mapping[str, Any], step: float) -> float:
    """The learning rate of a parameter at its step ``step`` (counted from 0): ``lr`` times the
    group's schedule at ``step / t_total``, or ``lr`` where ``t_total`` is -1."""
    lr = as_float(group["lr"])
    if group["t_total"] == -1:
        return lr
    return lr * SCHEDULES[group["schedule"]](step / group["t_total"], group["warmup"])


def clip_coefficients(sumsq: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, max_grad_norm / (sqrt(sumsq) + 1e-6))`` for every entry of ``sumsq`` (sums of squares)."""
    return (max_grad_norm / (sumsq.sqrt() + CLIP_EPS)).clamp_(max=1.0)


def bert_adam_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    group: Mapping[str, Any],
    lr: float,
    scale: torch.Tensor | None = None,
) -> None:
    """One BertAdam step of a tensor, in place, at learning rate ``lr`` (scheduled), the gradient
    multiplied by ``scale`` (clipping; None: not clipped) first; ``grad`` is only read."""
    beta1, beta2, weight_decay = group["b1"], group["b2"], group["weight_decay"]
    if scale is not None:
        grad = grad * scale
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    update = exp_avg / exp_avg_sq.sqrt().add_(group["e"])
    if weight_decay > 0:
        update.add_(param * weight_decay)
    param.sub_(update.mul_(lr))


def memory_order(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elements as a contiguous 1-D tensor in ``like``'s memory order (a fused
    optimizer's flat buffers hold a parameter's gradient so)."""
    dims = sorted(range(like.dim()), key=like.stride, reverse=True)
    return tensor.permute(dims).reshape(-1).contiguous()


def clip_scale(param: torch.Tensor, grad: torch.Tensor, max_grad_norm: float) -> torch.Tensor | None:
    """The clipping coefficient of one parameter's gradient (a 0-dim tensor), None where it is 1."""
    if max_grad_norm <= 0:
        return None
    flat = memory_order(grad, param)
    whole = torch.tensor([flat.numel()])
    coefficient = clip_coefficients(segment_sumsq(flat, torch.zeros(1, dtype=torch.int64), whole), max_grad_norm)
    return None if bool(coefficient >= 1) else coefficient.reshape(())


def bert_adam_foreach_(params: list[torch.Tensor], states: list[dict[str, Any]], group: Mapping[str, Any]) -> None:
    """One step of ``params`` (each with a gradient) and their ``states`` with ``torch._foreach_*``
    ops: the operations of :func:`bert_adam_update_`, the norms from ``torch._foreach_norm``."""
    if not params:
        return
    grads = [p.grad for p in params if p.grad is not None]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    beta1, beta2, weight_decay = group["b1"], group["b2"], group["weight_decay"]
    if group["max_grad_norm"] > 0:
        sumsq = torch.stack(torch._foreach_norm(grads)).double().square()
        grads = list(torch._foreach_mul(grads, clip_coefficients(sumsq, group["max_grad_norm"]).tolist()))
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, group["e"])
    updates = torch._foreach_div(exp_avgs, denominators)
    if weight_decay > 0:
        torch._foreach_add_(updates, torch._foreach_mul(params, weight_decay))
    torch._foreach_mul_(updates, [scheduled_lr(group, float(s["step"])) for s in states])
    torch._foreach_sub_(params, updates)
    for state in states:
        state["step"] += 1


class BertAdam(torch.optim.Optimizer):
    """BertAdam per tensor, with torch_npu's ``NpuFusedBertAdam`` signature and defaults, and
    ``foreach``: ``True`` runs each param group with ``torch._foreach_*`` ops (the norms from
    ``torch._foreach_norm``, so a clipped step may differ from the per-tensor one in the last bits).
    State: ``state[p]["step"]`` (a 0-dim float32 tensor), ``"exp_avg"``, ``"exp_avg_sq"``."""

    def __init__(
        self,
        params: Any,
        lr: Any = required,
        warmup: float = -1,
        t_total: float = -1,
        schedule: str = "warmup_linear",
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        *,
        foreach: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        )  # fmt: skip
        given = {key: value for key, value in defaults.items() if value is not required}
        validate_group(BertAdamHyperparams, given, where="BertAdam defaults", partial=True)
        super().__init__(params, defaults)
        self.foreach = foreach

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
                    self.state[p]["step"] = torch.tensor(0.0)
                    for name in ("exp_avg", "exp_avg_sq"):
                        self.state[p][name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.foreach:
                bert_adam_foreach_(params, [self.state[p] for p in params], group)
                continue
            for p in params:
                state = self.state[p]
                lr = scheduled_lr(group, float(state["step"]))
                scale = clip_scale(p, p.grad, group["max_grad_norm"])
                bert_adam_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], group, lr, scale)
                state["step"] += 1
        return loss
