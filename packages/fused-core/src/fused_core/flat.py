"""Flat buffers: one contiguous buffer each for a bucket's parameters, gradients
and every per-parameter state buffer, all with the same layout.

Binding re-points a tensor at its slice: a parameter keeps its identity
(``id(p)``), shape, strides, values and ``requires_grad``; only its storage moves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .backends import get_backend
from .buckets import BucketPlan, Slot


class FlatBucket:
    """The flat param, grad and state buffers of one (device, dtype) bucket."""

    def __init__(self, plan: BucketPlan, state_names: Iterable[str]) -> None:
        self.plan = plan
        self.backend = get_backend(plan.device)
        make = lambda: torch.zeros(plan.numel, dtype=plan.dtype, device=plan.device)  # noqa: E731
        self.params = make()
        self.grads = make()
        self.state = {name: make() for name in state_names}
        # Made here, not on first use, so the layout's use-count snapshot includes these views.
        self.grad_chunks = list(self.grads.split(self.NORM_CHUNK))
        """The flat gradient buffer as fixed-size views, for chunked reductions (gradient norms)."""

    NORM_CHUNK = 1 << 17
    """Elements per chunk of :attr:`grad_chunks`: a single norm over millions of elements
    accumulates visible rounding error on the CPU (1e-2 relative over 124 M fp32 elements
    with torch 2.13), one per 128 Ki elements stays below 1e-6."""

    @property
    def buffers(self) -> list[torch.Tensor]:
        return [self.params, self.grads, *self.state.values()]

    def view(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        """A new tensor for ``slot``'s region of ``flat``, shaped and strided like the parameter."""
        return self.backend.view(flat, slot.offset, slot.param, slot.stride)

    def region(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        """``slot``'s elements of ``flat`` as a 1-D slice (all ``storage_numel`` of them)."""
        return flat[slot.offset : slot.end]

    def holds(self, flat: torch.Tensor, slot: Slot, tensor: torch.Tensor | None) -> bool:
        """Whether ``tensor`` already is bound to ``slot``'s region of ``flat``."""
        return (
            tensor is not None
            and tensor.layout == torch.strided
            and tensor.dtype == flat.dtype
            and tensor.device == flat.device
            and tensor.shape == slot.shape
            and self.backend.holds(flat, slot.offset, tensor, slot.stride)
        )

    def bind_param(self, slot: Slot) -> bool:
        """Move the parameter's values into its slot and bind the parameter there.
        Returns whether the binding shares the flat storage (see :class:`Backend`)."""
        return self.backend.adopt(slot.param, self.params, slot.offset, slot.stride)

    def bind_grad(self, slot: Slot, grad: torch.Tensor) -> None:
        """Copy ``grad`` into the slot's gradient region and make that region ``param.grad``."""
        view = self.view(self.grads, slot)
        with torch.no_grad():
            view.copy_(self.backend.match_param(slot.param, grad))
        slot.param.grad = view

    def bind_state(self, name: str, slot: Slot, value: torch.Tensor | None) -> torch.Tensor:
        """The slot's region of state buffer ``name``, filled from ``value`` when given."""
        view = self.view(self.state[name], slot)
        if value is not None:
            with torch.no_grad():
                view.copy_(self.backend.match_param(slot.param, value))
        return view
