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

Four flat launchers implement it, and one segment launcher (gradients read where they lie):

* :func:`sgd_composite`: torch ops on the flat slices, for any device and dtype;
  fp16/bf16 slices are computed in fp32 (in cache-sized chunks) and rounded once.
  In fp32 and fp64 these are torch.optim.SGD(foreach=False)'s operations in its order, so the
  results are torch's bit for bit.
* :func:`sgd_native_fused`: torch's own fused SGD op (``torch._fused_sgd_``) over the
  whole slice, on CUDA for the dtypes where :func:`native_fused_agrees` has checked it against
  :func:`sgd_composite`. Never on the CPU: torch 2.13's CPU op rounds one or two momentum
  values per million differently in fp32 and fp64, and is wrong for fp16/bf16.
* :func:`sgd_native_fused_fp32_chunks`: for fp16/bf16 where only the fp32 fused op is
  right (CUDA): cache-sized chunks are upcast, updated by the fp32 fused op, and rounded once.
* :func:`sgd_c_flat` (also named ``sgd_c_half``): every CPU dtype in one pass over memory,
  by a C kernel (``csrc/sgd.c``) compiled on first use (:mod:`fused_core.native`).
* :func:`sgd_c_segments`: every CPU dtype, the same C kernel over the slots of a param group,
  each slot's gradient read at its own address (:class:`fused_core.kernels.GradSegments`).
  In fp32 and fp64 it performs torch.optim.SGD(foreach=False)'s operations in its order,
  each ``add(..., alpha=a)`` a fused multiply-add as ATen's, so the results are torch's bit
  for bit; fp16/bf16 are computed in fp32 and rounded once, as the composite does.

Same bits whatever serves: on the CPU every launcher of a dtype gives :func:`sgd_composite`'s
bits, so a data-parallel rank whose C kernel did not build (or was built with other flags)
does not drift from its peers. The C library is checked for that when it is loaded
(:func:`c_kernel_matches_composite`, bit for bit, every dtype; a build that fails is rejected
and the next flag set tried), and the composite serves where no build passes.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fused_core.kernels import (
    LOW_PRECISION,
    GradSegments,
    Launcher,
    RunInfo,
    as_float,
    dtype_symbols,
    in_fp32_chunks,
    launcher_agrees,
)
from fused_core.native import NativeLibrary, load_library


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
    run: RunInfo,
) -> None:
    """SGD from torch ops; low-precision slices go through fp32 chunk by chunk."""
    first_step = run.first_step
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
    run: RunInfo,
) -> None:
    """One call of torch's fused SGD op over the whole slice."""
    _fused_op(params, grads, _momentum_buffer(state, hp), hp, run.first_step)


def sgd_native_fused_fp32_chunks(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    run: RunInfo,
) -> None:
    """fp16/bf16 slices through torch's fp32 fused op, chunk by chunk."""
    first_step = run.first_step
    in_fp32_chunks(lambda p, g, b: _fused_op(p, g, b, hp, first_step), params, grads, _momentum_buffer(state, hp))


C_SOURCE = Path(__file__).with_name("csrc") / "sgd.c"
C_SEGMENT_FUNCTIONS = dtype_symbols("sgd_segments")
_C_SIGNATURE = (
    ctypes.c_int64,
    [ctypes.c_void_p] * 7 + [ctypes.c_int64] + [ctypes.c_double] * 4 + [ctypes.c_int] * 3,
)


C_PROBE_NUMEL = 2 * 32768 + 5
"""Elements of the load-time probe: more than one of the kernel's 32,768-element pieces, odd length."""


@functools.cache
def c_library() -> NativeLibrary | None:
    """The compiled ``csrc/sgd.c``, or None (``fused_core.native.unavailable_reason(C_SOURCE)`` says why).

    Only a build that gives :func:`sgd_composite`'s bits is used (:func:`c_kernel_matches_composite`).
    Looked up once per process: every step calls this."""
    return load_library(
        C_SOURCE,
        {name: _C_SIGNATURE for name in C_SEGMENT_FUNCTIONS.values()},
        extra=("-lm",),
        check=c_kernel_matches_composite,
    )


def c_kernel_matches_composite(library: NativeLibrary) -> bool:
    """Whether ``library``'s kernels give :func:`sgd_composite`'s bits for every dtype on the CPU.

    ``fused_core.native`` runs this on every load of ``csrc/sgd.c``: a miscompiled build, or one
    whose rounding differs from the composite (and so from any rank where the composite serves),
    is rejected there."""

    cpu, launcher = torch.device("cpu"), c_flat_launcher(library)
    return all(_matches_composite(launcher, cpu, dtype, C_PROBE_NUMEL, exact=True) for dtype in C_SEGMENT_FUNCTIONS)


