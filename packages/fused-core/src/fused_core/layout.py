"""The live layout of a fused optimizer: flat buckets, the kernel launches of a step,
and the staleness check that guards them.

Parameters and state live in flat buffers (bound once, re-bound only when something moves
them). Gradients are read where they lie, every step: autograd's fresh tensors in torch's
default loop, or views of the flat gradient buffer once :meth:`Layout.bind_grads` put them
there (``zero_grad(set_to_none=False)``, ``get_combined_grads()``, clipping). ``p.grad is g``
stays true for every gradient the user or autograd set.

A step, per bucket:

* CPU with the gradient reader (:mod:`fused_core.gradients`) and a segment launcher: one C++
  call reads every slot's gradient address and status, one launcher call per param group
  updates the slots that have a gradient, reading them in place;
* otherwise: each ``.grad`` is read from Python and, unless it already is the slot's view of the
  flat gradient buffer, copied there; the flat launcher then runs over each maximal run of
  slots with a gradient (same group, same state initialisation).

Hot path (every step): :meth:`Layout.is_current` compares the storage use count of every flat
parameter and state buffer with the count taken when the layout was last bound, and the data
pointers of a few sentinel parameters; the CPU reader also checks every parameter's address.
Anything else is the cold path, :meth:`Layout.reconcile`, which walks every parameter:

* param re-allocated with the same device, dtype and shape: its values are copied into its
  slot and it is re-pointed there (state kept);
* param moved to another device or dtype: the whole layout is rebuilt, state carried over;
* param re-allocated with another shape: :class:`ParameterReallocatedError`;
* state tensor replaced (``load_state_dict``): copied into its slot and re-bound; a state
  value of None (torch's "no momentum buffer yet") re-initialises it at the next step. A scalar
  state (Adam's ``step``) may be loaded as a number or a one-element tensor (older torch,
  torch_npu).

State follows the param groups: each group uses the state names its hyperparameters ask for
(``names_for(group)``: SGD's momentum buffer only with momentum, Adam's ``max_exp_avg_sq`` only
with amsgrad), checked at every step, so a scheduler or a user turning such a hyperparameter on
is honoured at the next step. A slot whose state is initialised for some of its group's names
but lacks others (amsgrad switched on after the first step) is an error, as it is in torch.

Nothing is modified until every parameter and gradient has been checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import gradients, storage
from .backends.pages import sole_owner
from .buckets import Slot, plan_buckets
from .errors import InvalidHyperparameterError, InvalidParameterError, ParameterReallocatedError
from .flat import FlatBucket
from .kernels import GradSegments, KernelRegistry, Launcher, RunInfo, SegmentLauncher, segments_kernel

State = MutableMapping[torch.Tensor, dict[str, Any]]
NamesFor = Callable[[dict[str, Any]], Sequence[str]]
"""A param group's hyperparameters -> the state names (buffers and scalars) its slots keep."""


@dataclass(eq=False)
class Run:
    """One flat launch: a contiguous range of one group's slots in one bucket, using state ``names``."""

    group: int
    launcher: Launcher
    bucket: FlatBucket
    slots: list[Slot]
    first_step: bool
    names: Sequence[str]
    params: torch.Tensor = field(init=False)
    grads: torch.Tensor = field(init=False)
    state: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        start, end = self.slots[0].offset, self.slots[-1].end
        first, last = self.slots[0].position, self.slots[-1].position + 1
        self.params = self.bucket.params[start:end]
        self.grads = self.bucket.grads[start:end]
        self.state = _slices(self.bucket, self.names, start, end, first, last)

    def info(self) -> RunInfo:
        """What the launcher is told about the run."""
        base = self.slots[0].offset
        return RunInfo(
            first_step=self.first_step,
            parameters=tuple(slot.param for slot in self.slots),
            offsets=torch.tensor([slot.offset - base for slot in self.slots], dtype=torch.int64),
            numels=torch.tensor([slot.numel for slot in self.slots], dtype=torch.int64),
        )


def _slices(bucket: FlatBucket, names: Sequence[str], start: int, end: int, first: int, last: int) -> dict[str, Any]:
    """The slices of state ``names`` for elements ``[start, end)``, slots ``[first, last)``: a state
    buffer's elements, a scalar state's values."""
    sliced = {}
    for name in names:
        if name in bucket.scalars:
            sliced[name] = bucket.scalars[name][first:last]
        elif name in bucket.state:
            sliced[name] = bucket.state[name][start:end]
    return sliced


