"""The CPU launchers of RMSprop, RMSpropTF and Adadelta: the C kernels of ``csrc/rmsprop.c``.

For each kernel a flat launcher (a run's slices as one slot) and a segment launcher (every slot's
gradient read where it lies, one C call per param group), both one pass over memory. They serve a
CPU dtype once the library has loaded, which it does only after :func:`c_kernels_match_composites`
has found every kernel bit for bit equal to its composite (:mod:`fused_rmsprop.kernels`) for every
dtype on the probe cases; elsewhere the composites serve. The step counts are kept here, as the
composites keep them: zero where a slot's state starts, then one more per step with a gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fused_core.kernels import DTYPE_SUFFIXES, GradSegments, Launcher, RunInfo, launcher_agrees
from fused_core.native import NativeLibrary

from . import c_kernel
from .c_kernel import C_SOURCE as C_SOURCE  # where fused-optim info finds the kernel's source
from .kernels import adadelta_composite, rmsprop_composite, rmsprop_tf_composite

State = Mapping[str, torch.Tensor]
Call = Callable[[NativeLibrary, torch.Tensor, State, GradSegments, Mapping[str, Any]], int]


def call_rmsprop(library: NativeLibrary, params: torch.Tensor, state: State, grads: GradSegments, hp: Any) -> int:
    return c_kernel.call_rmsprop(library, params, state, grads, hp, tf=False)


def call_rmsprop_tf(library: NativeLibrary, params: torch.Tensor, state: State, grads: GradSegments, hp: Any) -> int:
    return c_kernel.call_rmsprop(library, params, state, grads, hp, tf=True)


CALLS: dict[str, Call] = {"rmsprop": call_rmsprop, "rmsprop_tf": call_rmsprop_tf, "adadelta": c_kernel.call_adadelta}


@functools.cache
def c_library() -> NativeLibrary | None:
    """The compiled ``csrc/rmsprop.c`` (None where it cannot be had), only a build that gives the
    composites' bits (:func:`c_kernels_match_composites`). Looked up once per process."""
    return c_kernel.load(check=c_kernels_match_composites)


