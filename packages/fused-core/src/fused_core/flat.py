"""Flat buffers: one contiguous buffer each for a bucket's parameters, gradients
and every per-parameter state buffer, all with the same layout (the gradient buffer
only once something needs the gradients in one place, a state buffer only once a
param group's hyperparameters use it, e.g. SGD's momentum buffer only with ``momentum != 0``,
Adam's ``max_exp_avg_sq`` only with ``amsgrad``), and one small table per scalar state
(Adam's ``step``): one value per slot, where ``state[p]["step"]`` is a 0-dim view.

Binding re-points a tensor at its slice: a parameter keeps its identity
(``id(p)``), shape, strides, values and ``requires_grad``; only its storage moves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import storage
from .backends import get_backend
from .buckets import BucketPlan, Slot


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps scalar state (``step``) in: float64 under a float64 default dtype,
    else float32 (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FlatBucket:
    """The flat param, grad and state buffers of one (device, dtype) bucket."""

    def __init__(self, plan: BucketPlan, state_names: Iterable[str], scalar_names: Iterable[str] = ()) -> None:
        self.plan = plan
        self.backend = get_backend(plan.device)
        self.params = self._make()
        self.state_names = tuple(state_names)
        self.state: dict[str, torch.Tensor] = {}
        """The state buffers allocated so far, by name (:meth:`allocate_state`)."""
        self.scalars = {name: torch.zeros(len(plan.slots), dtype=scalar_dtype()) for name in scalar_names}
        """Each scalar state's table: one value per slot, on the CPU, as torch keeps Adam's ``step``."""
        self._grads: torch.Tensor | None = None
        self._grad_chunks: list[torch.Tensor] | None = None
        self._grad_addresses: torch.Tensor | None = None
        self.offsets = torch.tensor([slot.offset for slot in plan.slots], dtype=torch.int64)
        """Every slot's element offset, for the CPU kernels that take slot tables."""
        self.numels = torch.tensor([slot.numel for slot in plan.slots], dtype=torch.int64)
        """Every slot's element count."""

    def _make(self) -> torch.Tensor:
        buffer = self.backend.zeros(self.plan.numel, self.plan.dtype, self.plan.device)
        storage.remember_flat(buffer)
        return buffer

    def allocate_state(self, names: Iterable[str]) -> bool:
        """Allocate the state buffers ``names`` not allocated yet (zeros), once the parameters are in
        place: adopting parameters first keeps the peak at the parameters' bytes plus one state
        buffer. Returns whether any was allocated."""
        new = [name for name in names if name in self.state_names and name not in self.state]
        for name in new:
            self.state[name] = self._make()
        return bool(new)

    @property
    def grads(self) -> torch.Tensor:
        """The flat gradient buffer, allocated on first use: in torch's default loop gradients are
        read where autograd put them, and this buffer is never needed."""
        if self._grads is None:
            self._grads = self._make()
        return self._grads

    @property
    def grads_allocated(self) -> bool:
        return self._grads is not None

    @property
    def grad_chunks(self) -> list[torch.Tensor]:
        """The flat gradient buffer as fixed-size views, for chunked reductions (gradient norms)."""
        if self._grad_chunks is None:
            self._grad_chunks = list(self.grads.split(self.NORM_CHUNK))
        return self._grad_chunks

    def address(self, flat: torch.Tensor, slot: Slot) -> int:
        """The address of ``slot``'s first element in ``flat``."""
        return flat.data_ptr() + slot.offset * flat.element_size()

    def grad_addresses(self) -> torch.Tensor:
        """Every slot's address in the flat gradient buffer (int64)."""
        if self._grad_addresses is None:
            self._grad_addresses = self.offsets * self.grads.element_size() + self.grads.data_ptr()
        return self._grad_addresses

    NORM_CHUNK = 1 << 17
    """Elements per chunk of :attr:`grad_chunks`: a single norm over millions of elements
    accumulates visible rounding error on the CPU (1e-2 relative over 124 M fp32 elements
    with torch 2.13), one per 128 Ki elements stays below 1e-6."""

    @property
    def watched_buffers(self) -> list[torch.Tensor]:
        """The buffers whose bound tensors the staleness check watches: parameters and state."""
        return [self.params, *self.state.values(), *self.scalars.values()]

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

    def scalar_view(self, name: str, index: int) -> torch.Tensor:
        """Slot ``index``'s value of scalar state ``name``: a 0-dim view of its table."""
        return self.scalars[name][index]

    def holds_scalar(self, name: str, index: int, value: object) -> bool:
        """Whether ``value`` is slot ``index``'s view of scalar state ``name``."""
        table = self.scalars[name]
        return (
            isinstance(value, torch.Tensor)
            and value.dim() == 0
            and value.dtype == table.dtype
            and value.device == table.device
            and value.data_ptr() == table.data_ptr() + index * table.element_size()
            and value.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
        )

    def bind_scalar(self, name: str, index: int, value: float | torch.Tensor) -> torch.Tensor:
        """Slot ``index``'s view of scalar state ``name``, holding ``value`` (a number or a
        one-element tensor, as torch and torch_npu save ``step``)."""
        view = self.scalar_view(name, index)
        view.fill_(value.item() if isinstance(value, torch.Tensor) else value)
        return view

    def bind_state(self, name: str, slot: Slot, value: torch.Tensor | None) -> torch.Tensor:
        """The slot's region of state buffer ``name``, filled from ``value`` when given."""
        view = self.view(self.state[name], slot)
        if value is not None:
            with torch.no_grad():
                view.copy_(self.backend.match_param(slot.param, value))
        return view