def c_flat_launcher(library: NativeLibrary) -> Launcher:
    """A flat launcher running the kernel of ``library`` (a build of ``csrc/sgd.c``), whichever it is."""

    def launcher(
        params: torch.Tensor,
        grads: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        hyperparams: Mapping[str, Any],
        run: RunInfo,
    ) -> None:
        _c_call(library, params, state, GradSegments.whole(grads, initialized=not run.first_step), hyperparams)

    return launcher


def _c_call(
    library: NativeLibrary | None,
    params: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    grads: GradSegments,
    hp: Mapping[str, Any],
) -> int:
    if library is None or params.dtype not in C_SEGMENT_FUNCTIONS or params.device.type != "cpu":
        raise RuntimeError(f"the C SGD kernel cannot serve {params.dtype} on {params.device}")
    buf = _momentum_buffer(state, hp)
    started = getattr(library.cdll, C_SEGMENT_FUNCTIONS[params.dtype])(
        params.data_ptr(),
        None if buf is None else buf.data_ptr(),
        *grads.c_arguments(),
        as_float(hp["lr"]),
        float(hp["weight_decay"]),
        float(hp["momentum"]),
        1.0 - float(hp["dampening"]),
        int(bool(hp["nesterov"])),
        int(bool(hp["maximize"])),
        torch.get_num_threads(),
    )
    if started < 0:
        raise MemoryError("the C SGD kernel could not allocate its slot table")
    return int(started)


def sgd_c_segments(
    params: torch.Tensor, state: Mapping[str, torch.Tensor], grads: GradSegments, hp: Mapping[str, Any]
) -> int:
    """Segment launcher: every slot's gradient read where it lies, one C call for the run."""
    return _c_call(c_library(), params, state, grads, hp)


def sgd_c_flat(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    run: RunInfo,
) -> None:
    """Flat launcher: CPU slices through the C kernel, as one slot, on ``torch.get_num_threads()`` threads."""
    for tensor in (grads, *state.values()):
        if tensor.device != params.device or tensor.dtype != params.dtype or not tensor.is_contiguous():
            raise ValueError("sgd_c_flat takes contiguous CPU slices of one dtype")
        if tensor.numel() != params.numel():
            raise ValueError("sgd_c_flat takes slices of one length")
    _c_call(c_library(), params, state, GradSegments.whole(grads, initialized=not run.first_step), hp)


def c_flat_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Route a CPU dtype's flat slices to :func:`sgd_c_flat` when a build of the kernel loaded (and so
    passed :func:`c_kernel_matches_composite`)."""
    return device.type == "cpu" and dtype in C_SEGMENT_FUNCTIONS and c_library() is not None


sgd_c_half, c_half_serves = sgd_c_flat, c_flat_serves
"""The names of the flat C launcher and its predicate from when they served fp16/bf16 only."""


def c_segments_serve(device: torch.device, dtype: torch.dtype) -> bool:
    """Route a CPU dtype to :func:`sgd_c_segments` when a build of the kernel loaded (and so passed
    :func:`c_kernel_matches_composite`)."""
    return device.type == "cpu" and dtype in C_SEGMENT_FUNCTIONS and c_library() is not None


def fp32_native_fused_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Route a low-precision dtype to :func:`sgd_native_fused_fp32_chunks` when the fp32 op is right."""
    return dtype in LOW_PRECISION and native_fused_agrees(device, torch.float32)


_PROBE_CASES = (
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False),
    dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.0, nesterov=False, maximize=True),
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.02, nesterov=False, maximize=False),
)


@functools.cache
def native_fused_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_sgd_`` may serve ``dtype`` on ``device``: never on the CPU (its rounding
    differs from the composite's in a value or two per million, too rarely for a probe to see, so a
    rank where it served would drift from one where the C kernel or the composite does), elsewhere where it matches
    :func:`sgd_composite`."""
    return (
        device.type != "cpu"
        and hasattr(torch, "_fused_sgd_")
        and agrees_with_composite(sgd_native_fused, device, dtype)
    )


@functools.cache
def agrees_with_composite(launcher: Launcher, device: torch.device, dtype: torch.dtype, numel: int = 4099) -> bool:
    """Whether ``launcher`` matches :func:`sgd_composite` on ``device`` for ``dtype``: on the CPU
    bit for bit, elsewhere within 4 units in the last place of ``dtype`` (relative to the largest value)."""
    return _matches_composite(launcher, device, dtype, numel, exact=device.type == "cpu")


def _matches_composite(launcher: Launcher, device: torch.device, dtype: torch.dtype, numel: int, exact: bool) -> bool:
    """:func:`fused_core.kernels.launcher_agrees` with :func:`sgd_composite` as the reference, over
    SGD's probe cases (Nesterov with weight decay, dampening with maximize, no momentum)."""
    return launcher_agrees(
        launcher,
        sgd_composite,
        device,
        dtype,
        cases=_PROBE_CASES,
        state_names=("momentum_buffer",),
        exact=exact,
        numel=numel,
    )
