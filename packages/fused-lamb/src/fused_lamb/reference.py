r"""Per-tensor Lamb and AdamP: plain ``torch.optim.Optimizer`` subclasses, the references of the
fused classes (their conformance suites' ``reference_cls``) and the competitors of the benchmarks.

Written from the papers (You et al., 2019, arXiv:1904.00962, Algorithm 2; Heo et al., 2021,
arXiv:2006.08217, Algorithm 2) and checked against torch_npu's ``NpuFusedLamb`` and
``NpuFusedAdamP`` and apex's ``FusedLAMB`` (its CUDA kernel ``multi_tensor_lamb.cu``); the math
is in the docstrings of :class:`fused_lamb.FusedLamb` and :class:`fused_lamb.FusedAdamP`.

* ``foreach=False``: torch ops per parameter, the obvious way.
* ``foreach=True``: the same step with ``torch._foreach_*`` ops over each param group's tensors
  (the per-parameter norms and Lamb's global norm from ``torch._foreach_norm``; AdamP's
  projection, which works on each parameter's rows, stays per parameter). Agrees with
  ``foreach=False`` to rounding.

Norms and dot products are accumulated in float64 (per parameter or per row) and rounded to the
result dtype of :func:`fused_core.reductions.result_dtype` (float32, float64 for float64
parameters), as the fused classes' reductions do; the global gradient norm likewise. ``lr`` may
be a one-element tensor, read as a number. State as the fused classes keep it:
``state[p]["step"]`` a 0-dim float32 tensor, ``exp_avg``, ``exp_avg_sq``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["AdamP", "Lamb", "NpuAdamP", "NpuLamb"]


def _check(lr: Any, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if float(lr) < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sumsq(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of squares (over ``dim``, or all) accumulated in float64, in the result dtype."""
    wide = x.double()
    return (wide * wide).sum(dim=dim).to(_wide_dtype(x.dtype))


def _dot(x: torch.Tensor, y: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x.double() * y.double()).sum(dim=dim).to(_wide_dtype(x.dtype))


class _Reference(torch.optim.Optimizer):
    """Per-parameter state as torch keeps Adam's; ``foreach`` is an attribute, not a hyperparameter."""

    foreach = False

    def _with_grads(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict]]:
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            states.append(state)
        return params, grads, states

    def _closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class Lamb(_Reference):
    """Lamb per tensor, with :class:`fused_lamb.FusedLamb`'s signature and math."""

    def __init__(
        self,
        params: Iterable[Any],
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
        foreach: bool = False,
    ) -> None:
        _check(lr, betas, eps, weight_decay)
        if amsgrad:
            raise ValueError("Lamb does not support AMSGrad")
        defaults = dict(
            lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, adam_w_mode=adam_w_mode, grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm, use_nvlamb=use_nvlamb, adam=adam, max_weight_norm=max_weight_norm,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.foreach = foreach

    def global_grad_norm(self) -> torch.Tensor:
        """The 2-norm of every gradient of the optimizer together (float64 sums, float32 or float64)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        if self.foreach:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
            return torch.linalg.vector_norm(torch.stack(norms)).to(dtype)
        return sum((g.double() * g.double()).sum() for g in grads).sqrt().to(dtype)  # type: ignore[union-attr]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        clipping = any(group["max_grad_norm"] is not None for group in self.param_groups)
        norm = self.global_grad_norm() if clipping else None
        for group in self.param_groups:
            params, grads, states = self._with_grads(group)
            if not params:
                continue
            clip = None
            if group["max_grad_norm"] is not None and norm is not None and norm > group["max_grad_norm"]:
                clip = norm / group["max_grad_norm"]
            (self._foreach_step if self.foreach else self._single_step)(group, params, grads, states, clip)
        return loss

    @staticmethod
    def _uses_ratio(group: dict[str, Any]) -> bool:
        return not group["adam"] and (group["use_nvlamb"] or group["weight_decay"] != 0)

    @staticmethod
    def _ratio(weight_norm: torch.Tensor, update_norm: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        if group["max_weight_norm"] is not None:
            weight_norm = weight_norm.clamp(max=group["max_weight_norm"])
        usable = (weight_norm > 0) & (update_norm > 0)
        return torch.where(usable, weight_norm / update_norm, torch.ones_like(weight_norm))

    def _single_step(self, group: dict, params: list, grads: list, states: list, clip: Any) -> None:
        (beta1, beta2), eps, weight_decay, lr = group["betas"], group["eps"], group["weight_decay"], float(group["lr"])
        beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
        for p, grad, state in zip(params, grads, states):
            m, v, step = state["exp_avg"], state["exp_avg_sq"], float(state["step"])
            g = grad if clip is None else grad / clip
            if not group["adam_w_mode"] and weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            m.mul_(beta1).add_(g, alpha=beta3)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if group["bias_correction"]:
                u = (m / (1 - beta1**step)).div_((v / (1 - beta2**step)).sqrt_().add_(eps))
            else:
                u = m / v.sqrt().add_(eps)
            if group["adam_w_mode"] and weight_decay != 0:
                u.add_(p, alpha=weight_decay)
            if self._uses_ratio(group):
                ratio = self._ratio(_sumsq(p).sqrt(), _sumsq(u).sqrt(), group)
                p.addcmul_(u, ratio.to(p.dtype), value=-lr)
            else:
                p.sub_(u.mul_(lr))

    def _foreach_step(self, group: dict, params: list, grads: list, states: list, clip: Any) -> None:
        (beta1, beta2), eps, weight_decay, lr = group["betas"], group["eps"], group["weight_decay"], float(group["lr"])
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        steps = [float(s["step"]) for s in states]
        if clip is not None:
            grads = list(torch._foreach_div(grads, clip))
        if not group["adam_w_mode"] and weight_decay != 0:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1 - beta1 if group["grad_averaging"] else 1.0)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        if group["bias_correction"]:
            updates = list(torch._foreach_div(ms, [1 - beta1**t for t in steps]))
            denoms = list(torch._foreach_div(vs, [1 - beta2**t for t in steps]))
            torch._foreach_sqrt_(denoms)
        else:
            updates, denoms = ms, list(torch._foreach_sqrt(vs))
        torch._foreach_add_(denoms, eps)
        updates = list(torch._foreach_div(updates, denoms))
        if group["adam_w_mode"] and weight_decay != 0:
            torch._foreach_add_(updates, params, alpha=weight_decay)
        if self._uses_ratio(group):
            weight_norms = torch.stack([norm.double() for norm in torch._foreach_norm(params)])
            update_norms = torch.stack([norm.double() for norm in torch._foreach_norm(updates)])
            torch._foreach_mul_(updates, self._ratio(weight_norms, update_norms, group).tolist())
        torch._foreach_add_(params, updates, alpha=-lr)


class NpuLamb(Lamb):
    """:class:`Lamb` with torch_npu's NpuFusedLamb signature and settings (see
    :class:`fused_lamb.NpuFusedLamb`)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0,
        adam: bool = False,
        use_global_grad_norm: bool = False,
        *,
        foreach: bool = False,
    ) -> None:
        super().__init__(
            params, lr, False, betas, eps, weight_decay, max_grad_norm=1.0 if use_global_grad_norm else None,
            use_nvlamb=True, adam=adam, max_weight_norm=10.0, foreach=foreach,
        )  # fmt: skip


