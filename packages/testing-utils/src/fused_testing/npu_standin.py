"""A stand-in for ``torch_npu`` on CPU tensors, to test fused-core's NPU backend without an NPU.

No Ascend NPU and no CANN libraries exist where fused-optim's tests run, and the real
``torch_npu`` cannot even be imported there. This module builds a ``torch_npu`` module
object that reproduces, on CPU tensors, the behaviour of the torch_npu APIs the backend
uses, as torch_npu's public source defines it. :func:`installed_standin` puts it in
``sys.modules`` for a ``with`` block::

    from fused_testing.npu_standin import installed_standin

    with installed_standin() as torch_npu:
        weight = torch_npu.npu_format_cast(torch.randn(8, 3, 3, 3), torch_npu.NC1HWC0)
        torch_npu.get_storage_size(weight)  # 1152: C padded from 3 to 16

What it reproduces:

* **Formats live on the storage.** torch_npu keeps a tensor's format in its storage's
  descriptor, so every tensor sharing a storage (``p.data``, ``p.detach()``, views) has
  the same format, and a tensor ``set_`` onto another storage takes that storage's format.
  The stand-in records the format on the ``UntypedStorage`` object the same way; a
  storage never cast is ND. Formats: ND (2), NCHW (0), and the padded private formats
  NC1HWC0 (3), FRACTAL_Z (4) and FRACTAL_NZ (29), with torch_npu's storage shapes.
* ``get_npu_format(t)``: the format id of ``t``'s storage.
* ``get_storage_size(t)``: the elements in ``t``'s storage (torch_npu: the product of the
  storage descriptor's sizes). For a padded format that is more than ``numel``; for a
  tensor ``set_`` onto a flat buffer it is the whole buffer.
* ``npu_format_cast(t, fmt)``: ``t`` itself when it already has ``fmt``; between the
  base formats (ND, NCHW) ``t``'s storage is relabelled in place and ``t`` returned; to
  or from a padded format, a new tensor (not attached to autograd) whose storage holds
  the padded size. **Element order differs from the hardware:** the stand-in keeps the
  logical (strided) order in the first ``numel`` storage elements and zeros after them,
  where the NPU stores e.g. NC1HWC0 as (N, C/16, H, W, 16). Element-wise work on flat
  buffers, which is all a fused optimizer does, cannot tell the two apart; code that
  reads a padded storage in logical order can pass here and fail on the hardware.
* ``npu_change_data_ptr(dst, src, index)``: re-points ``dst`` at ``src``'s storage plus
  ``index`` elements, keeping ``dst``'s shape, strides, storage size and format. Only
  float32, float16 and bfloat16 are accepted, as in torch_npu. The real function swaps
  the data pointer inside ``dst``'s own storage: ``dst`` does **not** share ``src``'s
  storage (``src``'s use count does not move) and does **not own** the memory it now
  points into. The stand-in does the same on the CPU: ``dst`` is ``set_`` onto a new
  storage that aliases ``src``'s memory without owning it. So a binding made this way is
  invisible to ``src``'s storage use count, and fused-core's NPU backend must watch such
  tensors itself (it does: their data pointers are per-step sentinels). Two differences:
  other tensors that shared ``dst``'s old storage (an earlier ``p.data``) are re-pointed
  with it on the NPU but not here; and where the hardware would hand freed memory to the
  next allocation, the stand-in keeps every storage it re-pointed a tensor into alive
  for as long as any re-pointed tensor lives, and :func:`dangling` says whether the
  real one would have freed it. The stand-in also rejects ``index + storage size of dst >
  storage size of src`` in elements (torch_npu's own check mixes elements and bytes).
* Only these four functions know formats: torch ops on the stand-in's tensors (``clone()``,
  ``empty_like``, arithmetic) give ND results, where on the NPU many of them keep their
  input's format.
* ``torch_npu.npu.amp.GradScaler`` and ``autocast``: torch_npu's signatures over
  ``torch.amp.GradScaler("cpu")`` and ``torch.autocast("cpu")``. torch_npu's scaler also
  reads the NPU's global overflow flag (saturation mode on Atlas training series); the
  stand-in sees only inf/NaN in the gradients. ``dynamic=False`` is not emulated.
* ``torch_npu.npu.is_available()`` is False: no ``npu`` device exists, and ``torch`` is
  not touched (no ``torch.npu``, no ``Tensor.npu()``). Tensors stay on the CPU.

Needs torch >= 2.1 (storage objects that persist while their storage lives).
"""

