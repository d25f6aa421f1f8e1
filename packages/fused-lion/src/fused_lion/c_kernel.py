"""ctypes glue for ``csrc/lion.c``: Lion over the slots of a flat CPU buffer in one pass.

The kernel computes :class:`fused_lion.reference.Lion`'s step bit for bit in fp32 and fp64
(fp16/bf16: the fp32 arithmetic, rounded once per step); the C file's top comment gives the math
and where it rounds. This module only builds, loads and calls it:

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

from fused_core.kernels import GradSegments, as_float, as_scalar, dtype_symbols
from fused_core.native import NativeLibrary, SelfCheck, load_library

C_SOURCE = Path(__file__).with_name("csrc") / "lion.c"
C_SEGMENT_FUNCTIONS = dtype_symbols("lion_segments")
C_SIGNATURE = (
    ctypes.c_int64,
    # param, exp_avg, grad_ptrs, has_grad, offsets, numels, initialized
    [ctypes.c_void_p] * 7
    # slots; -lr, decay, beta1, beta2; has_decay, maximize, threads
    + [ctypes.c_int64]
    + [ctypes.c_double] * 4
    + [ctypes.c_int] * 3,
)


def load(check: SelfCheck | None = None) -> NativeLibrary | None:
    """The compiled ``csrc/lion.c`` (every dtype's function typed), or None where it cannot be had
    (``fused_core.native.unavailable_reason(C_SOURCE)`` says why). ``check`` (a module-level
    function of the library) must pass or the build is rejected. Cached per process by
    :func:`fused_core.native.load_library`; a launcher still keeps the result."""
    signatures = {name: C_SIGNATURE for name in C_SEGMENT_FUNCTIONS.values()}
    return load_library(C_SOURCE, signatures, extra=("-lm",), check=check)


def call(
    library: NativeLibrary,
    params: torch.Tensor,
    exp_avg: torch.Tensor,
    grads: GradSegments,
    hp: Mapping[str, Any],
    threads: int | None = None,
) -> int:
    """One Lion step over the slots of ``grads`` on the contiguous CPU slice ``params`` and its
    ``exp_avg`` (laid out alike). ``hp``: ``lr`` (a float or a one-element float32/float64 tensor),
    ``betas`` (floats), ``weight_decay``, ``maximize``. Runs on ``threads`` (default
    ``torch.get_num_threads()``) OpenMP threads. Returns how many slots were initialised
    (``grads.initialized`` set to 2 there)."""
    if params.dtype not in C_SEGMENT_FUNCTIONS or params.device.type != "cpu":
        raise RuntimeError(f"the C Lion kernel cannot serve {params.dtype} on {params.device}")
    lr, (beta1, beta2), weight_decay = hp["lr"], hp["betas"], float(hp["weight_decay"])
    if isinstance(lr, torch.Tensor) and lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the C Lion kernel takes lr as a float or a float32/float64 tensor, not {lr.dtype}")
    if isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor):
        raise ValueError("the C Lion kernel takes betas as floats")
    # As the step computes it: in the dtype of a tensor lr (float32: float32 arithmetic), else in double.
    decay = as_float(1 - as_scalar(lr) * weight_decay)
    started = getattr(library.cdll, C_SEGMENT_FUNCTIONS[params.dtype])(
        params.data_ptr(),
        exp_avg.data_ptr(),
        *grads.c_arguments(),
        -as_float(lr),
        decay,
        float(beta1),
        float(beta2),
        int(weight_decay != 0),
        int(bool(hp.get("maximize", False))),
        torch.get_num_threads() if threads is None else int(threads),
    )
    if started < 0:
        raise MemoryError("the C Lion kernel could not allocate its slot table")
    return int(started)
