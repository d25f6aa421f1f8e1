r"""The Adam update on flat slices.

With gradient :math:`g_t`, parameters :math:`\theta`, learning rate :math:`\gamma`, betas
:math:`\beta_1, \beta_2`, :math:`\epsilon`, weight decay :math:`\lambda` and the parameter's step
count :math:`t` (torch.optim.Adam's algorithm, step for step; AdamW is ``decoupled_weight_decay``)::

    t   = t + 1
    g   = -g_t if maximize else g_t
    θ   = θ (1 - γ λ)                  decoupled (AdamW), if λ != 0
    g   = g + λ θ                      otherwise, if λ != 0
    m_t = m + (1 - β1) (g - m)         m.lerp_(g, 1 - β1)
    v_t = β2 v + (1 - β2) g²
    v̂   = max(v̂, v_t) if amsgrad else v_t
    θ   = θ - γ / (1 - β1^t) · m_t / (sqrt(v̂) / sqrt(1 - β2^t) + ε)

A run's state starts at zero (``step`` 0, moments 0) on its first step. The core splits runs
where the step counts of their slots differ, so :func:`adam_composite` sees one ``t`` per run;
the C kernel (:mod:`fused_adam.c_kernel`) takes one per slot.

* :func:`adam_composite`: torch ops on the flat slices, any device and dtype; torch.optim.Adam
  (foreach=False)'s operations in its order, so fp64 results (and fp32 under
  ``FUSED_OPTIM_TORCH_SQRT``; else the square root is correctly rounded) are torch's bit for bit
  (a tensor ``lr`` computes in its dtype, as torch's); fp16/bf16 slices are computed in fp32 in
  cache-sized chunks, with correctly rounded square roots (:func:`fused_core.kernels.correctly_rounded_sqrt`,
  as the C kernel and torch's fused op take them), and rounded once per step.
* :func:`adam_native_fused`: torch's own fused Adam op over a whole run, on CUDA where
  :func:`native_fused_agrees` has checked it against the composite (fp16/bf16: its fp32 math,
  one rounding, as ours).
* :func:`adam_c_flat` and :func:`adam_c_segments` (CPU, every dtype): the same update in one pass
  over memory, gradients read where they lie; checked bit for bit against the composite when the
  library loads (:func:`c_kernel_matches_composite`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fused_core.kernels import (
    GradSegments,
    Launcher,
    RunInfo,
    as_float,
    as_scalar,
    in_fp32_chunks,
    launcher_agrees,
    torch_sqrt_requested,
    update_sqrt,
)
from fused_core.native import NativeLibrary

from . import c_kernel
from .c_kernel import C_SOURCE as C_SOURCE  # where fused-optim info finds the kernel's source

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _update(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    vmax: torch.Tensor | None,
    hp: Mapping[str, Any],
    step: float,
    sqrt: Callable[[torch.Tensor], torch.Tensor] = torch.sqrt,
) -> None:
    """torch.optim.Adam(foreach=False)'s update of one tensor at step ``step``, in place, taking
    square roots with ``sqrt``."""
    lr, (beta1, beta2), weight_decay = as_scalar(hp["lr"]), hp["betas"], hp["weight_decay"]
    grad = -g if hp["maximize"] else g
    if weight_decay != 0:
        if hp["decoupled_weight_decay"]:
            p.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(p, alpha=weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
    denom = (sqrt(v if vmax is None else vmax) / bias_correction2_sqrt).add_(hp["eps"])
    p.addcdiv_(m, denom, value=-step_size)


def _count_step(
    state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Start the run's state at zero on its first step, count this step; returns the moments
    ``(exp_avg, exp_avg_sq, max_exp_avg_sq or None)``."""
    steps, vmax = state["step"], state["max_exp_avg_sq"] if hp["amsgrad"] else None
    moments = (state["exp_avg"], state["exp_avg_sq"], vmax)
    if run.first_step:
        steps.zero_()
        for moment in moments:
            if moment is not None:
                moment.zero_()
    steps.add_(1)
    return moments


def adam_composite(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """Adam from torch ops over one run (one step count); fp16/bf16 through fp32 chunks, rounded
    once; square roots as :func:`fused_core.kernels.update_sqrt` takes them (correctly rounded but
    in fp64, and in fp32 under ``FUSED_OPTIM_TORCH_SQRT``), as the C kernel does."""
    _composite_step(params, grads, state, hp, run, torch_sqrt=torch_sqrt_requested())


def _composite_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    run: RunInfo,
    *,
    torch_sqrt: bool,
) -> None:
    moments = _count_step(state, hp, run)
    step = float(state["step"][0])
    sqrt = update_sqrt(params.dtype, torch_sqrt)
    in_fp32_chunks(lambda p, g, m, v, vmax: _update(p, g, m, v, vmax, hp, step, sqrt), params, grads, *moments)


