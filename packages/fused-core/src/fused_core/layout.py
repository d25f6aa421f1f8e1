"""The live layout of a fused optimizer: flat buckets, the kernel runs of a step,
and the staleness check that guards them.

Hot path (every step): :meth:`Layout.is_current` compares each flat buffer's
storage use count with the count taken when the layout was last bound, and looks
at the few parameters that had no gradient. Any re-pointed parameter, gradient
or state tensor drops a use count, so a changed count is the signal to run
:meth:`Layout.reconcile`, the cold path that walks every parameter.

Reconcile policy, per parameter:

* param re-allocated with the same device, dtype and shape: its values are
  copied into its slot and it is re-pointed there (state kept);
* param moved to another device or dtype: the whole layout is rebuilt, state
  carried over (converted like the parameter);
* param re-allocated with another shape: :class:`ParameterReallocatedError`;
* gradient replaced (``p.grad = t``, autograd writing a fresh tensor after
  ``grad = None``, DDP bucket views): copied into its slot and re-bound;
  a gradient whose dtype, shape or device differ from the parameter's is an error;
* state tensor replaced (``load_state_dict``): copied into its slot and re-bound.

Nothing is modified until every parameter has been checked.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .buckets import Slot, plan_buckets
from .errors import InvalidParameterError, ParameterReallocatedError
from .flat import FlatBucket
from .kernels import KernelRegistry, Launcher

State = MutableMapping[torch.Tensor, dict[str, Any]]


@dataclass(eq=False)
class Run:
    """One kernel launch: a contiguous range of one group's slots in one bucket."""

    group: int
    launcher: Launcher
    bucket: FlatBucket
    slots: list[Slot]
    first_step: bool
    params: torch.Tensor = field(init=False)
    grads: torch.Tensor = field(init=False)
    state: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        start, end = self.slots[0].offset, self.slots[-1].end
        self.params = self.bucket.params[start:end]
        self.grads = self.bucket.grads[start:end]
        self.state = {name: flat[start:end] for name, flat in self.bucket.state.items()}


def check_grad(slot: Slot, grad: torch.Tensor) -> None:
    """A gradient must match its parameter; say which parameter and what differs."""
    param = slot.param
    if grad.layout != torch.strided:
        raise InvalidParameterError(
            f"{slot.describe()} has a sparse ({grad.layout}) gradient; fused optimizers need dense gradients"
        )
    for what, want, got in (
        ("dtype", param.dtype, grad.dtype),
        ("shape", param.shape, grad.shape),
        ("device", param.device, grad.device),
    ):
        if want != got:
            raise InvalidParameterError(f"{slot.describe()} has a gradient of {what} {got}, expected {want}")


