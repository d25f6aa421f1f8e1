"""Dtype bucketing: which parameter goes in which (device, dtype) bucket, at which offset.

Within a bucket, parameters are ordered by param group, then by their order in
the group, so every group is one contiguous range of the bucket and one kernel
launch can update it. Offsets are rounded up to the backend's alignment; the
gaps hold zeros, which every update keeps at zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .backends import get_backend


@dataclass(frozen=True, eq=False)
class Slot:
    """Where one parameter lives in its bucket."""

    param: torch.Tensor
    group: int
    index: int
    name: str | None
    offset: int
    numel: int
    shape: torch.Size
    stride: tuple[int, ...]
    position: int = 0
    """Index of the slot in its bucket."""

    @property
    def end(self) -> int:
        return self.offset + self.numel

    def describe(self) -> str:
        """How error messages name this parameter."""
        named = f" '{self.name}'" if self.name else ""
        return f"parameter{named} (param group {self.group}, index {self.index}, shape {tuple(self.shape)})"


@dataclass(eq=False)
class BucketPlan:
    device: torch.device
    dtype: torch.dtype
    slots: list[Slot] = field(default_factory=list)
    numel: int = 0


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill ``numel`` consecutive storage elements, in any dim order
    (contiguous, channels_last, transposed...)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def layout_stride(tensor: torch.Tensor) -> tuple[int, ...]:
    """The strides a parameter keeps in the flat buffer.

    A dense tensor (contiguous, channels_last, transposed...) keeps its own
    strides, so its memory order is unchanged; anything else becomes contiguous.
    """
    if is_dense(tensor):
        return tuple(tensor.stride())
    return tuple(torch.empty(tensor.shape, device="meta").stride())


def param_name(group: dict, index: int) -> str | None:
    names = group.get("param_names")
    return names[index] if names is not None and index < len(names) else None


def plan_buckets(param_groups: Sequence[dict], reserves: Mapping[int, int] | None = None) -> list[BucketPlan]:
    """Assign every parameter of ``param_groups`` a slot in a (device, dtype) bucket. ``reserves``:
    elements to keep free from a slot's start, by ``id`` of the parameter, where that is more than
    the parameter needs (FSDP2's padding after a local shard); the surplus is a gap."""
    reserves = reserves or {}
    buckets: dict[tuple[torch.device, torch.dtype], BucketPlan] = {}
    for group_index, group in enumerate(param_groups):
        for index, param in enumerate(group["params"]):
            key = (param.device, param.dtype)
            bucket = buckets.setdefault(key, BucketPlan(param.device, param.dtype))
            backend = get_backend(param.device)
            align = backend.alignment_elements(param.dtype)
            offset = -(-bucket.numel // align) * align
            numel = backend.storage_numel(param)
            bucket.slots.append(
                Slot(
                    param,
                    group_index,
                    index,
                    param_name(group, index),
                    offset,
                    numel,
                    param.shape,
                    layout_stride(param),
                    len(bucket.slots),
                )
            )
            bucket.numel = offset + max(numel, reserves.get(id(param), 0))
    return list(buckets.values())
