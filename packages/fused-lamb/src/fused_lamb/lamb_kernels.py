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
  passes over memory (the moments and both norms of every parameter, then the step), gradients read
  where they lie; to a few ulps of the composite (its own sqrt, reciprocals and order of additions),
  checked when the library loads (:func:`c_kernel_matches_composite`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fused_core.kernels import GradSegments, Launcher, RunInfo, as_float, launcher_agrees
from fused_core.native import NativeLibrary
from fused_core.reductions import segment_norms

from . import c_kernel
from .c_kernel import C_SOURCE as C_SOURCE  # where fused-optim info finds the kernel's source
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


@functools.cache
def c_library() -> NativeLibrary | None:
    """The compiled ``csrc/lamb.c`` (None where it cannot be had), only a build that agrees with
    the composite (:func:`c_kernel_matches_composite`). Looked up once per process."""
    return c_kernel.load(check=c_kernel_matches_composite)


def lamb_c_segments(
    params: torch.Tensor, state: Mapping[str, torch.Tensor], grads: GradSegments, hp: Mapping[str, Any]
) -> int:
    """Segment launcher: every slot's gradient read where it lies, one C call per param group."""
    return _c_step(c_library(), params, state, grads, hp)


def lamb_c_flat(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """Flat launcher: a run's slots through the C kernel, their gradients in the flat slice."""
    _c_step(c_library(), params, state, run_segments(grads, run), hp)


def run_segments(grads: torch.Tensor, run: RunInfo) -> GradSegments:
    """The slot table of a flat run: every slot has its gradient at its place in ``grads``."""
    return GradSegments(
        ptrs=grads.data_ptr() + run.offsets * grads.element_size(),
        has_grad=torch.ones(run.slots, dtype=torch.int8),
        offsets=run.offsets,
        numels=run.numels,
        initialized=torch.full((run.slots,), int(not run.first_step), dtype=torch.uint8),
    )


def _c_step(
    library: NativeLibrary | None,
    params: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    grads: GradSegments,
    hp: Mapping[str, Any],
) -> int:
    """Count this step into every slot with a gradient (from 0 where its state starts), then update."""
    if library is None:
        raise RuntimeError("the C Lamb kernel is not available")
    steps = state["step"]
    steps.masked_fill_((grads.initialized == 0) & (grads.has_grad != 0), 0).add_(grads.has_grad)
    clip = clip_divisor(hp, params.device)
    return c_kernel.call(
        library, params, state, grads, hp, steps.double(),
        trust_ratio=uses_trust_ratio(hp), clip=None if clip is None else float(clip),
    )  # fmt: skip


def c_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Route a CPU dtype to the C launchers when a build loaded (and so passed its self-check)."""
    return device.type == "cpu" and dtype in c_kernel.C_SEGMENT_FUNCTIONS and c_library() is not None


PROBE_CASES = (
    dict(
        lr=1e-2, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2, adam_w_mode=True,
        grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False, adam=False, max_weight_norm=None,
        global_grad_norm=torch.tensor(37.0),
    ),
    dict(
        lr=3e-3, bias_correction=False, betas=(0.8, 0.99), eps=1e-3, weight_decay=1e-1, adam_w_mode=False,
        grad_averaging=False, max_grad_norm=None, use_nvlamb=True, adam=False, max_weight_norm=10.0,
    ),
    dict(
        lr=1e-3, bias_correction=True, betas=(0.0, 0.5), eps=1e-8, weight_decay=0.0, adam_w_mode=True,
        grad_averaging=True, max_grad_norm=100.0, use_nvlamb=False, adam=False, max_weight_norm=None,
        global_grad_norm=torch.tensor(37.0),
    ),
)  # fmt: skip
PROBE_NUMELS = (3, 0, 40_000, 1, 70_001, 64, 64)
"""The slots of the load-time multi-slot probe: small, empty, larger than the kernel's pieces."""
PROBE_ULPS = 8.0
"""Tolerance of the probes, in units in the last place of the dtype relative to the largest value:
the kernel's sqrt, reciprocals and order of additions are its own (see ``csrc/lamb.c``)."""


def c_kernel_matches_composite(library: NativeLibrary) -> bool:
    """Whether ``library`` computes what :func:`lamb_composite` does for every dtype on the CPU, to
    :data:`PROBE_ULPS`: :func:`fused_core.kernels.launcher_agrees`'s one-slot probe, and a run of
    :data:`PROBE_NUMELS` slots (run by ``fused_core.native`` on every load; a build that fails is
    rejected)."""

    def flat(params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Any, run: RunInfo):
        _c_step(library, params, state, run_segments(grads, run), hp)

    cpu = torch.device("cpu")
    return all(
        _agrees(flat, cpu, dtype) and _agrees_on_slots(flat, cpu, dtype) for dtype in c_kernel.C_SEGMENT_FUNCTIONS
    )


def _agrees(candidate: Launcher, device: torch.device, dtype: torch.dtype) -> bool:
    return launcher_agrees(
        candidate, lamb_composite, device, dtype, cases=PROBE_CASES, state_names=MOMENTS,
        scalar_state_names=("step",), exact=False, ulps=PROBE_ULPS,
        state_values=lambda name, x: x if name == "exp_avg" else x.abs(),
    )  # fmt: skip


def _agrees_on_slots(candidate: Launcher, device: torch.device, dtype: torch.dtype) -> bool:
    """Two steps of ``candidate`` and :func:`lamb_composite` over one run of several slots (the
    per-slot norms), from the same random start, agree to :data:`PROBE_ULPS`."""
    generator = torch.Generator().manual_seed(1)
    numels = torch.tensor(PROBE_NUMELS, dtype=torch.int64)
    offsets = numels.cumsum(0) - numels
    parameters = tuple(torch.empty(int(n), dtype=dtype) for n in PROBE_NUMELS)
    length = int(numels.sum())
    for hp in PROBE_CASES:
        start = [torch.randn(length, generator=generator, dtype=torch.float64) for _ in range(4)]
        start[3].abs_()
        results = []
        for launcher in (lamb_composite, candidate):
            params, grads, m, v = (t.to(device, dtype) for t in start)
            state = {"exp_avg": m, "exp_avg_sq": v, "step": torch.zeros(len(PROBE_NUMELS))}
            for first_step in (True, False):
                launcher(params, grads, state, hp, RunInfo(first_step, parameters, offsets, numels))
            results.append((params, m, v))
        for expected, actual in zip(*results):
            scale = expected.double().abs().max().clamp_min(1e-30)
            if float((actual.double() - expected.double()).abs().max() / scale) > PROBE_ULPS * torch.finfo(dtype).eps:
                return False
    return True