from __future__ import annotations

import ctypes
import math
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "FORMAT_NAMES",
    "dangling",
    "fresh_npu_import",
    "installed_standin",
    "make_module",
    "storage_size_of",
    "torch_npu_blocked",
]

ND, NCHW, NC1HWC0, FRACTAL_Z, FRACTAL_NZ = 2, 0, 3, 4, 29
FORMAT_NAMES = {ND: "ND", NCHW: "NCHW", NC1HWC0: "NC1HWC0", FRACTAL_Z: "FRACTAL_Z", FRACTAL_NZ: "FRACTAL_NZ"}
"""The formats the stand-in implements, by torch_npu's (ACL's) format id."""
BASE_FORMATS = frozenset({ND, NCHW})
"""Formats whose storage holds exactly the logical elements (a cast between them only relabels)."""
_BLOCK = 16
_REPOINTABLE = (torch.float32, torch.float16, torch.bfloat16)
_FORMAT_ATTR = "_standin_npu_format"
_SOURCE_ATTR = "_standin_source"

TORCH_NPU_MODULES = ("torch_npu", "torch_npu.npu", "torch_npu.npu.amp")
NPU_BACKEND_MODULE = "fused_core.backends.npu"


def _as_nchw(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """torch_npu's reading of a shape of up to 4 dims as (N, C, H, W): 1-D is C, 2-D is CH, 3-D is CHW."""
    if len(shape) > 4:
        raise RuntimeError(f"a {len(shape)}-D shape has no NCHW reading (at most 4 dims)")
    n, c, h, w = shape if len(shape) == 4 else (1, *shape, *(1,) * (3 - len(shape)))
    return n, c, h, w


def _blocks(size: int) -> int:
    return -(-size // _BLOCK)


def storage_size_of(shape: tuple[int, ...] | torch.Size, fmt: int) -> int:
    """Elements a tensor of ``shape`` occupies in format ``fmt`` (torch_npu's storage shapes for
    float32/float16/bfloat16)."""
    shape = tuple(shape)
    if fmt in BASE_FORMATS:
        return math.prod(shape)
    if fmt == NC1HWC0:  # (N, C1, H, W, C0): channels padded to a multiple of 16
        n, c, h, w = _as_nchw(shape)
        return n * _blocks(c) * h * w * _BLOCK
    if fmt == FRACTAL_Z:  # (C1 * H * W, N1, 16, 16): channels and kernels padded to multiples of 16
        n, c, h, w = _as_nchw(shape)
        return _blocks(c) * h * w * _blocks(n) * _BLOCK * _BLOCK
    if fmt == FRACTAL_NZ:  # (..., W1, H1, 16, 16): the last two dims padded to multiples of 16
        dims = shape or (1,)
        dims = dims if len(dims) > 1 else (*dims, 1)
        return math.prod(dims[:-2]) * _blocks(dims[-1]) * _blocks(dims[-2]) * _BLOCK * _BLOCK
    raise RuntimeError(f"unknown format type: {fmt} (the stand-in implements {sorted(FORMAT_NAMES)})")


def _format_of_storage(storage: torch.UntypedStorage) -> int:
    return getattr(storage, _FORMAT_ATTR, ND)


def dangling(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` was re-pointed by ``npu_change_data_ptr`` into memory that nothing but
    the stand-in still holds: on an NPU that memory would have been freed (and reused)."""
    source = getattr(tensor.untyped_storage(), _SOURCE_ATTR, None)
    if source is None:
        return False
    _keepalive, cdata = source
    return bool(torch._C._storage_Use_Count(cdata) <= 1)


class _StandIn:
    """The functions of one stand-in module, and the storages its re-pointed tensors alias."""

    def __init__(self) -> None:
        # Storage cdata -> storage, for every storage a tensor was re-pointed into. The aliases
        # hold this dict (not the storages), so the memory they point at stays allocated while
        # any alias lives, without counting as a use of those storages.
        self.sources: dict[int, torch.UntypedStorage] = {}

    def get_npu_format(self, tensor: torch.Tensor) -> int:
        return _format_of_storage(tensor.untyped_storage())

    def get_storage_size(self, tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().nbytes() // tensor.element_size()

    def npu_format_cast(self, tensor: torch.Tensor, acl_format: int) -> torch.Tensor:
        acl_format = int(acl_format)
        storage_size_of(tensor.shape, acl_format)  # rejects an unknown format or shape
        current = self.get_npu_format(tensor)
        if current == acl_format:
            return tensor
        if current in BASE_FORMATS and acl_format in BASE_FORMATS:
            setattr(tensor.untyped_storage(), _FORMAT_ATTR, acl_format)
            return tensor
        if tensor.dtype not in _REPOINTABLE:
            raise RuntimeError(f"can not cast format when src is {tensor.dtype}, not float32, float16 or bfloat16")
        size = storage_size_of(tensor.shape, acl_format)
        storage = torch.zeros(size, dtype=tensor.dtype, device=tensor.device).untyped_storage()
        stride = torch.empty_like(tensor).stride()  # dense tensors keep their strides, as in torch_npu
        result = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        with torch.no_grad():
            result.set_(storage, 0, tensor.shape, stride)
            result.copy_(tensor)
        setattr(storage, _FORMAT_ATTR, acl_format)
        return result

    def npu_change_data_ptr(self, dst: torch.Tensor, src: torch.Tensor, index: int) -> int:
        if index < 0:
            raise RuntimeError(f"Expect offset(index) equal or greater than zero, got: {index}")
        if src.dtype != dst.dtype:
            raise RuntimeError(f"Expect src and dst tensors having the same dtype, got: {src.dtype} and {dst.dtype}")
        if src.dtype not in _REPOINTABLE:
            raise RuntimeError(f"Only supports float32, float16 or bfloat16, got: {src.dtype}")
        dst_size, src_size = self.get_storage_size(dst), self.get_storage_size(src)
        if index + dst_size > src_size:
            raise RuntimeError(f"Offsets overflow: index {index} + dst storage size {dst_size} > src {src_size}")
        source = src.untyped_storage()
        self.sources.setdefault(source._cdata, source)
        nbytes = dst.untyped_storage().nbytes()
        alias = self._alias(source.data_ptr() + index * src.element_size(), nbytes, dst.dtype)
        setattr(alias, _SOURCE_ATTR, (self.sources, source._cdata))
        fmt = self.get_npu_format(dst)
        with torch.no_grad():
            dst.set_(alias, dst.storage_offset(), dst.shape, dst.stride())
        setattr(alias, _FORMAT_ATTR, fmt)
        return 0

    def _alias(self, address: int, nbytes: int, dtype: torch.dtype) -> torch.UntypedStorage:
        """A storage over ``nbytes`` at ``address`` that does not own (or free) that memory."""
        if nbytes == 0:
            return torch.empty(0, dtype=dtype).untyped_storage()
        buffer = (ctypes.c_char * nbytes).from_address(address)
        buffer._standin_sources = self.sources  # type: ignore[attr-defined]
        return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()


class GradScaler(torch.amp.GradScaler):
    """``torch_npu.npu.amp.GradScaler``'s signature over ``torch.amp.GradScaler("cpu")`` (a stand-in:
    torch_npu's also consults the NPU's overflow flag)."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        dynamic: bool = True,
        enabled: bool = True,
    ) -> None:
        if not dynamic:
            raise NotImplementedError("the torch_npu stand-in does not emulate static loss scaling (dynamic=False)")
        super().__init__(
            "cpu",
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            enabled=enabled,
        )


class autocast(torch.autocast):  # noqa: N801 (torch_npu's name)
    """``torch_npu.npu.amp.autocast``'s signature over ``torch.autocast("cpu")``."""

    def __init__(self, enabled: bool = True, dtype: torch.dtype = torch.float16, cache_enabled: bool = True) -> None:
        super().__init__("cpu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


def _check_storage_objects_persist() -> None:
    probe = torch.zeros(1)
    probe.untyped_storage()._standin_probe = True  # type: ignore[attr-defined]
    if not getattr(probe.untyped_storage(), "_standin_probe", False):
        raise RuntimeError(
            f"the torch_npu stand-in records formats on storage objects, which torch {torch.__version__} "
            "does not keep alive with their storage (torch >= 2.1 does)"
        )


def make_module() -> types.ModuleType:
    """A new stand-in ``torch_npu`` module (with ``npu`` and ``npu.amp`` submodules), not installed."""
    _check_storage_objects_persist()
    standin = _StandIn()
    module = types.ModuleType("torch_npu", "Stand-in for torch_npu on CPU tensors (fused_testing.npu_standin).")
    module.__version__ = "0.0.0+standin"  # type: ignore[attr-defined]
    for name in ("get_npu_format", "get_storage_size", "npu_format_cast", "npu_change_data_ptr"):
        setattr(module, name, getattr(standin, name))
    for fmt, name in FORMAT_NAMES.items():
        setattr(module, name, fmt)
    npu = types.ModuleType("torch_npu.npu")
    npu.is_available = lambda: False  # type: ignore[attr-defined]
    npu.device_count = lambda: 0  # type: ignore[attr-defined]
    amp = types.ModuleType("torch_npu.npu.amp")
    amp.GradScaler = GradScaler  # type: ignore[attr-defined]
    amp.autocast = autocast  # type: ignore[attr-defined]
    npu.amp = amp  # type: ignore[attr-defined]
    module.npu = npu  # type: ignore[attr-defined]
    return module


_MISSING = object()


@contextmanager
def fresh_npu_import(modules: Mapping[str, types.ModuleType | None] | None = None) -> Iterator[None]:
    """For the block: forget every cached ``torch_npu`` module and fused-core's NPU backend, then put
    ``modules`` in ``sys.modules`` (``None`` makes an import fail with ImportError). Afterwards
    everything is restored, so the next ``import fused_core.backends.npu`` binds to what is
    current then."""
    names = (*TORCH_NPU_MODULES, NPU_BACKEND_MODULE)
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    backends = sys.modules.get("fused_core.backends")
    saved_backend = _MISSING if backends is None else backends._loaded.pop("npu", _MISSING)
    saved_attribute = _MISSING if backends is None else vars(backends).pop("npu", _MISSING)
    sys.modules.update(modules or {})
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        backends = sys.modules.get("fused_core.backends")
        if backends is not None:
            backends._loaded.pop("npu", None)
            vars(backends).pop("npu", None)
            if saved_backend is not _MISSING:
                backends._loaded["npu"] = saved_backend
            if saved_attribute is not _MISSING:
                backends.npu = saved_attribute


@contextmanager
def installed_standin(module: types.ModuleType | None = None) -> Iterator[Any]:
    """``import torch_npu`` gives the stand-in (``module``, or a new one) for the block; fused-core's
    NPU backend, if imported inside, binds to it. Yields the module."""
    module = module if module is not None else make_module()
    entries = {"torch_npu": module, "torch_npu.npu": module.npu, "torch_npu.npu.amp": module.npu.amp}
    with fresh_npu_import(entries):
        yield module


@contextmanager
def torch_npu_blocked() -> Iterator[None]:
    """``import torch_npu`` raises ImportError for the block, as where it is not installed."""
    with fresh_npu_import({"torch_npu": None}):
        yield
