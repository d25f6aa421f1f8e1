"""ctypes glue for ``csrc/adam.c``: Adam/AdamW over the slots of a flat CPU buffer in one pass.

The kernel computes torch 2.13's ``torch.optim.Adam/AdamW(foreach=False)`` step bit for bit in
fp64, and in fp32 with ``torch_sqrt`` (else with the correctly rounded square root); fp16/bf16: the
fp32 arithmetic with the correctly rounded square root, rounded once per step; the C file's top comment
gives the math and where it rounds. This module only builds, loads and calls it:

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

from fused_core.kernels import GradSegments, as_float, dtype_symbols
from fused_core.native import NativeLibrary, SelfCheck, load_library

C_SOURCE = Path(__file__).with_name("csrc") / "adam.c"
C_SEGMENT_FUNCTIONS = dtype_symbols("adam_segments")
C_SIGNATURE = (
    ctypes.c_int64,
    # param, exp_avg, exp_avg_sq, max_exp_avg_sq, steps; steps_double, count_steps;
    # grad_ptrs, has_grad, offsets, numels, initialized
    [ctypes.c_void_p] * 5
    + [ctypes.c_int] * 2
    + [ctypes.c_void_p] * 5
    # slots; lr, beta1, beta2, eps, weight_decay; decoupled, maximize, lr_single, torch_sqrt, threads
    + [ctypes.c_int64]
    + [ctypes.c_double] * 5
    + [ctypes.c_int] * 5,
)
STEP_DTYPES = (torch.float32, torch.float64)
"""The dtypes of the step table the kernel reads (and counts in): torch's scalar state dtypes."""
C_EXTRA = ("-fno-math-errno", "-lm", "-ldl")
"""After the flags of every build: ``-fno-math-errno`` lets the fallback ``sqrt`` vectorise (same bits
either way); ``-ldl`` for ``dlopen``/``dlsym``, which find MKL's square roots in the loaded torch."""


def load(check: SelfCheck | None = None) -> NativeLibrary | None:
    """The compiled ``csrc/adam.c`` (every dtype's function typed), or None where it cannot be had
    (``fused_core.native.unavailable_reason(C_SOURCE)`` says why). ``check`` (a module-level
    function of the library) must pass or the build is rejected. Cached per process by
    :func:`fused_core.native.load_library`; a launcher still keeps the result."""
    return load_library(
        C_SOURCE, {name: C_SIGNATURE for name in C_SEGMENT_FUNCTIONS.values()}, extra=C_EXTRA, check=check
    )


def call(
    library: NativeLibrary,
    params: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    grads: GradSegments,
    hp: Mapping[str, Any],
    steps: torch.Tensor | None = None,
    threads: int | None = None,
    torch_sqrt: bool = False,
    count_steps: bool = False,
) -> int:
    """One Adam/AdamW step over the slots of ``grads`` on the contiguous CPU slice ``params``.

    ``state`` holds ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``hp["amsgrad"]``),
    slices like ``params``; ``steps`` (float32 or float64, one per slot, else ``state["step"]``) is
    each slot's step count: with ``count_steps`` the kernel counts this step into it (1 where a slot's
    state starts now, + 1 where it has a gradient), else it holds the count after this step's
    increment, which the caller has made. ``hp``: ``lr`` (a float or a
    one-element float32/float64 tensor; a float32 one's float32 arithmetic is reproduced), ``betas``
    (floats), ``eps``, ``weight_decay``, ``amsgrad``, ``maximize`` and ``decoupled_weight_decay`` (AdamW).
    fp32 takes torch's square root with ``torch_sqrt`` (bit for bit torch's for-loop), else the
    correctly rounded one (fp64 always torch's, fp16/bf16 always the correctly rounded one).
    Runs on ``threads`` (default ``torch.get_num_threads()``) OpenMP threads. Returns how many
    slots were initialised (``grads.initialized`` set to 2 there)."""
    if params.dtype not in C_SEGMENT_FUNCTIONS or params.device.type != "cpu":
        raise RuntimeError(f"the C Adam kernel cannot serve {params.dtype} on {params.device}")
    steps = state["step"] if steps is None else steps
    if steps.dtype not in STEP_DTYPES or steps.numel() != grads.slots or not steps.is_contiguous():
        raise ValueError("steps must be a contiguous float32 or float64 tensor with one value per slot")
    amsgrad = bool(hp.get("amsgrad", False))
    lr, (beta1, beta2) = hp["lr"], hp["betas"]
    if isinstance(lr, torch.Tensor) and lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the C Adam kernel takes lr as a float or a float32/float64 tensor, not {lr.dtype}")
    if isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor):
        raise ValueError("the C Adam kernel takes betas as floats (torch computes tensor betas otherwise)")
    # A float32 tensor lr: torch computes lr / bc1 and 1 - lr * wd in float32 (float64: as Python does).
    lr_single = isinstance(lr, torch.Tensor) and lr.dtype == torch.float32
    started = getattr(library.cdll, C_SEGMENT_FUNCTIONS[params.dtype])(
        params.data_ptr(),
        state["exp_avg"].data_ptr(),
        state["exp_avg_sq"].data_ptr(),
        state["max_exp_avg_sq"].data_ptr() if amsgrad else None,
        steps.data_ptr(),
        int(steps.dtype == torch.float64),
        int(count_steps),
        *grads.c_arguments(),
        as_float(lr),
        float(beta1),
        float(beta2),
        float(hp["eps"]),
        float(hp["weight_decay"]),
        int(bool(hp.get("decoupled_weight_decay", False))),
        int(bool(hp.get("maximize", False))),
        int(lr_single),
        int(torch_sqrt),
        torch.get_num_threads() if threads is None else int(threads),
    )
    if started < 0:
        raise MemoryError("the C Adam kernel could not allocate its slot table")
    return int(started)