def c_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Route a CPU dtype to the C launchers when a build loaded (and so passed its self-check)."""
    return device.type == "cpu" and dtype in DTYPE_SUFFIXES and c_library() is not None


def flat_step(
    library: NativeLibrary | None,
    kernel: str,
    params: torch.Tensor,
    grads: torch.Tensor,
    state: State,
    hp: Any,
    run: RunInfo,
) -> None:
    """A run's slices through the C kernel as one slot; the run's step count (one for all its slots) counted."""
    if library is None:
        raise RuntimeError(f"the C {kernel} kernel is not available")
    if run.first_step:
        state["step"].zero_()
    state["step"].add_(1)
    CALLS[kernel](library, params, state, GradSegments.whole(grads, initialized=not run.first_step), hp)


def segments_step(kernel: str, params: torch.Tensor, state: State, grads: GradSegments, hp: Any) -> int:
    """Every slot with a gradient counted (from zero where its state starts), then updated in one C call."""
    library = c_library()
    if library is None:
        raise RuntimeError(f"the C {kernel} kernel is not available")
    grads.count_steps_(state["step"])
    return CALLS[kernel](library, params, state, grads, hp)


def rmsprop_c_flat(params: torch.Tensor, grads: torch.Tensor, state: State, hp: Any, run: RunInfo) -> None:
    """Flat launcher of RMSprop (C)."""
    flat_step(c_library(), "rmsprop", params, grads, state, hp, run)


def rmsprop_c_segments(params: torch.Tensor, state: State, grads: GradSegments, hp: Any) -> int:
    """Segment launcher of RMSprop (C)."""
    return segments_step("rmsprop", params, state, grads, hp)


def rmsprop_tf_c_flat(params: torch.Tensor, grads: torch.Tensor, state: State, hp: Any, run: RunInfo) -> None:
    """Flat launcher of RMSpropTF (C)."""
    flat_step(c_library(), "rmsprop_tf", params, grads, state, hp, run)


def rmsprop_tf_c_segments(params: torch.Tensor, state: State, grads: GradSegments, hp: Any) -> int:
    """Segment launcher of RMSpropTF (C)."""
    return segments_step("rmsprop_tf", params, state, grads, hp)


def adadelta_c_flat(params: torch.Tensor, grads: torch.Tensor, state: State, hp: Any, run: RunInfo) -> None:
    """Flat launcher of Adadelta (C)."""
    flat_step(c_library(), "adadelta", params, grads, state, hp, run)


def adadelta_c_segments(params: torch.Tensor, state: State, grads: GradSegments, hp: Any) -> int:
    """Segment launcher of Adadelta (C)."""
    return segments_step("adadelta", params, state, grads, hp)


RMSPROP_STATE = ("square_avg", "momentum_buffer", "grad_avg")
RMSPROP = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False)
RMSPROP_TF = dict(RMSPROP, alpha=0.9, eps=1e-10, decoupled_decay=False, lr_in_momentum=True)
ADADELTA = dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False)
PROBES: dict[str, tuple[Launcher, tuple[str, ...], tuple[dict[str, Any], ...]]] = {
    "rmsprop": (
        rmsprop_composite,
        RMSPROP_STATE,
        (
            RMSPROP,
            dict(RMSPROP, lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2, momentum=0.9, centered=True, maximize=True),
            # alpha > 0.5: lerp's other branch; a float32 tensor lr
            dict(RMSPROP, lr=torch.tensor(1e-3), alpha=0.3, eps=1e-3, weight_decay=0.1, momentum=0.5, centered=True),
        ),
    ),
    "rmsprop_tf": (
        rmsprop_tf_composite,
        RMSPROP_STATE,
        (
            RMSPROP_TF,
            dict(RMSPROP_TF, lr=3e-3, eps=1e-3, weight_decay=1e-2, momentum=0.9, centered=True, decoupled_decay=True),
            dict(RMSPROP_TF, lr=torch.tensor(1e-3), alpha=0.5, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True),
            dict(RMSPROP_TF, weight_decay=0.1, momentum=0.5, lr_in_momentum=False, maximize=True),
        ),
    ),
    "adadelta": (
        adadelta_composite,
        ("square_avg", "acc_delta"),
        (ADADELTA, dict(ADADELTA, lr=torch.tensor(0.5), rho=0.3, eps=1e-3, weight_decay=0.1, maximize=True)),
    ),
}
"""Each kernel's composite, state buffers and probe cases (every flag of the C code's specialisations)."""
PROBE_NUMEL = 2 * 32768 + 5
"""Elements of the load-time probe: more than one of the kernel's pieces, odd length."""


def c_kernels_match_composites(library: NativeLibrary) -> bool:
    """Whether ``library`` gives every composite's bits for every dtype on the CPU (run by
    ``fused_core.native`` on every load; a build that fails is rejected)."""
    return all(
        kernel_agrees(library, kernel, dtype, torch.device("cpu")) for kernel in PROBES for dtype in DTYPE_SUFFIXES
    )


def kernel_agrees(library: NativeLibrary, kernel: str, dtype: torch.dtype, device: torch.device) -> bool:
    """:func:`fused_core.kernels.launcher_agrees`, bit for bit, of ``library``'s flat launcher of
    ``kernel`` and its composite over the probe cases."""
    composite, state_names, cases = PROBES[kernel]

    def flat(params: torch.Tensor, grads: torch.Tensor, state: State, hp: Any, run: RunInfo) -> None:
        flat_step(library, kernel, params, grads, state, hp, run)

    return launcher_agrees(
        flat, composite, device, dtype, cases=cases, state_names=state_names, scalar_state_names=("step",),
        exact=True, numel=PROBE_NUMEL,
    )  # fmt: skip
