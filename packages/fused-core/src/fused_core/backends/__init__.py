"""Device backends: what differs between CPU, CUDA and NPU when tensors move into a flat buffer.

A backend answers three questions for its device type:

* how many elements a tensor occupies in a flat buffer (NPU private formats can
  need more storage than ``numel``);
* the alignment, in bytes, of every tensor's offset in the flat buffer;
* how to re-point a tensor at its slice of a flat buffer, keeping its identity.

Backends for ``cpu`` and ``cuda`` live here; the ``npu`` backend is imported on
first use only, so importing fused_core never imports torch_npu.
"""

from __future__ import annotations

import importlib
import mmap
from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError
from . import pages


@dataclass(frozen=True)
class Backend:
    """Device-specific layout rules; the defaults serve CPU and CUDA.

    A tensor is *bound* to ``flat`` at element ``offset`` when it is the same object as
    before, but its elements live in ``flat[offset : offset + storage_numel(tensor)]``.
    Here binding shares ``flat``'s storage (``tensor.data = view``), so the flat storage's use
    count sees every later re-pointing. A backend that must bind otherwise (NPU private
    formats) returns False from :meth:`adopt`; the layout then checks that tensor's data
    pointer at every step instead.
    """

    device_type: str
    alignment_bytes: int = 1

    def storage_numel(self, tensor: torch.Tensor) -> int:
        """Elements ``tensor`` needs in a flat buffer."""
        return tensor.numel()

    def zeros(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new flat buffer of ``numel`` zeros."""
        return torch.zeros(numel, dtype=dtype, device=device)

    def alignment_elements(self, dtype: torch.dtype) -> int:
        """Offsets in a flat buffer of ``dtype`` are multiples of this."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return max(1, -(-self.alignment_bytes // itemsize))

    def view(self, flat: torch.Tensor, offset: int, like: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
        """A new tensor shaped (and, where the device has formats, formatted) like ``like``,
        bound to ``flat`` at ``offset``."""
        return flat.as_strided(like.shape, stride, flat.storage_offset() + offset)

    def adopt(self, tensor: torch.Tensor, flat: torch.Tensor, offset: int, stride: tuple[int, ...]) -> bool:
        """Copy ``tensor``'s values into ``flat`` at ``offset`` and bind ``tensor`` (same object)
        there. Returns whether the binding shares ``flat``'s storage."""
        with torch.no_grad():
            view = self.view(flat, offset, tensor, stride)
            view.copy_(tensor)
            # ``.data =``, not ``set_``: ``set_`` gives a leaf a new gradient accumulator, which
            # silently drops the hooks DDP registered on the old one.
            tensor.data = view
        return True

    def holds(self, flat: torch.Tensor, offset: int, tensor: torch.Tensor, stride: tuple[int, ...]) -> bool:
        """Whether ``tensor`` (already checked for dtype, device and shape) is bound to ``flat`` at
        ``offset``. Storage and offset are compared, not ``data_ptr()``, which is 0 for every
        numel-0 tensor."""
        return (
            tuple(tensor.stride()) == stride
            and tensor.storage_offset() == flat.storage_offset() + offset
            and tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        )

    def match_param(self, param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a gradient or a state value) in the form ``param`` has in memory."""
        return tensor

    def layout_of(self, tensor: torch.Tensor) -> object:
        """The memory format that decides a tensor's slot size and binding (None: the plain one).
        A parameter re-allocated in another format needs a new layout, not a re-adoption."""
        return None


@dataclass(frozen=True)
class CpuBackend(Backend):
    """The CPU's flat buffers are anonymous memory maps (``torch.frombuffer`` over ``mmap``):

    * their pages are zero until written and take no memory until then, so adopting parameters
      one by one (each copied in, its old storage freed) never holds twice the parameters' bytes;
      a large parameter that alone holds its storage is copied piece by piece, each copied
      piece's pages given back (:mod:`~fused_core.backends.pages`), so the peak is the
      parameters' bytes plus a few MB, not plus the largest parameter;
    * their storage cannot be resized: ``p.untyped_storage().resize_(0)``, which would free
      every parameter of the bucket at once, raises torch's "Trying to resize storage that is
      not resizable" before anything is lost.
    """

    def zeros(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.zeros(0, dtype=dtype, device=device)
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype)

    def adopt(self, tensor: torch.Tensor, flat: torch.Tensor, offset: int, stride: tuple[int, ...]) -> bool:
        # The slot's strides are the tensor's own only if it is dense: then memory order is slot order.
        if tuple(tensor.stride()) != stride or not pages.sole_owner(tensor):
            return super().adopt(tensor, flat, offset, stride)
        with torch.no_grad():
            view = self.view(flat, offset, tensor, stride)
            try:
                released = pages.copy_releasing(tensor, flat[offset : offset + tensor.numel()])
            except BaseException:
                tensor.data = view  # the copy was completed before the error went on; old pages are gone
                raise
            if not released:
                view.copy_(tensor)
            tensor.data = view
        return True


_BUILTIN = {
    "cpu": CpuBackend("cpu"),
    # 16-byte offsets keep every slice eligible for CUDA's vectorised loads.
    "cuda": Backend("cuda", alignment_bytes=16),
}
_LAZY = {"npu": "fused_core.backends.npu"}
_loaded: dict[str, Backend] = dict(_BUILTIN)

KNOWN_DEVICE_TYPES = frozenset(_BUILTIN) | frozenset(_LAZY)
"""Device types fused-core can lay out; kernels may be registered for these and ``"*"``."""


def get_backend(device: torch.device | str) -> Backend:
    """The backend of ``device``'s type, importing lazy backends (npu) on first use."""
    # str(device): torch.device("npu") itself fails when torch_npu is not loaded
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]
    if device_type not in _loaded:
        if device_type not in _LAZY:
            raise InvalidParameterError(
                f"device type '{device_type}' has no fused-optim backend "
                f"(supported: {', '.join(sorted(KNOWN_DEVICE_TYPES))})"
            )
        _loaded[device_type] = importlib.import_module(_LAZY[device_type]).BACKEND
    return _loaded[device_type]