def adam_native_fused(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """torch's fused Adam op (``torch._fused_adam_``/``_fused_adamw_``) over the whole run: one
    launch on CUDA, where :func:`native_fused_agrees` has checked it against the composite."""
    exp_avg, exp_avg_sq, vmax = _count_step(state, hp, run)
    fused = torch._fused_adamw_ if hp["decoupled_weight_decay"] else torch._fused_adam_
    beta1, beta2 = hp["betas"]
    fused(
        [params], [grads], [exp_avg], [exp_avg_sq], [] if vmax is None else [vmax],
        [state["step"][:1].to(params.device)],
        lr=as_float(hp["lr"]), beta1=beta1, beta2=beta2, weight_decay=hp["weight_decay"], eps=hp["eps"],
        amsgrad=hp["amsgrad"], maximize=hp["maximize"],
    )  # fmt: skip


@functools.cache
def native_fused_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's fused Adam op may serve ``dtype`` on ``device``: CUDA only (the CPU has the C
    kernel), where it matches :func:`adam_composite` to 4 units in the last place."""
    return (
        device.type == "cuda" and hasattr(torch, "_fused_adamw_") and _agrees(adam_native_fused, device, dtype, False)
    )


@functools.cache
def c_library() -> NativeLibrary | None:
    """The compiled ``csrc/adam.c`` (None where it cannot be had), only a build that gives the
    composite's bits (:func:`c_kernel_matches_composite`). Looked up once per process."""
    return c_kernel.load(check=c_kernel_matches_composite)


def adam_c_segments(
    params: torch.Tensor, state: Mapping[str, torch.Tensor], grads: GradSegments, hp: Mapping[str, Any]
) -> int:
    """Segment launcher: every slot's gradient read where it lies, one C call per param group."""
    return _c_step(c_library(), params, state, grads, hp, torch_sqrt=torch_sqrt_requested())


def adam_c_flat(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """Flat launcher: a run's slices through the C kernel, as one slot."""
    whole = GradSegments.whole(grads, initialized=not run.first_step)
    _c_step(c_library(), params, state, whole, hp, torch_sqrt=torch_sqrt_requested())


def _c_step(
    library: NativeLibrary | None,
    params: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    grads: GradSegments,
    hp: Mapping[str, Any],
    *,
    torch_sqrt: bool,
) -> int:
    """Count this step into every slot with a gradient (from 0 where its state starts), then update;
    over a slot table the kernel counts (no tensor allocated in the step: right after autograd has
    handed over thousands of gradients, an allocation can cost milliseconds in glibc's malloc)."""
    if library is None:
        raise RuntimeError("the C Adam kernel is not available")
    steps = state["step"]
    if steps.numel() == grads.slots:
        return c_kernel.call(library, params, state, grads, hp, steps=steps, torch_sqrt=torch_sqrt, count_steps=True)
    # A flat launcher's run as one slot: its slots' counts are equal.
    if not int(grads.initialized[0]):
        steps.zero_()
    steps.add_(1)
    return c_kernel.call(library, params, state, grads, hp, steps=steps[:1], torch_sqrt=torch_sqrt)


def c_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Route a CPU dtype to the C launchers when a build loaded (and so passed its self-check)."""
    return device.type == "cpu" and dtype in c_kernel.C_SEGMENT_FUNCTIONS and c_library() is not None


PROBE_CASES = (
    dict(
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=True,
    ),
    dict(
        lr=3e-3,
        betas=(0.8, 0.99),
        eps=1e-6,
        weight_decay=1e-1,
        amsgrad=True,
        maximize=True,
        decoupled_weight_decay=False,
    ),
    dict(
        lr=1e-3,
        betas=(0.0, 0.5),
        eps=1e-3,
        weight_decay=0.0,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=False,
    ),
)
PROBE_NUMEL = 2 * 32768 + 5
"""Elements of the load-time probe: more than one of the kernel's pieces, odd length."""


def c_kernel_matches_composite(library: NativeLibrary) -> bool:
    """Whether ``library`` gives :func:`adam_composite`'s bits for every dtype on the CPU, with either
    square root (run by ``fused_core.native`` on every load; a build that fails is rejected)."""

    def checked(torch_sqrt: bool) -> bool:
        def flat(
            params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Any, run: RunInfo
        ) -> None:
            whole = GradSegments.whole(grads, initialized=not run.first_step)
            _c_step(library, params, state, whole, hp, torch_sqrt=torch_sqrt)

        reference = functools.partial(_composite_step, torch_sqrt=torch_sqrt)
        cpu = torch.device("cpu")
        return all(_agrees(flat, cpu, dtype, True, reference) for dtype in c_kernel.C_SEGMENT_FUNCTIONS)

    return checked(False) and checked(True)


def _agrees(
    candidate: Launcher, device: torch.device, dtype: torch.dtype, exact: bool, reference: Launcher = adam_composite
) -> bool:
    """:func:`fused_core.kernels.launcher_agrees` with ``reference`` (:func:`adam_composite`) over
    Adam's probe cases."""
    return launcher_agrees(
        candidate, reference, device, dtype, cases=PROBE_CASES, state_names=MOMENTS,
        scalar_state_names=("step",), exact=exact, numel=PROBE_NUMEL,
        state_values=lambda name, x: x if name == "exp_avg" else x.abs(),
    )  # fmt: skip
