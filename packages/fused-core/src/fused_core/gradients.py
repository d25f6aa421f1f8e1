"""Reading every parameter's ``.grad`` where it lies, and setting them all to None, in one call.

In torch's default loop (``zero_grad()`` with ``set_to_none=True``, then ``backward()``) autograd
hands over a fresh gradient tensor for every parameter at every step. Asking each parameter for
its ``.grad`` from Python costs about 0.2-0.4 µs (several ms for 20,000 parameters), more than the
whole update of such a model. So on the CPU, a small C++ library (``csrc/grads.cpp``, compiled on
first use against the installed torch's headers, see :mod:`fused_core.native`) walks the
parameters' ``TensorImpl`` s instead: for each it writes the gradient's address, or a status saying
there is none, that it needs a copy (other strides than the parameter's), that it does not match
the parameter, or that the parameter itself moved. :class:`GradTable` holds those arrays for the
slots of one bucket.

Where the library is unavailable (no C++ compiler, torch without headers,
``FUSED_OPTIM_DISABLE_NATIVE``), :func:`library` is None and the layout reads ``.grad`` from Python.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .native import NativeLibrary, Signature, load_library

SOURCE = Path(__file__).with_name("csrc") / "grads.cpp"
NO_GRAD, IN_PLACE, NEEDS_COPY, MISMATCH, MOVED = range(5)
"""The per-slot status codes of ``fused_read_grads`` (see ``csrc/grads.cpp``)."""

FLAG_SETS = (("-O2", "-std=c++17", "-fopenmp", "-w"), ("-O2", "-std=c++17", "-w"))
_SIGNATURES: dict[str, Signature] = {
    "fused_read_grads": (
        ctypes.c_int64,
        [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int],
    ),
    "fused_clear_grads": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64]),
}


def _torch_build_arguments() -> tuple[str, ...] | None:
    """Include and link arguments for the installed torch (None if it ships no headers)."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "ATen" / "core" / "Tensor.h").exists():
        return None
    abi = int(torch.compiled_with_cxx11_abi())
    return (
        f"-I{include}",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-DFUSED_OPTIM_TORCH_VERSION={torch.__version__}",  # part of the cache key: one build per torch
        f"-L{lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{lib}",
    )


@functools.cache
def library() -> NativeLibrary | None:
    """The compiled gradient reader, or None where it cannot be had (looked up once per process)."""
    arguments = _torch_build_arguments()
    if arguments is None or os.name != "posix":
        return None
    return load_library(
        SOURCE, _SIGNATURES, flag_sets=FLAG_SETS, extra=arguments, python_api=True, check=reads_like_torch
    )


def reads_like_torch(lib: NativeLibrary) -> bool:
    """Whether ``lib`` reads and clears ``.grad`` as torch sees it, on four probe parameters.

    Run by ``fused_core.native`` on every load: a build against other headers than the torch in
    this process would read the wrong fields. The probe has a gradient in place, none, one with
    other strides (NEEDS_COPY) and a parameter that moved; clearing must leave every ``.grad`` None.
    """
    params = [torch.zeros(3, 4, requires_grad=True) for _ in range(4)]
    params[0].grad = torch.ones(3, 4)
    params[2].grad = torch.ones(4, 3).t()
    params[3].grad = torch.ones(3, 4)
    ptrs, grad_ptr = [p.data_ptr() for p in params], params[0].grad.data_ptr()
    table = GradTable(lib, params, [*ptrs[:3], ptrs[3] + 4])
    try:
        problems = table.read()
        table.clear()
    except RuntimeError:
        return False
    expected = [IN_PLACE, NO_GRAD, NEEDS_COPY, MOVED]
    return (
        problems == 2
        and table.status.tolist() == expected
        and table.ptrs.tolist() == [grad_ptr, 0, 0, 0]
        and all(p.grad is None for p in params)
    )


class GradTable:
    """Per-slot arrays of one CPU bucket for the gradient reader: which parameter, where it lives,
    and (after :meth:`read`) where its gradient lies and in what state."""

    def __init__(self, lib: NativeLibrary, params: Sequence[torch.Tensor], param_ptrs: Sequence[int]) -> None:
        self._read = lib.cdll.fused_read_grads
        self._clear = lib.cdll.fused_clear_grads
        self.params = list(params)
        self.impls = torch.tensor([param._cdata for param in self.params], dtype=torch.int64)
        self.param_ptrs = torch.tensor(list(param_ptrs), dtype=torch.int64)
        self.ptrs = torch.zeros(len(self.params), dtype=torch.int64)
        self.status = torch.zeros(len(self.params), dtype=torch.int8)

    def read(self) -> int:
        """Fill ``ptrs`` and ``status``; returns how many slots are not NO_GRAD or IN_PLACE."""
        problems = self._read(
            self.impls.data_ptr(),
            self.param_ptrs.data_ptr(),
            len(self.params),
            self.ptrs.data_ptr(),
            self.status.data_ptr(),
            torch.get_num_threads(),
        )
        if problems < 0:
            raise RuntimeError("fused_core's gradient reader failed; set FUSED_OPTIM_DISABLE_NATIVE=1 and report this")
        return int(problems)

    def clear(self) -> None:
        """``p.grad = None`` for every parameter of the table."""
        if self._clear(self.impls.data_ptr(), len(self.params)) < 0:
            raise RuntimeError("fused_core's gradient reader failed; set FUSED_OPTIM_DISABLE_NATIVE=1 and report this")
