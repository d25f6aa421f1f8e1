"""Ascend NPU backend, imported only when an NPU tensor is seen (importing it imports torch_npu).

What differs from CPU and CUDA (torch_npu's documented behaviour):

* **Private storage formats.** A tensor may be stored in an NPU-private format (e.g.
  NC1HWC0, FRACTAL_Z) whose storage holds more elements than ``numel`` (channel padding).
  Slots are sized by ``torch_npu.get_storage_size(tensor)``, and gradients and state
  tensors are cast to their parameter's format (``torch_npu.npu_format_cast``) before
  they are copied into a slot, so the flat gradient and the flat parameter have the same
  element order.
* **Re-pointing.** A tensor in a private format is bound with torch_npu's own primitive,
  ``torch_npu.npu_change_data_ptr(dst, src, offset)``, which keeps ``dst``'s format (a view
  of the flat buffer would be a plain ND tensor). That binding does not share the flat
  buffer's storage, so :meth:`adopt` returns False and the layout checks that parameter's
  data pointer at every step. Tensors in the base (ND) format are bound with
  ``Tensor.set_`` like on CPU and are watched through the storage use count.
* **Alignment.** Every slot starts on a 512-byte boundary, the granularity of the NPU
  caching allocator, so a parameter in the flat buffer is as aligned as one allocated alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import InvalidParameterError
from . import Backend

try:
    import torch_npu  # type: ignore[import-not-found]
except Exception as error:  # absent, or present without Ascend's CANN libraries
    raise InvalidParameterError(
        "device type 'npu' needs torch_npu (pip install 'fused-core[npu]' on a machine with "
        f"Ascend's CANN toolkit); importing it failed: {error}"
    ) from error

BASE_FORMATS = frozenset({-1, 0, 1, 2})
"""torch_npu's format ids for plain layouts (undefined, NCHW, NHWC, ND): element order = logical order."""


_REPOINTED_INTO = WeakIdKeyDictionary()
"""tensor -> the flat buffer it was re-pointed into. ``npu_change_data_ptr`` does not own the
memory it points at, so each such tensor keeps its flat buffer alive (the optimizer may go first)."""


def npu_format(tensor: torch.Tensor) -> int:
    return int(torch_npu.get_npu_format(tensor))


def repoint(tensor: torch.Tensor, flat: torch.Tensor, offset: int) -> None:
    """torch_npu's re-pointing primitive, with ``flat`` kept alive as long as ``tensor``."""
    torch_npu.npu_change_data_ptr(tensor, flat, flat.storage_offset() + offset)
    _REPOINTED_INTO[tensor] = flat


@dataclass(frozen=True)
class NpuBackend(Backend):
    def storage_numel(self, tensor: torch.Tensor) -> int:
        # An ND tensor bound with set_ reports the whole flat buffer's storage size.
        if npu_format(tensor) in BASE_FORMATS:
            return tensor.numel()
        return int(torch_npu.get_storage_size(tensor))

    def view(self, flat: torch.Tensor, offset: int, like: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
        if npu_format(like) in BASE_FORMATS:
            return super().view(flat, offset, like, stride)
        tensor = torch_npu.npu_format_cast(torch.empty_like(like), npu_format(like))
        repoint(tensor, flat, offset)
        return tensor

    def adopt(self, tensor: torch.Tensor, flat: torch.Tensor, offset: int, stride: tuple[int, ...]) -> bool:
        if npu_format(tensor) in BASE_FORMATS:
            return super().adopt(tensor, flat, offset, stride)
        with torch.no_grad():
            values = tensor.clone()
            repoint(tensor, flat, offset)
            tensor.copy_(values)
        return False

    def holds(self, flat: torch.Tensor, offset: int, tensor: torch.Tensor, stride: tuple[int, ...]) -> bool:
        if npu_format(tensor) in BASE_FORMATS:
            return super().holds(flat, offset, tensor, stride)
        return tensor.data_ptr() == flat.data_ptr() + offset * flat.element_size()

    def match_param(self, param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        # state carried over from another device (a CPU -> NPU move) must be on the NPU first
        tensor = tensor.to(param.device)
        wanted = npu_format(param)
        return tensor if npu_format(tensor) == wanted else torch_npu.npu_format_cast(tensor, wanted)

    def layout_of(self, tensor: torch.Tensor) -> object:
        fmt = npu_format(tensor)
        return None if fmt in BASE_FORMATS else fmt


BACKEND = NpuBackend("npu", alignment_bytes=512)
