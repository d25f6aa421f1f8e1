"""Where parameters' memory lies: what a layout refuses before it moves anything.

A layout copies every parameter into its slot of a flat buffer and re-points it there. That is
invisible to a training loop only when each parameter is its own memory. Three cases are not,
and all are refused with an error that names the parameters, before anything is modified:

* **shared memory** (``model.share_memory()``, ``torch.multiprocessing``): Hogwild-style
  workers step parameters that other processes read. A private flat buffer would take the
  parameters out of shared memory, so no update would reach the other processes.
* **a storage held elsewhere**: a parameter that lies inside a larger storage which something
  besides the optimizer's parameters also holds, or whose whole storage a Python tensor of
  another shape holds: the bucket of ``ZeroRedundancyOptimizer(parameters_as_bucket_view=True)``
  (which it broadcasts after every step), FSDP1's flat parameter, a tensor the parameters were
  cut from, a flattened view. Moving the parameter would leave that holder with the old values,
  so the update would be lost to it, silently. Parameters cut from a tensor nobody else holds,
  parameters in a flat buffer of fused-core (an earlier optimizer's), same-shape aliases
  (``p.data = w`` with ``w`` kept) and autograd's saved views are laid out as usual (see
  :func:`check_not_viewed`).
* **aliasing**: two parameters whose elements overlap (``b = nn.Parameter(a.data)``, views
  of one tensor that overlap, ``p.data = q.data``). torch steps the shared memory with both
  gradients; separate slots would step two copies. Parameters over *disjoint* parts of one
  storage (``x[:10]``, ``x[10:]``, or interleaved: ``x[:, :5]``, ``x[:, 5:]``) are independent
  tensors to torch as well, and are laid out as such.

Checking costs O(parameters · log parameters), once per layout build or re-adoption, plus
O(span) for two parameters whose spans (first to last element) overlap, plus one pass over the
garbage collector's objects where a parameter's whole storage has more references than its
parameters.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Collection, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

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


_FLAT_STORAGES: dict[int, StorageWeakRef] = {}
"""The storages of fused-core's flat buffers, by their ``_cdata``, as weak references: a parameter
in one of them was laid out by a fused optimizer, and may be laid out again."""


def remember_flat(buffer: torch.Tensor) -> None:
    """Record ``buffer``'s storage as a fused-core flat buffer (see :func:`check_not_viewed`)."""
    for cdata in [cdata for cdata, ref in _FLAT_STORAGES.items() if ref.expired()]:
        del _FLAT_STORAGES[cdata]
    if buffer.numel():
        ref = StorageWeakRef(buffer.untyped_storage())
        _FLAT_STORAGES[ref.cdata] = ref


def _is_flat(cdata: int) -> bool:
    ref = _FLAT_STORAGES.get(cdata)
    return ref is not None and not ref.expired()


def is_flat(untyped: torch.UntypedStorage) -> bool:
    """Whether ``untyped`` is the storage of a fused-core flat buffer."""
    return _is_flat(untyped._cdata)


def check_not_viewed(slots: Iterable[Slot], moved_along: Collection[int] = ()) -> None:
    """Refuse a parameter whose storage something besides the optimizer's own parameters also
    references, where that is a view into a larger storage (ZeRO's bucket view, FSDP1's flat
    parameter, the tensor the parameters were cut from) or a Python tensor of another shape over
    the parameter's whole storage (ZeRO's bucket of a single parameter, a flattened view kept):
    moving the parameter would leave that holder with old values. Each parameter's tensor holds
    one reference to its storage, and the storage object made to ask holds one more.

    Over a parameter's whole storage, two kinds of holders are let through. A tensor of the
    parameter's own shape (``p.data = w`` or ``nn.Parameter(w)`` with ``w`` kept, ``p.detach()``)
    is the everyday way of setting weights; it keeps the old values once the parameter moves
    (docs/migration.md says so). And autograd's saved views (a graph kept with ``retain_graph=True``
    saves ``weight.t()``) have no Python object: only Python tensors are looked at, through the
    garbage collector, once per layout build and only when such references exist.

    ``moved_along``: parameters (by ``id``) whose other holder the layout re-points with them
    (FSDP2's padded shard, :mod:`fused_core.sharded`); they are not checked."""
    slots = [slot for slot in slots if id(slot.param) not in moved_along]
    storages = {id(slot): slot.param.untyped_storage() for slot in slots if slot.param.numel()}
    holders = Counter(storage._cdata for storage in storages.values())
    covering: dict[int, Slot] = {}
    for slot in slots:
        held = storages.get(id(slot))
        if held is None or _is_flat(held._cdata):
            continue
        if torch._C._storage_Use_Count(held._cdata) <= holders[held._cdata] + 1:
            continue
        param = slot.param
        if param.storage_offset() == 0 and extent(param) * param.element_size() == held.nbytes():
            covering.setdefault(held._cdata, slot)
        else:
            raise _viewed(slot)
    found = _held_by_python(covering, {id(slot.param) for slot in slots}) if covering else None
    if found is not None:
        raise _viewed(found)


def _held_by_python(covering: dict[int, Slot], params: set[int]) -> Slot | None:
    """The slot of ``covering`` (by storage) whose storage a Python tensor other than ``params``
    references with another shape or strides than the slot's parameter. Keeps no reference to
    what it looked at (an error's traceback keeps frames)."""
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and id(obj) not in params and not obj.is_meta:
            slot = covering.get(obj.untyped_storage()._cdata)
            if slot is not None and (obj.shape != slot.param.shape or obj.stride() != slot.param.stride()):
                return slot
    return None


def _viewed(slot: Slot) -> InvalidParameterError:
    return InvalidParameterError(
        f"{slot.describe()} shares its storage with a tensor that is not one of this optimizer's parameters "
        "(ZeroRedundancyOptimizer(parameters_as_bucket_view=True), FSDP1's flat parameter, a tensor the "
        "parameters were cut from, or a flattened view kept to read the weights): a fused optimizer "
        "moves each parameter into its own flat buffer, so that tensor would never see the updates. Use "
        "ZeroRedundancyOptimizer(parameters_as_bucket_view=False), drop that tensor, or give the parameter its "
        "own memory (p.data = p.data.clone()) before the first step"
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
