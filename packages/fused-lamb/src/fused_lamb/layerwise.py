r"""What Lamb's and AdamP's launchers share: per-parameter values over a run's flat slices.

A layer-wise update computes a few numbers per parameter (per slot of the run), or per channel
of a parameter, with :mod:`fused_core.reductions`, and then needs them element by element. Here:

* :func:`expand`: one value per slot, repeated over that slot's elements (and the alignment gap
  after it, whose elements are zeros), as one tensor the length of the run's slices;
* :class:`Channels`: the rows of every matrix parameter, :math:`\theta_{c,:}` of
  ``θ.reshape(θ.size(0), -1)`` (AdamP's channel view), whatever the parameter's memory layout;
  per-channel sums of squares and dot products, and channel values expanded to elements;
* :func:`in_fp32_runs`: fp16/bf16 runs computed in fp32 and rounded once per step, a few whole
  slots at a time (a per-parameter reduction must see every element of its slot before any
  element moves, so the chunks of :func:`fused_core.kernels.in_fp32_chunks` cannot serve);
* :func:`count_step`: the step count of a run (one count per run, as the core splits runs where
  the counts differ), its moments zeroed on the first step.

No function here loops in Python over the parameters' elements or issues an op per parameter;
:class:`Channels` reads each parameter's shape and strides (one list over the run's parameters,
as the core's own :class:`~fused_core.kernels.RunInfo` is built).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fused_core.kernels import FP32_CHUNK, RunInfo
from fused_core.reductions import result_dtype, segment_dot, segment_sumsq

LOW_PRECISION = (torch.float16, torch.bfloat16)


def count_step(state: Mapping[str, torch.Tensor], run: RunInfo, moments: Sequence[str]) -> float:
    """Start the run's state at zero on its first step, count this step; returns the run's count."""
    steps = state["step"]
    if run.first_step:
        steps.zero_()
        for name in moments:
            state[name].zero_()
    steps.add_(1)
    return float(steps[0])


def gap_lengths(run: RunInfo, length: int) -> torch.Tensor:
    """Elements from each slot's start to the next slot's (to ``length`` for the last): the slot
    and the alignment gap after it."""
    ends = torch.cat([run.offsets[1:], torch.tensor([length], dtype=torch.int64)])
    return ends - run.offsets


def expand(values: torch.Tensor, run: RunInfo, length: int) -> torch.Tensor:
    """``values`` (one per slot) repeated over each slot's elements and the gap after it."""
    repeats = gap_lengths(run, length).to(values.device)
    return torch.repeat_interleave(values, repeats, output_size=length)


def in_fp32_runs(
    update: Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor], RunInfo], None],
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Sequence[torch.Tensor],
    run: RunInfo,
    chunk: int = FP32_CHUNK,
) -> None:
    """Run ``update(params, grads, state, run)`` so that fp16/bf16 slices are computed in fp32.

    Low-precision runs are cut between slots into pieces of about ``chunk`` elements (a larger
    slot is a piece of its own); each piece is copied to fp32, updated, and ``params`` and
    ``state`` are rounded back once. Other dtypes are updated in place, as one piece."""
    if params.dtype not in LOW_PRECISION:
        update(params, grads, state, run)
        return
    length = params.numel()
    group = torch.div(run.offsets, chunk, rounding_mode="floor")
    _, counts = torch.unique_consecutive(group, return_counts=True)
    first = 0
    for count in counts.tolist():
        last = first + count
        start = int(run.offsets[first])
        end = int(run.offsets[last]) if last < run.slots else length
        piece = RunInfo(
            first_step=run.first_step,
            parameters=run.parameters[first:last],
            offsets=run.offsets[first:last] - start,
            numels=run.numels[first:last],
        )
        wide = [tensor[start:end].float() for tensor in (params, grads, *state)]
        update(wide[0], wide[1], wide[2:], piece)
        for narrow, value in zip((params, *state), (wide[0], *wide[2:])):
            narrow[start:end].copy_(value)
        first = last