class Layout:
    def __init__(
        self,
        param_groups: Sequence[dict],
        state: State,
        *,
        kernel: str,
        state_names: Sequence[str],
        registry: KernelRegistry,
    ) -> None:
        self.state_names = tuple(state_names)
        plans = plan_buckets(param_groups)
        launchers = [registry.resolve(kernel, plan.device, plan.dtype) for plan in plans]
        for plan in plans:
            for slot in plan.slots:
                self._check_slot_inputs(slot, state)
        self.buckets = [FlatBucket(plan, self.state_names) for plan in plans]
        self._launchers = dict(zip(self.buckets, launchers))
        self._unshared: set[Slot] = set()
        self._formats: dict[Slot, object] = {}
        for bucket in self.buckets:
            for slot in bucket.plan.slots:
                self._bind_param(bucket, slot)
                if slot.param.grad is not None:
                    bucket.bind_grad(slot, slot.param.grad)
                self._bind_states(bucket, slot, state, copy=True)
        self.runs: list[Run] = []
        self._watched: list[tuple[int, int]] = []
        self._gradless: list[torch.Tensor] = []
        self._sentinels: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
        self.refresh(state)

    # ----- hot path -------------------------------------------------------
    def is_current(self) -> bool:
        """O(buckets + runs + gradless params): has anything been re-pointed since the last bind?

        Three cheap signals: the use count of every flat storage (any bound tensor re-pointed
        elsewhere drops it), the parameters that had no gradient (one may have got one), and
        sentinel parameters whose gradient object and data pointer must be the bound ones: the
        first and last of every run (this catches whole-model resets such as
        ``model.zero_grad()`` or ``model.half()`` even while other references keep the old flat
        views alive) and every parameter whose binding does not share the flat storage (NPU
        private formats), which the use counts cannot see.
        """
        for cdata, count in self._watched:
            if torch._C._storage_Use_Count(cdata) != count:
                return False
        for param in self._gradless:
            if param.grad is not None:
                return False
        for param, grad, data_ptr in self._sentinels:
            if param.grad is not grad or param.data_ptr() != data_ptr:
                return False
        return True

    # ----- cold path ------------------------------------------------------
    def refresh(self, state: State) -> None:
        """Recompute the runs and take a new snapshot of the use counts."""
        self.runs = []
        self._gradless = []
        for bucket in self.buckets:
            pending: list[tuple[tuple[int, bool], list[Slot]]] = []
            previous_has_grad = False
            for slot in bucket.plan.slots:
                param = slot.param
                if not bucket.holds(bucket.grads, slot, param.grad):
                    self._gradless.append(param)
                    bucket.region(bucket.grads, slot).zero_()  # flat-gradient reductions see only live gradients
                    previous_has_grad = False
                    continue
                key = (slot.group, not all(name in state.get(param, {}) for name in self.state_names))
                if previous_has_grad and pending[-1][0] == key:
                    pending[-1][1].append(slot)
                else:
                    pending.append((key, [slot]))
                previous_has_grad = True
            launcher = self._launchers[bucket]
            self.runs += [Run(group, launcher, bucket, slots, first) for (group, first), slots in pending]
        watched = {slot for run in self.runs for slot in (run.slots[0], run.slots[-1])} | self._unshared
        self._sentinels = [(slot.param, slot.param.grad, slot.param.data_ptr()) for slot in watched]
        cdatas = [buffer.untyped_storage()._cdata for bucket in self.buckets for buffer in bucket.buffers]
        self._watched = [(cdata, torch._C._storage_Use_Count(cdata)) for cdata in cdatas]

    def initialize_state(self, started: Sequence[tuple[FlatBucket, Slot]], state: State) -> None:
        """After a first step over ``started`` slots: expose their state slots as per-parameter
        state tensors."""
        for bucket, slot in started:
            self._bind_states(bucket, slot, state, copy=False)
        self.refresh(state)

    def reconcile(self, state: State) -> bool:
        """Re-adopt whatever was re-pointed. False when the layout must be rebuilt instead."""
        readopt_params, readopt_grads, readopt_states = [], [], []
        for bucket in self.buckets:
            for slot in bucket.plan.slots:
                param = slot.param
                if not bucket.holds(bucket.params, slot, param):
                    if param.shape != slot.shape:
                        raise ParameterReallocatedError(
                            f"{slot.describe()} was re-allocated with shape {tuple(param.shape)}; its optimizer "
                            "state cannot follow a shape change. Build a new optimizer over the new parameters."
                        )
                    if param.device != bucket.plan.device or param.dtype != bucket.plan.dtype:
                        return False
                    if bucket.backend.layout_of(param) != self._formats[slot]:
                        return False  # another memory format: another slot size and binding
                    readopt_params.append((bucket, slot))
                grad = param.grad
                if grad is not None and not bucket.holds(bucket.grads, slot, grad):
                    check_grad(slot, grad)
                    readopt_grads.append((bucket, slot, grad))
                values = state.get(param, {})
                for name in self.state_names:
                    value = values.get(name)
                    if value is not None and not bucket.holds(bucket.state[name], slot, value):
                        self._check_state(slot, name, value)
                        readopt_states.append((bucket, slot))
        for bucket, slot in readopt_params:
            self._bind_param(bucket, slot)
        for bucket, slot, grad in readopt_grads:
            bucket.bind_grad(slot, grad)
        for bucket, slot in readopt_states:
            self._bind_states(bucket, slot, state, copy=True)
        self.refresh(state)
        return True

    # ----- helpers --------------------------------------------------------
    def _bind_param(self, bucket: FlatBucket, slot: Slot) -> None:
        """Bind a parameter; one whose binding the storage use count cannot watch becomes a sentinel."""
        self._formats[slot] = bucket.backend.layout_of(slot.param)
        if bucket.bind_param(slot):
            self._unshared.discard(slot)
        else:
            self._unshared.add(slot)

    def _check_slot_inputs(self, slot: Slot, state: State) -> None:
        if slot.param.grad is not None:
            check_grad(slot, slot.param.grad)
        values = state.get(slot.param, {})
        for name in self.state_names:
            if values.get(name) is not None:
                self._check_state(slot, name, values[name])

    @staticmethod
    def _check_state(slot: Slot, name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor) or value.shape != slot.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidParameterError(f"state '{name}' of {slot.describe()} is {got}, expected a tensor of its shape")

    def _bind_states(self, bucket: FlatBucket, slot: Slot, state: State, *, copy: bool) -> None:
        """copy=True: adopt the state tensors the parameter already has into their slots.
        copy=False: after a first step, its (already written) slots become its state tensors."""
        if copy:
            values = state.get(slot.param, {})
            for name in self.state_names:
                if values.get(name) is not None:
                    values[name] = bucket.bind_state(name, slot, values[name])
        else:
            values = state[slot.param]
            for name in self.state_names:
                values[name] = bucket.bind_state(name, slot, None)
