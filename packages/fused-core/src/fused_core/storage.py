"""Where parameters' memory lies: what a layout refuses before it moves anything.

A layout copies every parameter into its slot of a flat buffer and re-points it there. That is
invisible to a training loop only when each parameter is its own memory. Two cases are not,
and both are refused with an error that names the parameters, before anything is modified:

* **shared memory** (``model.share_memory()``, ``torch.multiprocessing``): Hogwild-style
  workers step parameters that other processes read. A private flat buffer would take the
  parameters out of shared memory, so no update would reach the other processes.
* **aliasing**: two parameters whose elements overlap (``b = nn.Parameter(a.data)``, views
  of one tensor that overlap, ``p.data = q.data``). torch steps the shared memory with both
  gradients; separate slots would step two copies. Parameters over *disjoint* parts of one
  storage (``x[:10]``, ``x[10:]``, or interleaved: ``x[:, :5]``, ``x[:, 5:]``) are independent
  tensors to torch as well, and are laid out as such.

Checking costs O(parameters · log parameters), once per layout build or re-adoption, plus
O(span) for two parameters whose spans (first to last element) overlap.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .buckets import Slot
from .errors import InvalidParameterError


def extent(tensor: torch.Tensor) -> int:
    """Elements of storage the tensor spans, from its first element to its last."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))


def check_not_shared(slots: Iterable[Slot]) -> None:
    """Refuse CPU parameters in shared memory (CUDA storages always report shared, and
    CUDA's inter-process sharing is not Hogwild on host memory)."""
    for slot in slots:
        param = slot.param
        if param.device.type == "cpu" and param.untyped_storage().is_shared():
            raise InvalidParameterError(
                f"{slot.describe()} is in shared memory (model.share_memory() or torch.multiprocessing): "
                "a fused optimizer keeps parameters in its own flat buffer, so its updates would not reach "
                "the other processes. For Hogwild-style training use torch.optim.SGD; otherwise build the "
                "optimizer over parameters that are not shared"
            )


MAX_MASK_ELEMENTS = 1 << 28
"""Largest span (in elements) over which two parameters whose spans overlap are compared element
by element; beyond it, overlapping spans are refused as overlapping memory."""


def _elements_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one storage whose spans overlap share an element: interleaved
    views (``x[:, :5]`` and ``x[:, 5:]``, ``x[0::2]`` and ``x[1::2]``) do not."""
    size = a.element_size()
    if b.element_size() != size or (a.data_ptr() - b.data_ptr()) % size:
        return True
    low = min(a.data_ptr(), b.data_ptr())
    elements = max(a.data_ptr() // size + extent(a), b.data_ptr() // size + extent(b)) - low // size
    if elements > MAX_MASK_ELEMENTS:
        return True
    mask = torch.zeros(elements, dtype=torch.bool)
    mask.as_strided(a.shape, a.stride(), (a.data_ptr() - low) // size).fill_(True)
    return bool(mask.as_strided(b.shape, b.stride(), (b.data_ptr() - low) // size).any())


def check_disjoint(slots: Iterable[Slot]) -> None:
    """Refuse two parameters whose elements overlap in memory, naming both. Spans (first to last
    element) are compared first; where two overlap, their elements are."""
    spans = []
    for slot in slots:
        param = slot.param
        elements = extent(param)
        if elements:
            start = param.data_ptr()
            spans.append((param.device, start, start + elements * param.element_size(), slot))
    spans.sort(key=lambda span: (str(span[0]), span[1]))
    active: list[tuple[torch.device, int, int, Slot]] = []
    for span in spans:
        active = [other for other in active if other[0] == span[0] and other[2] > span[1]]
        for other in active:
            if _elements_overlap(other[3].param, span[3].param):
                raise InvalidParameterError(
                    f"{other[3].describe()} and {span[3].describe()} share memory (one was made from the "
                    "other's .data, or both are overlapping views of one tensor): torch would step that memory "
                    "with both gradients, a flat buffer would step two copies. Make them one Parameter "
                    "(e.g. tie modules with decoder.weight = encoder.weight) or give each its own memory "
                    "(.clone())"
                )
        active.append(span)