class Channels:
    """The channels (rows of ``θ.reshape(θ.size(0), -1)``) of a run's matrix parameters.

    The slices hold each parameter in its memory order, so a channel's elements need not be
    contiguous (a transposed weight's are not). For a dense layout, the element at memory offset
    :math:`k` of a parameter lies in channel :math:`\\lfloor k / s_0 \\rfloor \\bmod n_0` (size
    :math:`n_0` and stride :math:`s_0` of dimension 0), so every parameter is cut into *pieces* of
    :math:`s_0` contiguous elements (a whole channel for a contiguous or channels_last weight, one
    element for a transposed one), each in one channel. A parameter of fewer than two dimensions,
    or with no elements, is one piece and one channel; each alignment gap is one piece of a spare
    channel. Sums over channels are segment reductions over the pieces, added into their channels.
    """

    def __init__(self, run: RunInfo, length: int, device: torch.device) -> None:
        layout = [(p.shape, p.stride()) for p in run.parameters]
        shapes = [(len(shape), shape[0], stride[0]) if shape else (0, 1, 1) for shape, stride in layout]
        dims, size0, stride0 = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 3).unbind(1)
        numels = run.numels
        self.run, self.length, self.device = run, length, device
        self.matrix = (dims > 1) & (numels > 0)
        """Per slot: a parameter with channels (two or more dimensions, not empty)."""
        self.rows = torch.where(self.matrix, size0, 1)
        """Per slot: its channels."""
        self.row_numel = numels // self.rows
        """Per slot: the elements of one channel."""
        piece = torch.where(self.matrix & (size0 > 1), stride0, numels).clamp_min(1)
        pieces = torch.where(numels > 0, numels // piece, 1)
        gaps = gap_lengths(run, length) - numels
        per_slot = pieces + 1  # the slot's pieces, then its gap
        slot_of_piece = torch.repeat_interleave(torch.arange(run.slots), per_slot)
        index = torch.arange(int(per_slot.sum())) - torch.repeat_interleave(per_slot.cumsum(0) - per_slot, per_slot)
        is_gap = index == pieces[slot_of_piece]
        self.channels = int(self.rows.sum())
        first_channel = self.rows.cumsum(0) - self.rows
        self.slot_of_channel = torch.repeat_interleave(torch.arange(run.slots), self.rows).to(device)
        channel = first_channel[slot_of_piece] + index % self.rows[slot_of_piece]
        self.piece_channel = torch.where(is_gap, self.channels, channel).to(device)
        self.piece_numels = torch.where(is_gap, gaps[slot_of_piece], torch.minimum(piece, numels)[slot_of_piece])
        self.piece_offsets = self.piece_numels.cumsum(0) - self.piece_numels

    def sums(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per channel: the sum of ``x * y`` (of ``x * x`` without ``y``), accumulated in fp64,
        in :func:`fused_core.reductions.result_dtype` of ``x``."""
        if y is None:
            partial = segment_sumsq(x, self.piece_offsets, self.piece_numels)
        else:
            partial = segment_dot(x, y, self.piece_offsets, self.piece_numels)
        total = torch.zeros(self.channels + 1, dtype=torch.float64, device=partial.device)
        return total.index_add_(0, self.piece_channel, partial.double())[:-1].to(result_dtype(x.dtype))

    def to_slots(self, values: torch.Tensor) -> torch.Tensor:
        """Per slot: the sum of its channels' ``values``, added in fp64, in ``values``' dtype."""
        total = torch.zeros(self.run.slots, dtype=torch.float64, device=values.device)
        return total.index_add_(0, self.slot_of_channel, values.double()).to(values.dtype)

    def slot_max(self, values: torch.Tensor) -> torch.Tensor:
        """Per slot: the largest of its channels' ``values``."""
        out = torch.full((self.run.slots,), float("-inf"), dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, self.slot_of_channel, values, "amax")

    def expand(self, values: torch.Tensor, gap: float = 0.0) -> torch.Tensor:
        """Per-channel ``values`` repeated over each channel's elements (``gap`` in alignment gaps)."""
        padded = torch.cat([values, values.new_full((1,), gap)])
        repeats = self.piece_numels.to(values.device)
        return torch.repeat_interleave(padded[self.piece_channel], repeats, output_size=self.length)