class AdamP(_Reference):
    """AdamP per tensor, with :class:`fused_lamb.FusedAdamP`'s signature and math (clovaai/AdamP's,
    with torch_npu's cosine similarity; rows by ``reshape``, so any memory layout works)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        foreach: bool = False,
    ) -> None:
        _check(lr, betas, eps, weight_decay)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov
        )
        super().__init__(params, defaults)
        self.foreach = foreach

    @staticmethod
    def projection(
        p: torch.Tensor, grad: torch.Tensor, perturb: torch.Tensor, delta: float, wd_ratio: float, eps: float
    ) -> tuple[torch.Tensor, float]:
        """Project ``perturb`` where the gradient is nearly orthogonal to ``p``: per row (channel)
        first, else over the whole parameter; returns it and the weight-decay ratio."""
        for rows in (p.size(0), 1):
            p_rows, g_rows = p.reshape(rows, -1), grad.reshape(rows, -1)
            p_norm = _sumsq(p_rows, 1).sqrt().add_(eps)
            cosine = _dot(g_rows, p_rows, 1).abs() / _sumsq(g_rows, 1).sqrt().add_(eps) / p_norm
            if cosine.max() < delta / math.sqrt(p_rows.size(1)):
                p_n = p_rows / p_norm.to(p.dtype).unsqueeze(1)
                u_rows = perturb.reshape(rows, -1)
                u_rows = u_rows - p_n * _dot(p_n, u_rows, 1).to(p.dtype).unsqueeze(1)
                return u_rows.reshape(p.shape), wd_ratio
        return perturb, 1.0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        for group in self.param_groups:
            params, grads, states = self._with_grads(group)
            if params:
                (self._foreach_step if self.foreach else self._single_step)(group, params, grads, states)
        return loss

    def _finish(self, group: dict, p: torch.Tensor, grad: torch.Tensor, perturb: torch.Tensor, step: float) -> None:
        """Projection, weight decay and the step of one parameter."""
        lr, weight_decay, wd_ratio = float(group["lr"]), group["weight_decay"], 1.0
        if p.dim() > 1 and p.numel() > 0:  # clovaai's and torch_npu's views fail on empty ones
            perturb, wd_ratio = self.projection(p, grad, perturb, group["delta"], group["wd_ratio"], group["eps"])
        if weight_decay > 0:
            p.mul_(1 - lr * weight_decay * wd_ratio)
        p.add_(perturb, alpha=-(lr / (1 - group["betas"][0] ** step)))

    def _single_step(self, group: dict, params: list, grads: list, states: list) -> None:
        (beta1, beta2), eps = group["betas"], group["eps"]
        for p, grad, state in zip(params, grads, states):
            m, v, step = state["exp_avg"], state["exp_avg_sq"], float(state["step"])
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            perturb = (beta1 * m + (1 - beta1) * grad) / denom if group["nesterov"] else m / denom
            self._finish(group, p, grad, perturb, step)

    def _foreach_step(self, group: dict, params: list, grads: list, states: list) -> None:
        (beta1, beta2), eps = group["betas"], group["eps"]
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        steps = [float(s["step"]) for s in states]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denoms, eps)
        if group["nesterov"]:
            numerators = list(torch._foreach_mul(ms, beta1))
            torch._foreach_add_(numerators, torch._foreach_mul(grads, 1 - beta1))
        else:
            numerators = ms
        perturbs = torch._foreach_div(numerators, denoms)
        for p, grad, perturb, step in zip(params, grads, perturbs, steps):
            self._finish(group, p, grad, perturb, step)


class NpuAdamP(AdamP):
    """:class:`AdamP` under torch_npu's NpuFusedAdamP signature (the same)."""
