"""ctypes glue for ``csrc/rmsprop.c``: RMSprop, RMSpropTF and Adadelta over the slots of a flat CPU
buffer in one pass.

The kernels compute torch 2.13's ``torch.optim.RMSprop/Adadelta(foreach=False)`` steps and
:func:`fused_rmsprop.reference.rmsprop_tf_update` bit for bit in fp32 and fp64 (fp16/bf16: the fp32
arithmetic with the correctly rounded square root, rounded once per step); the C file's top comment
gives the math and where it rounds.
This module only builds, loads and calls them:

* ``C_SOURCE``, ``C_FUNCTIONS`` (kernel -> dtype -> exported symbol) and their signatures;
* :func:`load` compiles the source through :func:`fused_core.native.load_library` (with the
  caller's self-check);
* :func:`call_rmsprop` and :func:`call_adadelta` run one step over a run of slots
  (:class:`fused_core.kernels.GradSegments`). Neither touches the step counts (the caller's).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fused_core.kernels import DTYPE_SUFFIXES, GradSegments, as_float, dtype_symbols
from fused_core.native import NativeLibrary, SelfCheck, load_library

C_SOURCE = Path(__file__).with_name("csrc") / "rmsprop.c"
C_FUNCTIONS = {kernel: dtype_symbols(f"{kernel}_segments") for kernel in ("rmsprop", "adadelta")}
"""The exported function of each kernel (``rmsprop`` serves RMSpropTF too) and dtype."""
SLOT_TABLE = [ctypes.c_void_p] * 5 + [ctypes.c_int64]
"""grad_ptrs, has_grad, offsets, numels, initialized; slots."""
RMSPROP_SIGNATURE = (
    ctypes.c_int64,
    # param, square_avg, grad_avg, momentum_buffer; the slot table; lr, alpha, eps, weight_decay,
    # momentum; tf, decoupled, lr_in_momentum, maximize, threads
    [ctypes.c_void_p] * 4 + SLOT_TABLE + [ctypes.c_double] * 5 + [ctypes.c_int] * 5,
)
ADADELTA_SIGNATURE = (
    ctypes.c_int64,
    # param, square_avg, acc_delta; the slot table; lr, rho, eps, weight_decay; maximize, threads
    [ctypes.c_void_p] * 3 + SLOT_TABLE + [ctypes.c_double] * 4 + [ctypes.c_int] * 2,
)
C_EXTRA = ("-fno-math-errno", "-lm", "-ldl")
"""After the flags of every build: ``-fno-math-errno`` lets fp16/bf16's ``sqrtf`` loop vectorise (the
same bits), ``-ldl`` is for ``dlopen``/``dlsym``, which find MKL's square roots in the loaded torch."""


def load(check: SelfCheck | None = None) -> NativeLibrary | None:
    """The compiled ``csrc/rmsprop.c`` (every function typed), or None where it cannot be had
    (``fused_core.native.unavailable_reason(C_SOURCE)`` says why). ``check`` (a module-level function
    of the library) must pass or the build is rejected. Cached per process by
    :func:`fused_core.native.load_library`; a launcher still keeps the result."""
    signatures = {name: RMSPROP_SIGNATURE for name in C_FUNCTIONS["rmsprop"].values()}
    signatures.update({name: ADADELTA_SIGNATURE for name in C_FUNCTIONS["adadelta"].values()})
    return load_library(C_SOURCE, signatures, extra=C_EXTRA, check=check)


def _function(library: NativeLibrary, kernel: str, params: torch.Tensor, hp: Mapping[str, Any]) -> Any:
    if params.dtype not in DTYPE_SUFFIXES or params.device.type != "cpu" or not params.is_contiguous():
        raise RuntimeError(f"the C {kernel} kernel cannot serve {params.dtype} on {params.device}")
    lr = hp["lr"]
    if isinstance(lr, torch.Tensor) and lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the C {kernel} kernel takes lr as a float or a float32/float64 tensor, not {lr.dtype}")
    return getattr(library.cdll, C_FUNCTIONS[kernel][params.dtype])


def _checked(started: int, kernel: str) -> int:
    if started < 0:
        raise MemoryError(f"the C {kernel} kernel could not allocate its slot table")
    return int(started)


def call_rmsprop(
    library: NativeLibrary,
    params: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    grads: GradSegments,
    hp: Mapping[str, Any],
    *,
    tf: bool,
    threads: int | None = None,
) -> int:
    """One RMSprop (``tf=False``) or RMSpropTF (``tf=True``) step over the slots of ``grads`` on the
    contiguous CPU slice ``params``. ``state`` holds ``square_avg``, ``momentum_buffer`` (used when
    ``hp["momentum"] > 0``) and ``grad_avg`` (when ``hp["centered"]``), slices like ``params``.
    ``hp``: a param group of :class:`~fused_rmsprop.FusedRMSprop` or
    :class:`~fused_rmsprop.FusedRMSpropTF` (``lr`` a float or a one-element float32/float64 tensor).
    Runs on ``threads`` (default ``torch.get_num_threads()``) OpenMP threads. Returns how many slots
    were initialised (``grads.initialized`` set to 2 there)."""
    function = _function(library, "rmsprop", params, hp)
    momentum = float(hp["momentum"])
    started = function(
        params.data_ptr(),
        state["square_avg"].data_ptr(),
        state["grad_avg"].data_ptr() if hp["centered"] else None,
        state["momentum_buffer"].data_ptr() if momentum > 0 else None,
        *grads.c_arguments(),
        as_float(hp["lr"]),
        float(hp["alpha"]),
        float(hp["eps"]),
        float(hp["weight_decay"]),
        momentum,
        int(tf),
        int(bool(hp.get("decoupled_decay", False))),
        int(bool(hp.get("lr_in_momentum", False))),
        int(bool(hp.get("maximize", False))),
        torch.get_num_threads() if threads is None else int(threads),
    )
    return _checked(started, "rmsprop")


def call_adadelta(
    library: NativeLibrary,
    params: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    grads: GradSegments,
    hp: Mapping[str, Any],
    *,
    threads: int | None = None,
) -> int:
    """One Adadelta step over the slots of ``grads`` on the contiguous CPU slice ``params``; ``state``
    holds ``square_avg`` and ``acc_delta``, slices like ``params``; ``hp`` a param group of
    :class:`~fused_rmsprop.FusedAdadelta`. Otherwise as :func:`call_rmsprop`."""
    function = _function(library, "adadelta", params, hp)
    started = function(
        params.data_ptr(),
        state["square_avg"].data_ptr(),
        state["acc_delta"].data_ptr(),
        *grads.c_arguments(),
        as_float(hp["lr"]),
        float(hp["rho"]),
        float(hp["eps"]),
        float(hp["weight_decay"]),
        int(bool(hp.get("maximize", False))),
        torch.get_num_threads() if threads is None else int(threads),
    )
    return _checked(started, "adadelta")
