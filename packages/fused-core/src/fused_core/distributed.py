r"""Data-parallel training with fused optimizers, without DistributedDataParallel.

A fused optimizer already keeps every gradient of a (device, dtype) bucket in one
flat buffer, so averaging the gradients of ``W`` ranks is one collective per bucket::

    g_b \leftarrow \frac{1}{W} \sum_{r=1}^{W} g_b^{(r)}

where :math:`g_b^{(r)}` is bucket :math:`b`'s flat gradient on rank :math:`r`. Each
buffer is divided by ``W`` first and then summed (as DistributedDataParallel does, and
because gloo has no ``AVG``), so the result is DDP's, element for element.

A parameter without a gradient contributes the zeros of its slot (the layout zeroes the
slots of gradient-less parameters). With ``find_unused_parameters=False`` every rank must
agree on which parameters have a gradient; with ``True`` one more small collective finds
the parameters some rank used, and ranks that did not use one receive the average
(``sum / W``) as its gradient, exactly as DDP's ``find_unused_parameters=True``.

The optimizer must hold the same parameters, in the same order, on every rank (not
ZeroRedundancyOptimizer's local optimizer, which holds one rank's share). See
``docs/distributed.md`` for DDP, ZeroRedundancyOptimizer, ``torch.distributed.checkpoint``
and FSDP2.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .layout import Layout

if TYPE_CHECKING:
    from .optimizer import FusedOptimizer

__all__ = ["all_reduce_grads", "is_dtensor"]

DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")
"""Where torch keeps ``DTensor`` (public since torch 2.5, private before)."""


@torch.no_grad()
def all_reduce_grads(
    optimizer: FusedOptimizer,
    group: dist.ProcessGroup | None = None,
    *,
    find_unused_parameters: bool = False,
) -> None:
    """Average ``optimizer``'s gradients over the ranks of ``group``: one all-reduce per bucket.

    Call it between ``backward()`` and ``optimizer.step()`` on every rank of ``group``
    (default: the whole world). Gradients replaced since the last step (``zero_grad(
    set_to_none=True)``, ``p.grad = t``) are bound to the flat buffers first
    (:meth:`~fused_core.layout.Layout.bind_grads`).

    ``find_unused_parameters=True`` also all-reduces one flag per parameter, so a parameter
    that some ranks left without a gradient is updated on every rank with the average;
    without it, a parameter must have a gradient on all ranks or on none.
    """
    layout = optimizer._current_layout()
    optimizer._refuse_sharded(
        "all_reduce_grads", "FSDP2 and tensor parallelism reduce their gradients themselves: step without it"
    )
    layout.bind_grads()
    world_size = dist.get_world_size(group)
    works = []
    for bucket in layout.buckets:
        bucket.grads.div_(world_size)
        works.append(dist.all_reduce(bucket.grads, op=dist.ReduceOp.SUM, group=group, async_op=True))
    if find_unused_parameters:
        _give_gradients_to_unused(layout, group)
    for work in works:
        work.wait()


def _give_gradients_to_unused(layout: Layout, group: dist.ProcessGroup | None) -> None:
    """Bind the gradient slot of every parameter that has no gradient here but had one on
    some rank: after the all-reduce, that slot holds the average."""
    slots = [(bucket, slot) for bucket in layout.buckets for slot in bucket.plan.slots]
    if not slots:
        return
    flags = [slot.param.grad is not None for _, slot in slots]
    # On the buckets' device: NCCL and HCCL reduce device tensors only.
    used = torch.tensor(flags, dtype=torch.int32).to(layout.buckets[0].grads.device)
    dist.all_reduce(used, op=dist.ReduceOp.SUM, group=group)
    for (bucket, slot), count in zip(slots, used.tolist()):
        if count and slot.param.grad is None:
            # The bound view: the next step's staleness check sees the new gradient and keeps it in place.
            slot.param.grad = bucket.view(bucket.grads, slot)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism).

    Imports nothing: if torch's DTensor module was never imported, no tensor is a DTensor.
    """
    for name in DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and isinstance(tensor, getattr(module, "DTensor", ())):
            return True
    return False
