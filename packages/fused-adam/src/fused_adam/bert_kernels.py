r"""The BertAdam update on flat slices: :func:`bert_adam_composite`.

The update of :mod:`fused_adam.bert_reference` (pytorch-pretrained-BERT's BertAdam, as torch_npu's
``NpuFusedBertAdam``), for a run of parameters at once: the run's slots share one step count
(the core splits runs where counts differ), so one scheduled learning rate; each slot's gradient
is clipped by its own norm, the sums of squares of all slots computed in one call of
:func:`fused_core.reductions.segment_sumsq` and the coefficients spread over their elements
(no loop over parameters). Then the reference's per-tensor torch ops run on the flat slices, so
fp32 and fp64 results are the reference's bit for bit; fp16/bf16 slices are computed in fp32 in
cache-sized chunks and rounded once per step. Any device, any dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fused_core.kernels import RunInfo, in_fp32_chunks
from fused_core.reductions import segment_sumsq

from .bert_reference import bert_adam_update_, clip_coefficients, scheduled_lr


def clip_scales(grads: torch.Tensor, run: RunInfo, max_grad_norm: float) -> torch.Tensor | None:
    """Every element's clipping coefficient (its slot's; the gap after a slot takes that slot's),
    in the dtype of the norms (fp32, fp64 for fp64); None where no slot's gradient is clipped."""
    if max_grad_norm <= 0:
        return None
    coefficients = clip_coefficients(segment_sumsq(grads, run.offsets, run.numels), max_grad_norm)
    if bool((coefficients >= 1).all()):
        return None
    spans = torch.diff(run.offsets, append=torch.tensor([grads.numel()], dtype=run.offsets.dtype))
    return torch.repeat_interleave(coefficients, spans.to(coefficients.device))


def bert_adam_composite(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """BertAdam from torch ops over one run (one step count); low precision through fp32 chunks."""
    steps, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    if run.first_step:  # the reference starts every state at zero
        for tensor in (steps, exp_avg, exp_avg_sq):
            tensor.zero_()
    lr = scheduled_lr(hp, float(steps[0]))
    scales = clip_scales(grads, run, hp["max_grad_norm"])
    update = lambda p, g, m, v, s: bert_adam_update_(p, g, m, v, hp, lr, s)  # noqa: E731
    in_fp32_chunks(update, params, grads, exp_avg, exp_avg_sq, scales)
    steps.add_(1)
