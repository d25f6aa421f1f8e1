r"""The Lion update on flat slices.

With gradient :math:`g`, parameters :math:`\theta`, momentum :math:`m` (``exp_avg``, zero before
a parameter's first step), learning rate :math:`\gamma`, betas :math:`\beta_1, \beta_2` and weight
decay :math:`\lambda` (:class:`fused_lion.reference.Lion`'s algorithm, step for step)::

    g = -g                             if maximize
    θ = θ (1 - γλ)                     if λ != 0
    c = β1 m + (1 - β1) g
    θ = θ - γ sign(c)
    m = β2 m + (1 - β2) g

Three launchers implement it:

* :func:`lion_composite`: the reference's per-tensor torch ops
  (:func:`fused_lion.reference.lion_update_`) on the flat slices, any device and dtype, so fp32
  and fp64 results are the reference's bit for bit; fp16/bf16 slices are computed in fp32 in
  cache-sized chunks and rounded once per step.
* :func:`lion_c_flat` and :func:`lion_c_segments` (CPU, every dtype): the same update in one pass
  over memory (``csrc/lion.c``), the segment launcher reading every gradient where autograd put
  it; checked bit for bit against the composite when the library loads
  (:func:`c_kernel_matches_composite`), so every launcher of a dtype gives the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from fused_core.kernels import GradSegments, RunInfo, in_fp32_chunks, launcher_agrees
from fused_core.native import NativeLibrary

from . import c_kernel
from .c_kernel import C_SOURCE as C_SOURCE  # where fused-optim info finds the kernel's source
from .reference import lion_update_


def lion_composite(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """Lion from torch ops over one run; low precision through fp32 chunks."""
    exp_avg = state["exp_avg"]
    if run.first_step:  # the reference starts exp_avg at zero
        exp_avg.zero_()
    in_fp32_chunks(lambda p, g, m: lion_update_(p, g, m, hp), params, grads, exp_avg)


@functools.cache
def c_library() -> NativeLibrary | None:
    """The compiled ``csrc/lion.c`` (None where it cannot be had), only a build that gives the
    composite's bits (:func:`c_kernel_matches_composite`). Looked up once per process."""
    return c_kernel.load(check=c_kernel_matches_composite)


def lion_c_segments(
    params: torch.Tensor, state: Mapping[str, torch.Tensor], grads: GradSegments, hp: Mapping[str, Any]
) -> int:
    """Segment launcher: every slot's gradient read where it lies, one C call per param group."""
    return _c_step(c_library(), params, state, grads, hp)


def lion_c_flat(
    params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Mapping[str, Any], run: RunInfo
) -> None:
    """Flat launcher: a run's slices through the C kernel, as one slot."""
    _c_step(c_library(), params, state, GradSegments.whole(grads, initialized=not run.first_step), hp)


def _c_step(
    library: NativeLibrary | None,
    params: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    grads: GradSegments,
    hp: Mapping[str, Any],
) -> int:
    if library is None:
        raise RuntimeError("the C Lion kernel is not available")
    return c_kernel.call(library, params, state["exp_avg"], grads, hp)


def c_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Route a CPU dtype to the C launchers when a build loaded (and so passed its self-check)."""
    return device.type == "cpu" and dtype in c_kernel.C_SEGMENT_FUNCTIONS and c_library() is not None


PROBE_CASES = (
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-1, maximize=False),
    dict(lr=torch.tensor(3e-3), betas=(0.8, 0.95), weight_decay=0.5, maximize=True),
    dict(lr=1e-3, betas=(0.0, 0.5), weight_decay=0.0, maximize=False),
)
PROBE_NUMEL = 2 * 32768 + 5
"""Elements of the load-time probe: more than one of the kernel's pieces, odd length."""


def c_kernel_matches_composite(library: NativeLibrary) -> bool:
    """Whether ``library`` gives :func:`lion_composite`'s bits for every dtype on the CPU (run by
    ``fused_core.native`` on every load; a build that fails is rejected)."""

    def flat(
        params: torch.Tensor, grads: torch.Tensor, state: Mapping[str, torch.Tensor], hp: Any, run: RunInfo
    ) -> None:
        _c_step(library, params, state, GradSegments.whole(grads, initialized=not run.first_step), hp)

    return all(
        launcher_agrees(
            flat,
            lion_composite,
            torch.device("cpu"),
            dtype,
            cases=PROBE_CASES,
            state_names=("exp_avg",),
            exact=True,
            numel=PROBE_NUMEL,
        )  # fmt: skip
        for dtype in c_kernel.C_SEGMENT_FUNCTIONS
    )
