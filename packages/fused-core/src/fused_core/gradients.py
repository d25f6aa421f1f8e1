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

Setting them all to None (``zero_grad()``) costs little more than that walk: the dropped
gradients are destroyed (their TensorImpl, storage and memory freed: ~0.2-0.4 µs each, most of a
``zero_grad()`` of many small tensors) on a background thread of the library, the *deferred
release*, wherever that provably needs no Python: a plain CPU tensor made by torch's CPU allocator,
without a Python object (as autograd's gradients are, until Python code reads ``p.grad``),
referenced by nothing else. The others (a gradient assigned from Python or read from it, one a
caller still holds, one from numpy) are dropped in the call, as ``p.grad = None`` drops them. At
most :data:`RELEASE_CAP_BYTES` wait for that thread at any moment, and only gradients of at most
:data:`RELEASE_MAX_TENSOR_BYTES`; beyond, they are destroyed in the call. Nothing else changes:
``p.grad`` is None when the call returns, and a gradient someone still references stays as it was.

Where the library is unavailable (no C++ compiler, torch without headers,
``FUSED_OPTIM_DISABLE_NATIVE``), :func:`library` is None and the layout reads ``.grad`` from Python.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .native import NativeLibrary, Signature, load_library

SOURCE = Path(__file__).with_name("csrc") / "grads.cpp"
NO_GRAD, IN_PLACE, NEEDS_COPY, MISMATCH, MOVED = range(5)
"""The per-slot status codes of ``fused_read_grads`` (see ``csrc/grads.cpp``)."""

RELEASE_CAP_ENV = "FUSED_OPTIM_RELEASE_CAP_MIB"
"""MiB of dropped gradients that may wait for the background thread (default 64; 0: none)."""


def _release_cap() -> int:
    value = os.environ.get(RELEASE_CAP_ENV, "").strip()
    if not value:
        return 64 << 20
    try:
        mib = int(value)
        if mib < 0:
            raise ValueError(value)
    except ValueError:
        warnings.warn(f"{RELEASE_CAP_ENV}={value!r} is not a number of MiB >= 0; using 64", stacklevel=2)
        return 64 << 20
    return mib << 20


RELEASE_CAP_BYTES = _release_cap()
"""The most bytes of dropped gradients (their data, plus ~340 per tensor for its TensorImpl and
storage) waiting for the background thread at any moment: 64 MiB, or ``$FUSED_OPTIM_RELEASE_CAP_MIB``
MiB (0: every gradient is destroyed in the call)."""
RELEASE_MAX_TENSOR_BYTES = 1 << 20
"""A dropped gradient with more data than this (1 MiB) is destroyed in the call."""
FLAG_SETS = (("-O2", "-std=c++17", "-fopenmp", "-w"), ("-O2", "-std=c++17", "-w"))
_SIGNATURES: dict[str, Signature] = {
    "fused_read_grads": (
        ctypes.c_int64,
        [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int],
    ),
    "fused_clear_grads": (ctypes.c_int64, [ctypes.c_void_p] + [ctypes.c_int64] * 3),
    "fused_lend_grads": (ctypes.c_int64, [ctypes.c_void_p] * 2 + [ctypes.c_int64]),
    "fused_release_pending": (None, [ctypes.c_void_p]),
    "fused_release_wait": (ctypes.c_int64, []),
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
    """Whether ``lib`` reads and clears ``.grad`` as torch sees it, on six probe parameters.

    Run by ``fused_core.native`` on every load: a build against other headers than the torch in
    this process would read the wrong fields. The probe has a gradient in place, none, one with
    other strides (NEEDS_COPY) and a parameter that moved, all four assigned from Python: clearing
    must leave every ``.grad`` None and hand none of them (they have Python objects) to the
    background thread. Then two gradients made by autograd, one of them still held: clearing hands
    at most the other to the thread, and the held one keeps its values.
    """
    with torch.inference_mode(False), torch.enable_grad():
        params = [torch.zeros(3, 4, requires_grad=True) for _ in range(4)]
        made = [torch.zeros(3, 4, requires_grad=True) for _ in range(2)]
        torch.autograd.backward(made, [torch.full((3, 4), 2.0), torch.full((3, 4), 3.0)])
    params[0].grad = torch.ones(3, 4)
    params[2].grad = torch.ones(4, 3).t()
    params[3].grad = torch.ones(3, 4)
    ptrs, grad_ptr = [p.data_ptr() for p in params], params[0].grad.data_ptr()
    table = GradTable(lib, params, [*ptrs[:3], ptrs[3] + 4])
    held = made[1].grad
    try:
        problems = table.read()
        handed_python = table.clear()
        handed_made = GradTable(lib, made, [p.data_ptr() for p in made]).clear()
        lib.cdll.fused_release_wait()
    except RuntimeError:
        return False
    expected = [IN_PLACE, NO_GRAD, NEEDS_COPY, MOVED]
    return (
        problems == 2
        and table.status.tolist() == expected
        and table.ptrs.tolist() == [grad_ptr, 0, 0, 0]
        and all(p.grad is None for p in params + made)
        and handed_python == 0
        and handed_made in (0, 1)
        and held is not None
        and torch.equal(held, torch.full((3, 4), 3.0))
    )


def release_pending(lib: NativeLibrary | None = None) -> tuple[int, int, int]:
    """``(gradients, bytes, handed)``: the dropped gradients and bytes waiting for the background
    thread now, and how many gradients it was handed in this process (zeros without the library)."""
    lib = lib if lib is not None else library()
    if lib is None:
        return (0, 0, 0)
    out = (ctypes.c_int64 * 3)()
    lib.cdll.fused_release_pending(out)
    return (out[0], out[1], out[2])


def wait_for_release(lib: NativeLibrary | None = None) -> int:
    """Returns once the background thread has destroyed every gradient handed to it (how many were
    waiting): their memory is then back with the allocator. Never needed for correctness."""
    lib = lib if lib is not None else library()
    return 0 if lib is None else int(lib.cdll.fused_release_wait())


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

    def clear(self) -> int:
        """``p.grad = None`` for every parameter of the table; returns how many of the dropped
        gradients went to the background thread to be destroyed (see :data:`RELEASE_CAP_BYTES`)."""
        handed = self._clear(self.impls.data_ptr(), len(self.params), RELEASE_CAP_BYTES, RELEASE_MAX_TENSOR_BYTES)
        if handed < 0:
            raise RuntimeError("fused_core's gradient reader failed; set FUSED_OPTIM_DISABLE_NATIVE=1 and report this")
        return int(handed)


class GradLender:
    """Sets the ``.grad`` of some tensors for a while, in one C++ call, and takes them back in another
    (:mod:`fused_core.sharded` lends DTensor parameters' local shards their gradients' local shards
    for one launch): 1,000 Python ``t.grad = g`` and ``t.grad = None`` cost about 1.5 ms."""

    def __init__(self, lib: NativeLibrary, tensors: Sequence[torch.Tensor]) -> None:
        self._lend = lib.cdll.fused_lend_grads
        self._clear = lib.cdll.fused_clear_grads
        self.tensors = list(tensors)  # kept alive: the C++ calls take their TensorImpl addresses
        self.impls = torch.tensor([tensor._cdata for tensor in self.tensors], dtype=torch.int64)

    def lend(self, grads: Sequence[torch.Tensor | None]) -> None:
        """``tensors[i].grad = grads[i]`` for every i (unchecked: the layout's reader checks them)."""
        impls = torch.tensor([0 if grad is None else grad._cdata for grad in grads], dtype=torch.int64)
        if self._lend(self.impls.data_ptr(), impls.data_ptr(), len(self.tensors)) < 0:
            raise RuntimeError("fused_core's gradient reader failed; set FUSED_OPTIM_DISABLE_NATIVE=1 and report this")

    def take_back(self) -> None:
        """``tensors[i].grad = None`` for every i (the gradients stay with their owners)."""
        if self._clear(self.impls.data_ptr(), len(self.tensors), 0, 0) < 0:
            raise RuntimeError("fused_core's gradient reader failed; set FUSED_OPTIM_DISABLE_NATIVE=1 and report this")
