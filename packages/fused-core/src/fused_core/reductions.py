r"""Per-parameter reductions over a flat buffer: one value per slot, every slot in one pass.

Layer-wise optimizers (Lamb's trust ratio, AdamP's projection, BertAdam's per-parameter gradient
clipping) need, for every parameter of a run, a norm or a dot product over that parameter's
elements alone. With a launcher's :class:`~fused_core.kernels.RunInfo`, slot :math:`s` lies at
elements ``[offsets[s], offsets[s] + numels[s])`` of the run's slices, and

.. math:: \operatorname{sumsq}(x)_s = \sum_{i \in s} x_i^2, \qquad
          \operatorname{dot}(x, y)_s = \sum_{i \in s} x_i\, y_i

are computed here for all slots at once, never by a Python loop over parameters:

* on the CPU (fp32, fp64, bf16, fp16) by the C kernels of ``csrc/segment_reduce.c``: products and
  sums in fp64, every slot cut into pieces shared out over torch's intra-op threads, the result
  independent of the thread count;
* elsewhere (CUDA, NPU) by one ``index_add_`` over a slot index per element, accumulating in fp64
  where the device has it (fp32 on NPU and MPS).

Elements between slots (alignment gaps) are not counted. Results come back as a 1-D tensor of
one value per slot on ``x``'s device, in :func:`result_dtype` (fp32, fp64 for fp64 input);
``segment_norms`` is the square root of ``segment_sumsq``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .native import INCLUDE_DIR, NativeLibrary, Signature, load_library

__all__ = ["result_dtype", "segment_dot", "segment_norms", "segment_sumsq"]

SOURCE = INCLUDE_DIR / "segment_reduce.c"
_SUFFIXES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "fp16"}
_SUMSQ: Signature = (ctypes.c_int, [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
_DOT: Signature = (ctypes.c_int, [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
NO_FLOAT64 = ("npu", "mps")
"""Device types whose kernels have no fp64: the torch path accumulates in fp32 there."""
PROBE_TOLERANCE = 1e-12
"""Relative error allowed at the load-time probe against torch's fp64 sums (the order of additions differs)."""


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-slot results for ``dtype`` input: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sumsq(x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """``out[s] = sum(x[offsets[s] : offsets[s] + numels[s]] ** 2)`` for every slot ``s``."""
    return _reduce(x, None, offsets, numels)


def segment_dot(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """``out[s] = sum(x[a:b] * y[a:b])`` over each slot ``s``'s elements ``a = offsets[s]``, ``b = a + numels[s]``;
    ``x`` and ``y`` have the same dtype, device and length."""
    if y.dtype != x.dtype or y.device != x.device or y.shape != x.shape:
        raise ValueError(
            f"segment_dot needs two slices alike, got {tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}"
        )
    return _reduce(x, y, offsets, numels)


def segment_norms(x: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """The 2-norm of every slot's elements: ``sqrt(segment_sumsq(x, offsets, numels))``."""
    return segment_sumsq(x, offsets, numels).sqrt_()


def _reduce(x: torch.Tensor, y: torch.Tensor | None, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    if x.dim() != 1 or not x.is_contiguous() or (y is not None and not y.is_contiguous()):
        raise ValueError("segment reductions take contiguous 1-D slices (a launcher's params, grads or state)")
    offsets = offsets.to(device="cpu", dtype=torch.int64).contiguous()
    numels = numels.to(device="cpu", dtype=torch.int64).contiguous()
    if offsets.shape != numels.shape or offsets.dim() != 1:
        raise ValueError("offsets and numels must be 1-D and of one length, one entry per slot")
    if offsets.numel() and (int(offsets.min()) < 0 or int((offsets + numels).max()) > x.numel()):
        raise ValueError(f"a slot lies outside the slice of {x.numel()} elements")
    native = _native(x)
    if native is None:
        return _reduce_with_torch(x, y, offsets, numels)
    out = torch.empty(offsets.numel(), dtype=torch.float64)
    suffix, threads = _SUFFIXES[x.dtype], torch.get_num_threads()
    table = (offsets.data_ptr(), numels.data_ptr(), offsets.numel(), out.data_ptr(), threads)
    if y is None:
        failed = getattr(native.cdll, f"segment_sumsq_{suffix}")(x.data_ptr(), *table)
    else:
        failed = getattr(native.cdll, f"segment_dot_{suffix}")(x.data_ptr(), y.data_ptr(), *table)
    if failed:
        raise MemoryError("the segment-reduction kernel could not allocate its piece table")
    return out.to(result_dtype(x.dtype))


def _reduce_with_torch(
    x: torch.Tensor, y: torch.Tensor | None, offsets: torch.Tensor, numels: torch.Tensor
) -> torch.Tensor:
    """One ``index_add_`` of the products into their slots (gap elements into a spare last slot)."""
    slots, dtype = offsets.numel(), result_dtype(x.dtype)
    wide_dtype = dtype if x.device.type in NO_FLOAT64 else torch.float64
    ids = torch.full((x.numel(),), slots, dtype=torch.int64)
    starts = torch.repeat_interleave(offsets, numels)
    first_of_slot = torch.cumsum(numels, 0) - numels
    within = torch.arange(int(numels.sum())) - torch.repeat_interleave(first_of_slot, numels)
    ids[starts + within] = torch.repeat_interleave(torch.arange(slots), numels)
    wide = x.to(wide_dtype)
    products = wide * wide if y is None else wide * y.to(wide_dtype)
    out = torch.zeros(slots + 1, dtype=wide_dtype, device=x.device)
    return out.index_add_(0, ids.to(x.device), products)[:slots].to(dtype)


@functools.cache
def library() -> NativeLibrary | None:
    """The compiled ``csrc/segment_reduce.c``, or None (``native.unavailable_reason(SOURCE)`` says why)."""
    signatures: dict[str, Signature] = {}
    for suffix in _SUFFIXES.values():
        signatures[f"segment_sumsq_{suffix}"] = _SUMSQ
        signatures[f"segment_dot_{suffix}"] = _DOT
    return load_library(SOURCE, signatures, check=kernels_agree_with_torch)


def _native(x: torch.Tensor) -> NativeLibrary | None:
    return library() if x.device.type == "cpu" and x.dtype in _SUFFIXES else None


def kernels_agree_with_torch(native: NativeLibrary) -> bool:
    """Whether every kernel of ``native`` gives torch's fp64 per-slot sums (to :data:`PROBE_TOLERANCE`)
    on a probe with a slot of several pieces, small slots, an empty slot and gaps between slots;
    ``fused_core.native`` runs this on every load and rejects a build that fails it."""
    generator = torch.Generator().manual_seed(0)
    numels = torch.tensor([3, 0, 100_003, 7, 1, 70_000], dtype=torch.int64)
    offsets = torch.cumsum(numels + 5, 0) - numels  # five elements of gap before each slot
    length = int(offsets[-1] + numels[-1]) + 2
    out = torch.empty(numels.numel(), dtype=torch.float64)
    table = (offsets.data_ptr(), numels.data_ptr(), numels.numel(), out.data_ptr(), torch.get_num_threads())
    for dtype, suffix in _SUFFIXES.items():
        x, y = (torch.randn(length, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2))
        for name, args, other in (("sumsq", (x.data_ptr(),), x), ("dot", (x.data_ptr(), y.data_ptr()), y)):
            if getattr(native.cdll, f"segment_{name}_{suffix}")(*args, *table):
                return False
            products = x.double() * other.double()
            for slot, (start, count) in enumerate(zip(offsets.tolist(), numels.tolist())):
                expected = float(products[start : start + count].sum())
                if abs(float(out[slot]) - expected) > PROBE_TOLERANCE * max(abs(expected), 1.0) * 10:
                    return False
    return True