@dataclass(eq=False)
class GroupRange:
    """One param group's slots ``[first, last)`` in one bucket, with the slices a segment launch
    needs (``state``: those of the state names the group uses)."""

    group: int
    bucket: FlatBucket
    first: int
    last: int
    params: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: GradSegments | None = None

    def slice_state(self, names: Sequence[str]) -> None:
        slots = self.bucket.plan.slots
        if self.last > self.first:
            start, end = slots[self.first].offset, slots[self.last - 1].end
            self.state = _slices(self.bucket, names, start, end, self.first, self.last)


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
        names_for: NamesFor,
        scalar_names: Sequence[str] = (),
        reserves: Mapping[int, int] | None = None,
    ) -> None:
        self.reserves = dict(reserves or {})
        """Elements reserved from the start of some slots (by ``id`` of their parameter), for a
        holder that moves with the parameter (:func:`~fused_core.buckets.plan_buckets`)."""
        self.state_names = tuple(state_names)
        """Every state buffer the optimizer may keep, laid out like the parameters."""
        self.scalar_names = tuple(scalar_names)
        """Every scalar state the optimizer may keep, one value per parameter."""
        self.names_for = names_for
        self.group_names = [self._names(group) for group in param_groups]
        """The state names each param group uses, as of the last check (:meth:`check_names`)."""
        plans = plan_buckets(param_groups, self.reserves)
        launchers = [registry.resolve(kernel, plan.device, plan.dtype) for plan in plans]
        reader = gradients.library()
        segment_launchers = [
            registry.find(segments_kernel(kernel), plan.device, plan.dtype)
            if reader is not None and plan.device.type == "cpu"
            else None
            for plan in plans
        ]
        all_slots = [slot for plan in plans for slot in plan.slots]
        for slot in all_slots:
            self._check_states(slot, state)
        self._check_complete(state, all_slots, self.group_names)
        storage.check_not_shared(all_slots)
        storage.check_disjoint(all_slots)
        storage.check_not_viewed(all_slots, self.reserves)
        self.buckets = [FlatBucket(plan, self.state_names, self.scalar_names) for plan in plans]
        self._launchers = dict(zip(self.buckets, launchers))
        self._segment_launchers: dict[FlatBucket, SegmentLauncher] = {
            bucket: launcher for bucket, launcher in zip(self.buckets, segment_launchers) if launcher is not None
        }
        self._unshared: set[Slot] = set()
        self._formats: dict[Slot, object] = {}
        for bucket in self.buckets:
            for slot in bucket.plan.slots:
                self._bind_param(bucket, slot)
        for bucket in self.buckets:  # state buffers after the parameters: the lower peak
            bucket.allocate_state(self._used_names(bucket, state))
            for slot in bucket.plan.slots:
                self._bind_states(bucket, slot, state)
        self._tables: dict[FlatBucket, gradients.GradTable] = {}
        if reader is not None:
            for bucket in self._segment_launchers:
                slots = bucket.plan.slots
                self._tables[bucket] = gradients.GradTable(
                    reader, [slot.param for slot in slots], [bucket.address(bucket.params, slot) for slot in slots]
                )
        self.ranges: list[GroupRange] = []
        for bucket in self.buckets:
            self.ranges += self._group_ranges(bucket)
        self._slice_states()
        self.group_dtypes: dict[int, set[torch.dtype]] = {}
        """The dtypes of each param group's parameters (groups without parameters are absent)."""
        for span in self.ranges:
            self.group_dtypes.setdefault(span.group, set()).add(span.bucket.plan.dtype)
        self._initialized = {bucket: torch.zeros(len(bucket.plan.slots), dtype=torch.uint8) for bucket in self.buckets}
        self._rebuild = False
        self._watched: list[tuple[int, int]] = []
        self._sentinels: list[tuple[torch.Tensor, int]] = []
        self.refresh(state)

    # ----- hot path -------------------------------------------------------
    def is_current(self) -> bool:
        """O(buckets + groups): has a parameter or state tensor been re-pointed since the last bind?

        Two cheap signals: the use count of every flat parameter and state storage (any bound
        tensor re-pointed elsewhere drops it), and sentinel parameters whose data pointer must be
        the bound one: the first and last of every group's range in a bucket (this catches
        whole-model changes such as ``model.half()`` even while other references keep the old
        flat views alive) and every parameter whose binding does not share the flat storage (NPU
        private formats), which the use counts cannot see. On the CPU the gradient reader also
        checks every parameter's address at every step.
        """
        for cdata, count in self._watched:
            if torch._C._storage_Use_Count(cdata) != count:
                return False
        for param, data_ptr in self._sentinels:
            if param.data_ptr() != data_ptr:
                return False
        for flat_storage, nbytes in self._sized:  # resized (freed) storage; CPU buffers cannot be
            if flat_storage.nbytes() != nbytes:
                return False
        return True

    def launch(self, groups: Sequence[dict[str, Any]], state: State) -> bool:
        """One update of every parameter that has a gradient. Returns False, having changed
        nothing, when a parameter turned out to have moved (reconcile, then launch again)."""
        self.check_names(groups, state)
        plans: list[tuple[FlatBucket, list[Run] | None]] = []
        for bucket in self.buckets:
            table = self._tables.get(bucket)
            if table is not None:
                if table.read() and not self._resolve_problems(bucket, table):
                    return False
                plans.append((bucket, None))
            else:
                runs = self._staged_runs(bucket)
                if runs is None:
                    return False
                plans.append((bucket, runs))
        started = []
        for bucket, runs in plans:
            if runs is None:
                started += self._launch_segments(bucket, groups)
            else:
                started += self._launch_runs(runs, groups)
        if started:
            self._start_state(started, state)
        return True

    def _launch_segments(self, bucket: FlatBucket, groups: Sequence[dict[str, Any]]) -> list[tuple[FlatBucket, int]]:
        launcher = self._segment_launchers[bucket]
        started = []
        for span in self.ranges:
            if span.bucket is bucket and span.grads is not None:
                if launcher(span.params, span.state, span.grads, groups[span.group]) and self.group_names[span.group]:
                    marked = (span.grads.initialized == 2).nonzero().flatten().tolist()
                    started += [(bucket, span.first + index) for index in marked]
        return started

    def _launch_runs(self, runs: list[Run], groups: Sequence[dict[str, Any]]) -> list[tuple[FlatBucket, int]]:
        started = []
        for run in runs:
            run.launcher(run.params, run.grads, run.state, groups[run.group], run.info())
            if run.first_step and self.group_names[run.group]:
                started += [(run.bucket, slot.position) for slot in run.slots]
        return started

    def launchers(self) -> dict[tuple[torch.device, torch.dtype], str]:
        """The launcher that updates each bucket: a segment launcher's name where gradients are read
        where they lie, else the flat launcher's."""
        return {
            (bucket.plan.device, bucket.plan.dtype): getattr(
                self._segment_launchers.get(bucket, self._launchers[bucket]), "__name__", "launcher"
            )
            for bucket in self.buckets
        }

    # ----- gradients (the fallback path, and binding) ---------------------------
    def _resolve_problems(self, bucket: FlatBucket, table: gradients.GradTable) -> bool:
        """Slots the reader could not serve in place: raise for a mismatched gradient, copy one with
        other strides into the flat gradient buffer, and report a moved parameter (False)."""
        problems = (table.status >= gradients.NEEDS_COPY).nonzero().flatten().tolist()
        slots = bucket.plan.slots
        if any(int(table.status[index]) == gradients.MOVED for index in problems):
            return False
        for index in problems:
            slot = slots[index]
            check_grad(slot, slot.param.grad)
        for index in problems:  # NEEDS_COPY: same shape, other strides
            slot = slots[index]
            bucket.view(bucket.grads, slot).copy_(slot.param.grad)
            table.ptrs[index] = bucket.address(bucket.grads, slot)
            table.status[index] = gradients.IN_PLACE
        return True

    def _staged_runs(self, bucket: FlatBucket) -> list[Run] | None:
        """Read every gradient from Python, check it, copy it into the flat gradient buffer unless it
        is bound there already, and return the flat runs over the slots that have one; None when
        a parameter is not where it was bound (its data pointer, checked here for every parameter)."""
        slots = bucket.plan.slots
        params = self._params[bucket]
        if [param.data_ptr() for param in params] != self._param_ptrs[bucket]:
            return None
        grads = [param.grad for param in params]
        for slot, grad in zip(slots, grads):
            if grad is not None:
                check_grad(slot, grad)
        initialized = self._initialized[bucket].tolist()
        # Runs split where a scalar state differs: a launcher sees one step count per run.
        scalars = list(zip(*(table.tolist() for table in bucket.scalars.values()))) or [()] * len(slots)
        pending: list[tuple[tuple[int, bool, tuple], list[Slot]]] = []
        previous = False
        for slot, grad, ready, values in zip(slots, grads, initialized, scalars):
            if grad is None:
                previous = False
                continue
            if not bucket.holds(bucket.grads, slot, grad):
                with torch.no_grad():
                    bucket.view(bucket.grads, slot).copy_(bucket.backend.match_param(slot.param, grad))
            key = (slot.group, not ready, values if ready else ())
            if previous and pending[-1][0] == key:
                pending[-1][1].append(slot)
            else:
                pending.append((key, [slot]))
            previous = True
        launcher = self._launchers[bucket]
        return [Run(group, launcher, bucket, run, first, self.group_names[group]) for (group, first, _), run in pending]

    def bind_grads(self, *, zero: bool = False) -> None:
        """Put every gradient in the flat gradient buffer and bind it there, so the buffer is the
        gradients (``get_combined_grads``, clipping, ``all_reduce_grads``, ``zero_grad(set_to_none=False)``).

        A gradient that owns its storage keeps its identity (``g.data`` is re-pointed, ``p.grad is g``
        holds); one that shares its storage (a view of another buffer) is copied and replaced by the
        slot's view, unless ``zero``, where it is zeroed in place as torch does and left where it is.
        A gradient in another NPU format than its parameter is replaced by the slot's view.
        Slots of parameters without a gradient hold zeros. ``zero=True`` zeroes the gradients
        (torch's ``zero_grad(set_to_none=False)``).
        """
        if self.grads_bound():  # the usual case: only the slots without a gradient to clear
            for bucket in self.buckets:
                self._zero_gradless_regions(bucket, everything=zero)
            return
        with torch.no_grad():
            for bucket in self.buckets:
                for slot in bucket.plan.slots:
                    grad = slot.param.grad
                    if grad is not None:
                        check_grad(slot, grad)
                for slot in bucket.plan.slots:
                    param, region = slot.param, bucket.region(bucket.grads, slot)
                    grad = param.grad
                    if grad is None:
                        region.zero_()
                        continue
                    if zero:
                        if grad.grad_fn is not None:
                            grad.detach_()
                        else:
                            grad.requires_grad_(False)
                    if bucket.holds(bucket.grads, slot, grad):
                        if zero:
                            region.zero_()
                        continue
                    view = bucket.view(bucket.grads, slot)
                    if zero:
                        view.zero_()
                    else:
                        view.copy_(bucket.backend.match_param(param, grad))
                    same_format = bucket.backend.layout_of(grad) == bucket.backend.layout_of(view)
                    if same_format and sole_owner(grad):
                        grad.data = view
                    elif same_format and zero:
                        grad.zero_()
                    else:  # shared storage, or (NPU) another format than its parameter's
                        param.grad = view

    def read_grads(self, bucket: FlatBucket) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every slot's gradient address and has-gradient flag (int64, int8), read where the
        gradients lie, or None where that cannot be had (no CPU reader, or a gradient that needs a
        copy or is wrong: :meth:`bind_grads` then deals with it)."""
        table = self._tables.get(bucket)
        if table is None or table.read():
            return None
        return table.ptrs, table.status

    def grads_bound(self) -> bool:
        """Whether every gradient is its slot's view of the flat gradient buffer (or None)."""
        for bucket in self.buckets:
            table = self._tables.get(bucket)
            if table is not None:
                if table.read():
                    return False
                has_grad = table.status == gradients.IN_PLACE
                if not bucket.grads_allocated:
                    if bool(has_grad.any()):
                        return False
                elif bool(((table.ptrs != bucket.grad_addresses()) & has_grad & (bucket.numels > 0)).any()):
                    return False
                continue
            if not bucket.grads_allocated:
                if any(slot.param.grad is not None for slot in bucket.plan.slots):
                    return False
                continue
            for slot in bucket.plan.slots:
                grad = slot.param.grad
                if grad is not None and not bucket.holds(bucket.grads, slot, grad):
                    return False
        return True

    def _zero_gradless_regions(self, bucket: FlatBucket, *, everything: bool) -> None:
        if everything:
            bucket.grads.zero_()
            return
        table = self._tables.get(bucket)
        if table is not None:  # read by grads_bound just now
            gradless = (table.status == gradients.NO_GRAD).nonzero().flatten().tolist()
            slots = [bucket.plan.slots[index] for index in gradless]
        else:
            slots = [slot for slot in bucket.plan.slots if slot.param.grad is None]
        for slot in slots:
            bucket.region(bucket.grads, slot).zero_()

    def clear_grads(self) -> None:
        """``p.grad = None`` for every parameter (one C++ call per bucket where the reader is loaded)."""
        for bucket in self.buckets:
            table = self._tables.get(bucket)
            if table is not None:
                table.clear()
            else:
                for slot in bucket.plan.slots:
                    slot.param.grad = None

    # ----- cold path ------------------------------------------------------
    def refresh(self, state: State) -> None:
        """Recompute which slots have initialised state (every name their group uses; trivially
        so for a group that uses none), the sentinels and the use-count snapshot."""
        for bucket in self.buckets:
            ready = []
            for slot in bucket.plan.slots:
                values = state.get(slot.param, {})
                ready.append(all(values.get(name) is not None for name in self.group_names[slot.group]))
            self._initialized[bucket].copy_(torch.tensor(ready, dtype=torch.uint8))
        for span in self.ranges:
            table = self._tables.get(span.bucket)
            if table is None:
                continue
            first, last = span.first, span.last
            offsets = span.bucket.offsets[first:last]
            span.grads = GradSegments(
                ptrs=table.ptrs[first:last],
                has_grad=table.status[first:last],
                offsets=offsets - (offsets[0] if last > first else 0),
                numels=span.bucket.numels[first:last],
                initialized=self._initialized[span.bucket][first:last],
            )
        self._params = {
            bucket: [slot.param for slot in bucket.plan.slots] for bucket in self.buckets if bucket not in self._tables
        }
        self._param_ptrs = {bucket: [param.data_ptr() for param in params] for bucket, params in self._params.items()}
        watched = {slot for span in self.ranges for slot in self._range_slots(span)} | self._unshared
        self._sentinels = [(slot.param, slot.param.data_ptr()) for slot in watched]
        self.snapshot()

    def snapshot(self) -> None:
        """Take the use counts of the flat parameter and state storages anew."""
        self._sized = [  # CPU flat buffers cannot be resized (see fused_core.backends.CpuBackend)
            (buffer.untyped_storage(), buffer.untyped_storage().nbytes())
            for bucket in self.buckets
            if bucket.plan.device.type != "cpu"
            for buffer in bucket.watched_buffers
        ]
        cdatas = [buffer.untyped_storage()._cdata for bucket in self.buckets for buffer in bucket.watched_buffers]
        self._watched = [(cdata, torch._C._storage_Use_Count(cdata)) for cdata in cdatas]

    def _start_state(self, started: Sequence[tuple[FlatBucket, int]], state: State) -> None:
        """After a first step over these slots: expose their state slots as per-parameter state tensors."""
        for bucket, index in started:
            slot = bucket.plan.slots[index]
            values = state[slot.param]
            for name in self.group_names[slot.group]:
                if name in bucket.scalars:
                    values[name] = bucket.scalar_view(name, index)
                else:
                    values[name] = bucket.view(bucket.state[name], slot)
            self._initialized[bucket][index] = 1
        self.snapshot()

    def force_rebuild(self) -> None:
        """Make the next :meth:`reconcile` return False (``param_groups`` changed)."""
        self._rebuild = True

    def release(self, successor: Layout, state: State) -> None:
        """Give the parameters this layout held and ``successor`` does not (removed from
        ``param_groups``) their own memory, and their state its own, so that they do not keep
        this layout's flat buffers alive."""
        kept = {slot.param for bucket in successor.buckets for slot in bucket.plan.slots}
        with torch.no_grad():
            for bucket in self.buckets:
                flats = {flat.untyped_storage().data_ptr() for flat in bucket.watched_buffers}
                for slot in bucket.plan.slots:
                    param = slot.param
                    if param in kept:
                        continue
                    if param.untyped_storage().data_ptr() in flats:
                        param.data = param.data.clone()
                    values = state.get(param, {})
                    for name, value in values.items():
                        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in flats:
                            values[name] = value.clone()

    def reconcile(self, state: State) -> bool:
        """Re-adopt whatever was re-pointed. False when the layout must be rebuilt instead."""
        if self._rebuild:
            return False
        self._check_flat_storages()
        self._check_complete(state, [slot for bucket in self.buckets for slot in bucket.plan.slots], self.group_names)
        readopt_params, readopt_states = [], []
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
                values = state.get(param, {})
                for name in self.state_names:
                    value = values.get(name)
                    flat = bucket.state.get(name)
                    if value is not None and (flat is None or not bucket.holds(flat, slot, value)):
                        self._check_state(slot, name, value)
                        readopt_states.append((bucket, slot))
                for name in self.scalar_names:
                    value = values.get(name)
                    if value is not None and not bucket.holds_scalar(name, slot.position, value):
                        self._check_scalar(slot, name, value)
                        readopt_states.append((bucket, slot))
        if readopt_params:
            slots = [slot for bucket in self.buckets for slot in bucket.plan.slots]
            storage.check_not_shared(slots)
            storage.check_disjoint(slots)
            storage.check_not_viewed(slots, self.reserves)
        flat_storages = {bucket.params.untyped_storage().data_ptr() for bucket in self.buckets}
        for _bucket, slot in readopt_params:
            if slot.param.untyped_storage().data_ptr() in flat_storages:  # e.g. .data swapped between
                slot.param.data = slot.param.data.clone()  # two parameters: keep its values first
        for bucket, slot in readopt_params:
            self._bind_param(bucket, slot)
        for bucket, slot in readopt_states:
            bucket.allocate_state(self._used_names(bucket, state))
            self._bind_states(bucket, slot, state)
        if readopt_states:
            self._slice_states()
        for bucket, table in self._tables.items():
            table.param_ptrs.copy_(torch.tensor([bucket.address(bucket.params, slot) for slot in bucket.plan.slots]))
        self.refresh(state)
        return True

    def _check_flat_storages(self) -> None:
        """Raise when a flat buffer's storage was resized or moved to shared memory, naming a
        parameter bound there: it cannot be repaired by re-adopting one parameter."""
        for bucket in self.buckets:
            slot = bucket.plan.slots[0]
            for buffer in bucket.watched_buffers:
                flat_storage = buffer.untyped_storage()
                if flat_storage.nbytes() != buffer.numel() * buffer.element_size():
                    raise RuntimeError(
                        f"the storage of {slot.describe()} was resized (untyped_storage().resize_()): it is the "
                        f"flat buffer of all {len(bucket.plan.slots)} parameters of its bucket, whose values "
                        "are lost. Freeing and refilling parameter storage (FSDP, offloading) is not "
                        "supported by fused optimizers"
                    )
            if bucket.plan.device.type == "cpu" and bucket.params.untyped_storage().is_shared():
                storage.check_not_shared(bucket.plan.slots)

    def check_names(self, groups: Sequence[dict[str, Any]], state: State) -> None:
        """O(groups): honour a param group whose hyperparameters now use other state names (momentum
        or amsgrad switched on or off): allocate what it needs and recompute which of its slots are
        initialised. A slot initialised for some of the group's new names but not all raises, as
        torch does (KeyError), before anything changes."""
        changed = [index for index, group in enumerate(groups) if self._names(group) != self.group_names[index]]
        if not changed:
            return
        names = list(self.group_names)
        for index in changed:
            names[index] = self._names(groups[index])
        slots = [slot for span in self.ranges if span.group in changed for slot in self._range_all_slots(span)]
        self._check_complete(state, slots, names)
        for index in changed:
            self.group_names[index] = names[index]
        for span in self.ranges:
            if span.group in names:
                span.bucket.allocate_state(names[span.group])
        self._slice_states()
        self.refresh(state)

    @staticmethod
    def _check_complete(state: State, slots: Sequence[Slot], names: Sequence[tuple[str, ...]]) -> None:
        """Raise when one of ``slots`` keeps some but not all of the names its group uses (``names``, by group)."""
        for slot in slots:
            values = state.get(slot.param, {})
            wanted = names[slot.group]
            missing = [name for name in wanted if values.get(name) is None]
            if missing and len(missing) < len(wanted):
                raise InvalidHyperparameterError(
                    f"{slot.describe()} has optimizer state but no {', '.join(map(repr, missing))}, which the "
                    f"hyperparameters of param group {slot.group} now use (a hyperparameter that adds state, "
                    "such as amsgrad, was switched on after the first step, or a state_dict saved without it was "
                    "loaded). torch.optim fails here too (KeyError). Build the optimizer with it from the start, "
                    "or load a state_dict that has it. Nothing was updated"
                )

    def _names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return tuple(self.names_for(group))

    def _used_names(self, bucket: FlatBucket, state: State) -> set[str]:
        """The state buffers ``bucket`` needs: those its groups use and those its parameters already have."""
        used = {name for index in {slot.group for slot in bucket.plan.slots} for name in self.group_names[index]}
        for slot in bucket.plan.slots:
            values = state.get(slot.param) or {}
            used.update(name for name in self.state_names if values.get(name) is not None)
        return used

    def state_buffer(self, name: str, bucket: FlatBucket) -> torch.Tensor:
        """The flat buffer of state ``name`` in ``bucket`` (a scalar state: its table, one value per
        slot), allocated (zeros) if no group used it yet."""
        if name in bucket.scalars:
            return bucket.scalars[name]
        if bucket.allocate_state([name]):
            self._slice_states()
            self.snapshot()
        return bucket.state[name]

    # ----- helpers --------------------------------------------------------
    def _slice_states(self) -> None:
        for span in self.ranges:
            span.slice_state(self.group_names[span.group])

    def _group_ranges(self, bucket: FlatBucket) -> list[GroupRange]:
        ranges: list[GroupRange] = []
        slots = bucket.plan.slots
        first = 0
        for index in range(1, len(slots) + 1):
            if index == len(slots) or slots[index].group != slots[first].group:
                start, end = slots[first].offset, slots[index - 1].end
                ranges.append(GroupRange(slots[first].group, bucket, first, index, bucket.params[start:end]))
                first = index
        return ranges

    @staticmethod
    def _range_all_slots(span: GroupRange) -> list[Slot]:
        return span.bucket.plan.slots[span.first : span.last]

    @staticmethod
    def _range_slots(span: GroupRange) -> tuple[Slot, ...]:
        slots = span.bucket.plan.slots
        return (slots[span.first], slots[span.last - 1])

    def _bind_param(self, bucket: FlatBucket, slot: Slot) -> None:
        """Bind a parameter; one whose binding the storage use count cannot watch becomes a sentinel."""
        self._formats[slot] = bucket.backend.layout_of(slot.param)
        if bucket.bind_param(slot):
            self._unshared.discard(slot)
        else:
            self._unshared.add(slot)

    def _check_states(self, slot: Slot, state: State) -> None:
        values = state.get(slot.param, {})
        for name in self.state_names:
            if values.get(name) is not None:
                self._check_state(slot, name, values[name])
        for name in self.scalar_names:
            if values.get(name) is not None:
                self._check_scalar(slot, name, values[name])

    @staticmethod
    def _check_scalar(slot: Slot, name: str, value: Any) -> None:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric and not (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()):
            got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidParameterError(f"state '{name}' of {slot.describe()} is {got}, expected a number")

    @staticmethod
    def _check_state(slot: Slot, name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor) or value.shape != slot.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidParameterError(f"state '{name}' of {slot.describe()} is {got}, expected a tensor of its shape")

    def _bind_states(self, bucket: FlatBucket, slot: Slot, state: State) -> None:
        """Adopt the state tensors the parameter already has into their slots."""
        values = state.get(slot.param, {})
        for name in self.state_names:
            if values.get(name) is not None:
                values[name] = bucket.bind_state(name, slot, values[name])
        for name in self.scalar_names:
            if values.get(name) is not None:
                values[name] = bucket.bind_scalar(name, slot.position, values[name])
