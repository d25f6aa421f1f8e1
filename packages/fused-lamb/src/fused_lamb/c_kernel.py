"""ctypes glue for ``csrc/lamb.c``: Lamb over the slots of a flat CPU buffer in two passes.

The kernel computes :func:`fused_lamb.lamb_kernels.lamb_composite`'s step (fp16/bf16: the fp32
arithmetic, rounded once per step) to a few ulps; the C file's top comment gives the math and
where it rounds. This module only builds, loads and calls it:

* ``C_SOURCE``, ``C_SEGMENT_FUNCTIONS`` (dtype -> exported symbol), ``C_SIGNATURE``;
* :func:`load` compiles it through :func:`fused_core.native.load_library` (with the caller's
  self-check);
* :func:`call` runs one step over a run of slots (:class:`fused_core.kernels.GradSegments`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fused_core.kernels import GradSegments, as_float
from fused_core.native import NativeLibrary, SelfCheck, load_library

C_SOURCE = Path(__file__).with_name("csrc") / "lamb.c"
C_SEGMENT_FUNCTIONS = {
    torch.float32: "lamb_segments_f32",
    torch.float64: "lamb_segments_f64",
    torch.bfloat16: "lamb_segments_bf16",
    torch.float16: "lamb_segments_fp16",
}
C_SIGNATURE = (
    ctypes.c_int64,
    # param, exp_avg, exp_avg_sq, steps, grad_ptrs, has_grad, offsets, numels, initialized
    [ctypes.c_void_p] * 9
    # slots; lr, beta1, beta2, beta3, eps, weight_decay, clip, max_weight_norm; flags, threads
    + [ctypes.c_int64]
    + [ctypes.c_double] * 8
    + [ctypes.c_int] * 2,
)
C_EXTRA = ("-fno-math-errno", "-lm")
"""After the flags of every build: ``-fno-math-errno`` lets ``sqrt`` vectorise (same bits either way)."""
BIAS_CORRECTION, DECOUPLED, TRUST_RATIO, CLIPPING, CLAMP = 1, 2, 4, 8, 16
"""The bits of the kernel's ``flags`` (``enum lamb_flags`` in ``csrc/lamb.c``)."""


def load(check: SelfCheck | None = None) -> NativeLibrary | None:
    """The compiled ``csrc/lamb.c`` (every dtype's function typed), or None where it cannot be had
    (``fused_core.native.unavailable_reason(C_SOURCE)`` says why). ``check`` (a module-level
    function of the library) must pass or the build is rejected."""
    return load_library(
        C_SOURCE, {name: C_SIGNATURE for name in C_SEGMENT_FUNCTIONS.values()}, extra=C_EXTRA, check=check
    )


def call(
    library: NativeLibrary,
    params: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    grads: GradSegments,
    hp: Mapping[str, Any],
    steps: torch.Tensor,
    *,
    trust_ratio: bool,
    clip: float | None,
    threads: int | None = None,
) -> int:
    """One Lamb step over the slots of ``grads`` on the contiguous CPU slice ``params``.

    ``state`` holds ``exp_avg`` and ``exp_avg_sq``, slices like ``params``; ``steps`` (float64, one
    per slot) is each slot's step count after this step's increment. ``hp``: the param group
    (``lr`` as a number or a one-element tensor, read as a number). ``trust_ratio``: whether the
    ratio scales the step; ``clip``: what the gradients are divided by (None: nothing). Runs on
    ``threads`` (default ``torch.get_num_threads()``) OpenMP threads. Returns how many slots were
    initialised (``grads.initialized`` set to 2 there)."""
    if params.dtype not in C_SEGMENT_FUNCTIONS or params.device.type != "cpu":
        raise RuntimeError(f"the C Lamb kernel cannot serve {params.dtype} on {params.device}")
    if steps.dtype != torch.float64 or steps.numel() != grads.slots or not steps.is_contiguous():
        raise ValueError("steps must be a contiguous float64 tensor with one value per slot")
    beta1, beta2 = (float(beta) for beta in hp["betas"])
    flags = (
        BIAS_CORRECTION * bool(hp["bias_correction"])
        | DECOUPLED * bool(hp["adam_w_mode"])
        | TRUST_RATIO * trust_ratio
        | CLIPPING * (clip is not None)
        | CLAMP * (hp["max_weight_norm"] is not None)
    )
    started = getattr(library.cdll, C_SEGMENT_FUNCTIONS[params.dtype])(
        params.data_ptr(),
        state["exp_avg"].data_ptr(),
        state["exp_avg_sq"].data_ptr(),
        steps.data_ptr(),
        *grads.c_arguments(),  # grad_ptrs, has_grad, offsets, numels, initialized, slots
        as_float(hp["lr"]),
        beta1,
        beta2,
        1 - beta1 if hp["grad_averaging"] else 1.0,
        float(hp["eps"]),
        float(hp["weight_decay"]),
        1.0 if clip is None else float(clip),
        0.0 if hp["max_weight_norm"] is None else float(hp["max_weight_norm"]),
        flags,
        torch.get_num_threads() if threads is None else int(threads),
    )
    if started < 0:
        raise MemoryError("the C Lamb kernel could not allocate its piece table")
    return int(started)
