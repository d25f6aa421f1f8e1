r"""The RMSprop, RMSpropTF and Adadelta updates on flat slices, from torch ops.

Each composite launcher runs its optimizer's per-tensor update over a run's flat slices: the
operations of torch.optim.RMSprop / Adadelta (foreach=False) in torch's order, so fp32 and fp64
results are torch's bit for bit (the updates are elementwise: a flat slice is its parameters side by
side); fp16/bf16 slices are computed in fp32 in cache-sized chunks and rounded once per step
(:func:`fused_core.kernels.in_fp32_chunks`). They run on any device.

* :func:`rmsprop_composite`: torch.optim.RMSprop's ``_single_tensor_rmsprop``;
* :func:`rmsprop_tf_composite`: :func:`fused_rmsprop.reference.rmsprop_tf_update` (torch_npu's
  NpuFusedRMSpropTF), whose ``square_avg`` starts at one;
* :func:`adadelta_composite`: torch.optim.Adadelta's ``_single_tensor_adadelta``.

A run's state starts on its first step (``step`` 0, buffers 0, RMSpropTF's ``square_avg`` 1); each
step adds one to ``step``, which none of the updates reads. On the CPU the C launchers of
:mod:`fused_rmsprop.c_launchers` serve instead, checked bit for bit against these when they load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from fused_core.kernels import RunInfo, as_scalar, correctly_rounded_sqrt, in_fp32_chunks

from .reference import rmsprop_tf_update

State = Mapping[str, torch.Tensor]


def start_and_count(
    state: State, run: RunInfo, zeros: Iterable[torch.Tensor | None], ones: torch.Tensor | None = None
) -> None:
    """On the run's first step start its ``step`` and the buffers ``zeros`` at zero (``ones`` at one,
    parameter by parameter: alignment gaps stay zero); then count the step."""
    if run.first_step:
        state["step"].zero_()
        for buffer in zeros:
            if buffer is not None:
                buffer.zero_()
        if ones is not None:
            fill_slots(ones, run, 1.0)
    state["step"].add_(1)


def low_precision_sqrt(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The square root of an update of ``dtype`` parameters: torch's in fp32 and fp64 (its for-loop's
    bits, MKL's on x86-64 CPU wheels); in fp16/bf16, computed in fp32, the correctly rounded one
    (:func:`fused_core.kernels.correctly_rounded_sqrt`, the processor's instruction in the C
    kernel: torch's for-loop rounds every operation to fp16/bf16, so its bits are not kept anyway,
    and MKL's root costs as much as the rest of the step on an AVX2 AMD CPU)."""
    return _ieee_sqrt if dtype in (torch.float16, torch.bfloat16) else torch.sqrt


def _ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """:func:`fused_core.kernels.correctly_rounded_sqrt`, with the positive quiet NaN for a negative
    ``x`` (centered RMSprop's ``v - ḡ²`` can round below zero), as the C kernel gives it."""
    return correctly_rounded_sqrt(x).masked_fill_(x < 0, math.nan)


def fill_slots(tensor: torch.Tensor, run: RunInfo, value: float) -> None:
    """``value`` over every parameter of the run in ``tensor`` (a run slice), zero between them."""
    if int(run.numels.sum()) == tensor.numel():
        tensor.fill_(value)
        return
    tensor.zero_()
    for offset, numel in zip(run.offsets.tolist(), run.numels.tolist()):
        tensor[offset : offset + numel].fill_(value)


def rmsprop_buffers(
    state: State, hp: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(square_avg, grad_avg or None, momentum_buffer or None)``: what an RMSprop(TF) group uses."""
    grad_avg = state["grad_avg"] if hp["centered"] else None
    return state["square_avg"], grad_avg, state["momentum_buffer"] if hp["momentum"] > 0 else None


def rmsprop_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    grad_avg: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    hp: Mapping[str, Any],
    sqrt: Callable[[torch.Tensor], torch.Tensor] = torch.sqrt,
) -> None:
    """torch.optim.RMSprop(foreach=False)'s update of one tensor, in place, op for op, with the
    square root ``sqrt`` (:func:`low_precision_sqrt`)."""
    lr, alpha, weight_decay = as_scalar(hp["lr"]), hp["alpha"], hp["weight_decay"]
    grad = -grad if hp["maximize"] else grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    if grad_avg is not None:
        grad_avg.lerp_(grad, 1 - alpha)
        avg = sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1))
    else:
        avg = sqrt(square_avg)
    avg = avg.add_(hp["eps"])
    if momentum_buffer is not None:
        momentum_buffer.mul_(hp["momentum"]).addcdiv_(grad, avg)
        param.add_(momentum_buffer, alpha=-lr)
    else:
        param.addcdiv_(grad, avg, value=-lr)


def rmsprop_composite(
    params: torch.Tensor, grads: torch.Tensor, state: State, hp: Mapping[str, Any], run: RunInfo
) -> None:
    """RMSprop from torch ops over one run; low precision through fp32 chunks."""
    buffers = rmsprop_buffers(state, hp)
    start_and_count(state, run, zeros=buffers)
    sqrt = low_precision_sqrt(params.dtype)
    in_fp32_chunks(lambda p, g, v, a, b: rmsprop_update(p, g, v, a, b, hp, sqrt), params, grads, *buffers)


def rmsprop_tf_composite(
    params: torch.Tensor, grads: torch.Tensor, state: State, hp: Mapping[str, Any], run: RunInfo
) -> None:
    """RMSpropTF from torch ops over one run (``square_avg`` starts at one); low precision through fp32 chunks."""
    buffers = rmsprop_buffers(state, hp)
    start_and_count(state, run, zeros=buffers[1:], ones=buffers[0])
    keywords = {key: hp[key] for key in RMSPROP_TF_KEYS} | {"sqrt": low_precision_sqrt(params.dtype)}
    in_fp32_chunks(lambda p, g, v, a, b: rmsprop_tf_update(p, g, v, a, b, **keywords), params, grads, *buffers)


RMSPROP_TF_KEYS = ("lr", "alpha", "eps", "weight_decay", "momentum", "decoupled_decay", "lr_in_momentum", "maximize")
"""The param-group keys :func:`fused_rmsprop.reference.rmsprop_tf_update` takes."""


def adadelta_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    hp: Mapping[str, Any],
    sqrt: Callable[[torch.Tensor], torch.Tensor] = torch.sqrt,
) -> None:
    """torch.optim.Adadelta(foreach=False)'s update of one tensor, in place, op for op, with the
    square root ``sqrt`` (:func:`low_precision_sqrt`)."""
    lr, rho, eps, weight_decay = as_scalar(hp["lr"]), hp["rho"], hp["eps"], hp["weight_decay"]
    grad = -grad if hp["maximize"] else grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
    std = sqrt(square_avg.add(eps))
    delta = sqrt(acc_delta.add(eps))
    delta.div_(std).mul_(grad)
    acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    param.add_(delta, alpha=-lr)


def adadelta_composite(
    params: torch.Tensor, grads: torch.Tensor, state: State, hp: Mapping[str, Any], run: RunInfo
) -> None:
    """Adadelta from torch ops over one run; low precision through fp32 chunks."""
    start_and_count(state, run, zeros=(state["square_avg"], state["acc_delta"]))
    sqrt = low_precision_sqrt(params.dtype)
    in_fp32_chunks(
        lambda p, g, v, u: adadelta_update(p, g, v, u, hp, sqrt), params, grads, state["square_avg"], state["acc_delta"]
    )
