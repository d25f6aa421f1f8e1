r"""Norms and scaling of a bucket's flat gradient, for ``clip_grad_norm_fused_``.

On the CPU, fp32/bf16/fp16 buckets go through the C kernels of ``csrc/grad_norm.c``
(compiled on first use by :mod:`fused_core.native`): one pass for the norm, one for the
scaling, on torch's intra-op threads, with the sum of squares accumulated in fp64:

.. math:: \lVert g \rVert_2 = \sqrt{\textstyle\sum_i g_i^2}, \qquad
          \lVert g \rVert_\infty = \max_i |g_i| \;(\text{NaN if any } g_i \text{ is NaN}), \qquad
          g_i \leftarrow \operatorname{round}(g_i \cdot c)

Where the gradients are not in the flat buffer (torch's default loop, where autograd hands over
a tensor per parameter), :func:`segments_norm` and :func:`segments_scale_` do the same over the
gradients where they lie, given their addresses (:mod:`fused_core.gradients`).

Elsewhere (CUDA, NPU, fp64, other norm orders, or where the kernels are unavailable) torch
ops do it: the infinity norm from one ``aminmax`` pass, other orders from chunk norms
(``FlatBucket.grad_chunks``), and ``mul_`` by the coefficient as a tensor (no device sync).
Norms come back in :func:`norm_dtype`, fp32 or wider.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any

import torch

from .flat import FlatBucket
from .kernels import same_bits
from .native import INCLUDE_DIR, NativeLibrary, Signature, load_library

SOURCE = INCLUDE_DIR / "grad_norm.c"
_SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_REDUCE: Signature = (ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int])
_SCALE: Signature = (None, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int])
_SEGMENTS_REDUCE: Signature = (ctypes.c_double, [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int])
_SEGMENTS_SCALE: Signature = (ctypes.c_int, [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_float, ctypes.c_int])


@functools.cache
def library() -> NativeLibrary | None:
    """The compiled ``csrc/grad_norm.c``, or None (``native.unavailable_reason(SOURCE)`` says why).

    Looked up once per process: every clip calls this."""
    signatures: dict[str, Signature] = {}
    for suffix in _SUFFIXES.values():
        signatures.update({f"grad_sumsq_{suffix}": _REDUCE, f"grad_maxabs_{suffix}": _REDUCE})
        signatures[f"grad_scale_{suffix}"] = _SCALE
        signatures.update(
            {f"grad_sumsq_segments_{suffix}": _SEGMENTS_REDUCE, f"grad_maxabs_segments_{suffix}": _SEGMENTS_REDUCE}
        )
        signatures[f"grad_scale_segments_{suffix}"] = _SEGMENTS_SCALE
    return load_library(SOURCE, signatures, check=kernels_agree_with_torch)


PROBE_NUMEL = 2 * 65536 + 11
"""Elements of the load-time probe: more than one of the kernels' 65,536-element pieces, odd length."""
NO_FLOAT64 = ("npu", "mps")
"""Device types whose kernels have no fp64: the torch path accumulates chunk norms in fp32 there."""
SUMSQ_TOLERANCE = 1e-5
"""Relative error allowed in a sum of squares: fp32 partial sums of 256 elements, added in fp64."""


def kernels_agree_with_torch(library: NativeLibrary) -> bool:
    """Whether every kernel of ``library`` computes what torch ops do, for each dtype, on a probe.

    ``fused_core.native`` runs this on every load of ``csrc/grad_norm.c`` and rejects a build that
    fails it (a miscompiled or foreign library). Max-abs (NaN included) and scaling must give
    torch's bits; the sum of squares, whose order of additions is the kernel's own, must agree to
    :data:`SUMSQ_TOLERANCE`. The segment kernels run over two segments with a gap between them.
    """
    generator = torch.Generator().manual_seed(0)
    threads, factor, half = torch.get_num_threads(), 0.3, PROBE_NUMEL // 2
    for dtype, suffix in _SUFFIXES.items():

        def kernel(name: str, suffix: str = suffix) -> Any:
            return getattr(library.cdll, f"grad_{name}_{suffix}")

        flat = (torch.randn(PROBE_NUMEL, generator=generator, dtype=torch.float64) * 3).to(dtype)
        parts = [flat[:half].clone(), flat[half:].clone()]
        segments = (  # addresses (the middle one a gap), numels, has a gradient
            torch.tensor([parts[0].data_ptr(), 0, parts[1].data_ptr()]),
            torch.tensor([half, 5, PROBE_NUMEL - half]),
            torch.tensor([1, 0, 1], dtype=torch.int8),
        )
        table = (*(t.data_ptr() for t in segments), len(parts) + 1)
        with_nan = flat.clone()
        with_nan[-3] = math.nan
        sumsq, maxabs = float(flat.double().square().sum()), float(flat.abs().max())
        sums = (kernel("sumsq")(flat.data_ptr(), PROBE_NUMEL, threads), kernel("sumsq_segments")(*table, threads))
        maxima = (kernel("maxabs")(flat.data_ptr(), PROBE_NUMEL, threads), kernel("maxabs_segments")(*table, threads))
        nan_max = kernel("maxabs")(with_nan.data_ptr(), PROBE_NUMEL, threads)
        scaled = (flat.float() * torch.tensor(factor, dtype=torch.float32)).to(dtype)
        kernel("scale")(flat.data_ptr(), PROBE_NUMEL, factor, threads)
        kernel("scale_segments")(*table, factor, threads)
        if (
            any(abs(value - sumsq) > SUMSQ_TOLERANCE * sumsq for value in sums)
            or any(value != maxabs for value in maxima)
            or not math.isnan(nan_max)
            or not same_bits(flat, scaled)
            or not same_bits(torch.cat(parts), scaled)
        ):
            return False
    return True


def serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether gradients on ``device`` with ``dtype`` go through the C kernels (2-norm, inf-norm, scaling)."""
    return device.type == "cpu" and dtype in _SUFFIXES and library() is not None


def _native(flat: torch.Tensor) -> NativeLibrary | None:
    return library() if flat.is_contiguous() and serves(flat.device, flat.dtype) else None


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms of ``dtype`` gradients are computed and returned in: fp32, or fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def bucket_norm(bucket: FlatBucket, norm_type: float) -> torch.Tensor:
    """The ``norm_type`` norm of a bucket's flat gradient, a 0-d tensor of :func:`norm_dtype`."""
    grads = bucket.grads
    dtype = norm_dtype(grads.dtype)
    if grads.numel() == 0:
        return grads.new_zeros((), dtype=dtype)
    native = _native(grads) if norm_type in (2.0, math.inf) else None
    if native is not None:
        suffix, threads = _SUFFIXES[grads.dtype], torch.get_num_threads()
        if norm_type == math.inf:
            value = getattr(native.cdll, f"grad_maxabs_{suffix}")(grads.data_ptr(), grads.numel(), threads)
        else:
            value = math.sqrt(getattr(native.cdll, f"grad_sumsq_{suffix}")(grads.data_ptr(), grads.numel(), threads))
        return torch.tensor(value, dtype=dtype)
    if norm_type == math.inf:
        return torch.stack(torch.aminmax(grads)).abs().max().to(dtype)
    # Chunk norms accumulated in fp64 where the device has it (fp32 on NPU and MPS), as the C kernels
    # add their partial sums: in the gradients' own dtype fp16/bf16 chunk norms would be rounded to
    # 8 or 11 bits (up to 0.4 % off) and fp32 ones drift by ~1e-5 over millions of elements, where
    # Lamb divides every gradient by the total.
    wide = torch.float32 if grads.device.type in NO_FLOAT64 else torch.promote_types(dtype, torch.float64)
    chunk_norms = torch._foreach_norm(bucket.grad_chunks, norm_type, dtype=wide)
    return torch.linalg.vector_norm(torch.stack(chunk_norms), norm_type).to(dtype)


def scale_(flat: torch.Tensor, coefficient: torch.Tensor) -> None:
    """``flat *= coefficient`` (a 0-d tensor); the C kernel skips the pass when ``coefficient`` is 1."""
    native = _native(flat)
    if native is None:
        flat.mul_(coefficient.to(flat.device))
        return
    factor = float(coefficient)
    if factor != 1.0:
        getattr(native.cdll, f"grad_scale_{_SUFFIXES[flat.dtype]}")(
            flat.data_ptr(), flat.numel(), factor, torch.get_num_threads()
        )


def segments_serve(device: torch.device, dtype: torch.dtype, norm_type: float) -> bool:
    """Whether :func:`segments_norm` serves gradients on ``device`` with ``dtype`` for ``norm_type``."""
    return norm_type in (2.0, math.inf) and serves(device, dtype)


def segments_norm(
    ptrs: torch.Tensor, numels: torch.Tensor, has_grad: torch.Tensor, dtype: torch.dtype, norm_type: float
) -> torch.Tensor:
    """The ``norm_type`` (2 or inf) norm of the gradients at ``ptrs`` (``numels`` elements each,
    those with ``has_grad``), a 0-d tensor of :func:`norm_dtype`."""
    native = library()
    assert native is not None and segments_serve(torch.device("cpu"), dtype, norm_type)
    kind = "maxabs" if norm_type == math.inf else "sumsq"
    function = getattr(native.cdll, f"grad_{kind}_segments_{_SUFFIXES[dtype]}")
    value = function(ptrs.data_ptr(), numels.data_ptr(), has_grad.data_ptr(), ptrs.numel(), torch.get_num_threads())
    if value < 0:
        raise MemoryError("the gradient-norm kernel could not allocate its piece table")
    return torch.tensor(value if norm_type == math.inf else math.sqrt(value), dtype=norm_dtype(dtype))


def segments_scale_(
    ptrs: torch.Tensor, numels: torch.Tensor, has_grad: torch.Tensor, dtype: torch.dtype, coefficient: torch.Tensor
) -> None:
    """Multiply the gradients at ``ptrs`` by ``coefficient`` (a 0-d tensor), rounded once; skipped when it is 1."""
    native = library()
    assert native is not None and serves(torch.device("cpu"), dtype)
    factor = float(coefficient)
    if factor == 1.0:
        return
    function = getattr(native.cdll, f"grad_scale_segments_{_SUFFIXES[dtype]}")
    if function(ptrs.data_ptr(), numels.data_ptr(), has_grad.data_ptr(), ptrs.numel(), factor, torch.get_num_threads()):
        raise MemoryError("the gradient-scaling kernel could not allocate its piece table")
