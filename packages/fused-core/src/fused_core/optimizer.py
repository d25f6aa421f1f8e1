"""FusedOptimizer: the ``torch.optim.Optimizer`` subclass every plugin builds on.

A plugin subclass declares four class attributes and, usually, a constructor
with its public signature::

    class FusedSGD(FusedOptimizer):
        name = "sgd"                       # the registry name
        hyperparameters = SGDHyperparams   # pydantic model checking each param group
        kernel = "sgd"                     # kernel name in the launch registry
        state_names = ("momentum_buffer",) # per-parameter state, laid out like the params
        plugin = "fused_sgd.plugin"        # module whose hooks register the kernels

Everything else (bucketing, flat buffers, re-allocation detection, kernel
dispatch) lives here and in the modules it uses. On the first ``step()`` the
parameters move into flat buffers; after that a step is the staleness check,
the ``param_groups`` check (:mod:`~fused_core.groups`: O(groups), hyperparameters a
scheduler assigned validated again) and one launcher call per (bucket, param group),
with no per-parameter work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch.optim.optimizer import required

from . import grad_norm
from .backends import get_backend
from .distributed import is_dtensor
from .errors import HyperparameterOverflowError, InvalidHyperparameterError, InvalidParameterError
from .groups import GroupsSnapshot, overflowing, watch_params
from .hyperparams import validate_group
from .layout import Layout
from .plugins import registry
from .sharded import LocalShards, LocalState, check_placements, local_shard


def compact_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """state_dict post-hook (run before the user's): per-parameter state tensors are views of flat
    buffers, as live as torch's own tensors. ``torch.save`` writes a view's whole storage, so where
    the views of one storage do not cover it (parameters without state, alignment gaps, a partial
    state_dict) they are cloned: a checkpoint never holds more bytes than torch's. DTensor values
    (the state of DTensor parameters) are always cloned: torch cannot deep-copy DTensors whose local
    shards share a storage ("invalid python storage"), and ``copy.deepcopy(optimizer.state_dict())``
    must work as with torch's optimizers. Entries that are not dicts, and values that are not
    tensors (torch allows anything there), are left as they are."""
    views: dict[tuple[torch.device, int], list[tuple[Any, str, torch.Tensor]]] = {}
    for key, values in state_dict["state"].items():
        if not isinstance(values, dict):
            continue
        for name, value in values.items():
            if is_dtensor(value):
                state_dict["state"][key] = {**state_dict["state"][key], name: value.clone()}
            elif isinstance(value, torch.Tensor) and value.layout == torch.strided:
                storage = value.untyped_storage()
                views.setdefault((value.device, storage.data_ptr()), []).append((key, name, value))
    for shared in views.values():
        storage_bytes = shared[0][2].untyped_storage().nbytes()
        if sum(value.numel() * value.element_size() for _, _, value in shared) < storage_bytes:
            for key, name, value in shared:
                state_dict["state"][key] = {**state_dict["state"][key], name: value.clone()}
    return state_dict


class FusedOptimizer(torch.optim.Optimizer):
    name: ClassVar[str]
    hyperparameters: ClassVar[type[BaseModel]]
    kernel: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]] = ()
    scalar_state_names: ClassVar[tuple[str, ...]] = ()
    plugin: ClassVar[str | None] = None
    elementwise: ClassVar[bool] = True
    """Whether the update is element-wise given the step's scalars (SGD, Adam, RMSprop, Lion), so
    that stepping each rank's local shard of a DTensor parameter is stepping the parameter
    (:mod:`fused_core.sharded`). False for updates that reduce over a parameter (Lamb's trust
    ratio): their optimizers refuse DTensor parameters."""
    group_defaults: ClassVar[Mapping[str, Any]] = {}
    """Keys a param group saved by an older version may lack, and what they mean then (torch.optim's
    ``__setstate__`` fills the same: ``maximize=False``, ``foreach=None``, ...): filled in when a
    state is loaded or unpickled."""

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if self.plugin is not None:
            registry.register_plugin(self.plugin)
        self._layout: Layout | None = None
        self._shards: LocalShards | None = None
        self._reconcile_needed = False
        self._groups: GroupsSnapshot | None = None
        self._scalars_checked_for: Layout | None = None
        validate_group(
            self.hyperparameters,
            {key: value for key, value in defaults.items() if value is not required},
            where=f"{type(self).__name__} defaults",
            partial=True,
        )
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(compact_state, prepend=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Param groups saved without some of :attr:`group_defaults`' keys (an older torch) get them
        first, as torch's optimizers' ``__setstate__`` fill them."""
        for group in state.get("param_groups", []):
            for key, value in self.group_defaults.items():
                group.setdefault(key, value)
        super().__setstate__(state)
        if "_layout" not in self.__dict__:  # unpickled, not reloaded: hooks were not pickled
            self._layout = None
            self._shards = None
            self.register_state_dict_post_hook(compact_state, prepend=True)
        self._reconcile_needed = True
        if "_groups" not in self.__dict__:  # unpickled: checked in full at the next step
            self._groups = None
            self._scalars_checked_for = None
        for group in self.param_groups:
            if isinstance(group, dict) and isinstance(group.get("params"), list):
                watch_params(group)

    # ----- what plugins may override -------------------------------------
    def state_names_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state a parameter of this param group keeps, in the order torch's state_dict lists it:
        names from :attr:`scalar_state_names` and :attr:`state_names`. Default: all of them. SGD
        keeps ``momentum_buffer`` only when momentum != 0, Adam ``max_exp_avg_sq`` only with
        amsgrad, as torch. Read at every step: a group whose names change is honoured at the next."""
        return self.scalar_state_names + self.state_names

    def converted_scalars(self, group: dict[str, Any]) -> dict[str, float]:
        """The hyperparameter values (by the name error messages give them) that the torch
        optimizer's step converts to the parameters' dtype, and so refuses when they overflow it
        (``add_(x, alpha=value)``). Checked before any update when a group's hyperparameters
        change; none by default."""
        return {}

    # ----- param groups ---------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, with hyperparameters and parameters validated first."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        index = len(self.param_groups)
        where = f"{type(self).__name__} param group {index}"
        merged = {key: value for key, value in self.defaults.items() if value is not required}
        merged.update({key: value for key, value in param_group.items() if key != "params"})
        validate_group(self.hyperparameters, merged, where=where)
        super().add_param_group(param_group)
        watch_params(self.param_groups[-1])
        try:
            self._check_group_params(index, self.param_groups[-1]["params"], {})
        except Exception:
            self.param_groups.pop()
            raise
        self._drop_layout()

    def _check_group_params(self, index: int, params: Any, seen: dict[int, tuple[int, int]]) -> None:
        """Check every parameter of param group ``index`` (a tensor of a dtype and device that can
        live in a flat buffer), and that none is already in ``seen`` (``id`` -> group, position:
        the parameters of the groups checked before, to which this group's are added)."""
        where = f"{type(self).__name__} param group {index}"
        for position, param in enumerate(params):
            here = f"{where}, parameter {position}"
            if not isinstance(param, torch.Tensor):
                raise InvalidParameterError(f"{here}: is a {type(param).__name__}, not a tensor")
            self._check_param(param, here)
            if id(param) in seen:
                group, first = seen[id(param)]
                other = f"parameter {first}" if group == index else f"param group {group}, parameter {first}"
                raise InvalidParameterError(
                    f"{here}: the same tensor as {other}; a parameter can live in a flat buffer only once "
                    "(torch.optim would step it twice). Remove one of the two"
                )
            seen[id(param)] = (index, position)

    def _check_param(self, param: torch.Tensor, where: str) -> None:
        if is_dtensor(param):
            if not self.elementwise:
                raise InvalidParameterError(
                    f"{where}: is a DTensor (FSDP2's fully_shard or tensor parallelism), and "
                    f"{type(self).__name__}'s update reduces over each whole parameter, which one rank's "
                    "local shard is not. Use an element-wise fused optimizer (FusedSGD, FusedAdamW, ...) or "
                    "torch.optim for sharded parameters (docs/distributed.md)"
                )
            check_placements(param, where)
            param = local_shard(param)
        if not param.is_floating_point():
            raise InvalidParameterError(f"{where}: dtype {param.dtype} is not a real floating-point dtype")
        if param.is_meta:
            raise InvalidParameterError(f"{where}: is on the meta device, which holds no data to optimize")
        if param.is_sparse:
            raise InvalidParameterError(f"{where}: sparse parameters cannot live in a flat buffer")
        try:
            get_backend(param.device)
        except InvalidParameterError as error:
            raise InvalidParameterError(f"{where}: {error}") from None

    # ----- the step ---------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        edited = self._edited_hyperparameters()
        layout = self._checked_layout(edited)
        values = self.step_values()
        groups = [{**group, **values} for group in self.param_groups] if values else self.param_groups
        if not self._launch(layout, groups):
            self._reconcile_needed = True  # a parameter moved: re-adopt it, then step
            if not self._launch(self._checked_layout(edited), groups):
                raise RuntimeError("fused_core: a parameter moved again while its layout was rebuilt")
        return loss

    def _launch(self, layout: Layout, groups: list[dict[str, Any]]) -> bool:
        """``layout.launch``; DTensor parameters' local shards hold their gradients' local shards
        during it (:mod:`fused_core.sharded`)."""
        shards = self._shards
        if shards is None:
            return layout.launch(groups, self.state)
        shards.lend_grads()
        try:
            return layout.launch(groups, LocalState(self.state, shards))
        finally:
            shards.take_back_grads()

    def _layout_state(self, shards: LocalShards | None) -> Any:
        """``self.state`` as a layout over ``shards``' local shards sees it."""
        return self.state if shards is None else LocalState(self.state, shards)

    def step_values(self) -> dict[str, Any]:
        """Values computed once per step, before any launch, that every launcher of this step
        reads from its ``hyperparams`` beside the param group's own entries (Lamb's global
        gradient norm, from :meth:`grad_norm`). Default: none. They are never stored in
        ``param_groups`` (nor in ``state_dict()``); a name must not be a hyperparameter's."""
        return {}

    def _edited_hyperparameters(self) -> list[int]:
        """Check ``param_groups`` as it is now, before anything moves: a changed structure
        (:meth:`_check_structure`), then the hyperparameters of every group assigned since the
        last step, in full (a scheduler's new ``lr``, a string written by mistake). Returns
        those groups' indices; they are recorded as checked once the step's scalars pass too."""
        snapshot = self._check_structure()
        edited = snapshot.changed_hyperparameters(self.param_groups)
        name = type(self).__name__
        for index in edited:
            group = self.param_groups[index]
            fields = self.hyperparameters.model_fields
            missing = [key for key in self.defaults if key not in group and key in fields]
            if missing:
                raise InvalidHyperparameterError(
                    f"{name} param group {index} has no {', '.join(map(repr, missing))}; add groups with "
                    "optimizer.add_param_group(), which fills in the defaults"
                )
            validate_group(self.hyperparameters, group, where=f"{name} param group {index}")
        return edited

    def _checked_layout(self, edited: list[int]) -> Layout:
        """The current layout, once the edited groups' scalars (every group's, for a new layout:
        the dtypes may have changed) fit their parameters' dtypes."""
        layout = self._current_layout()
        groups = range(len(self.param_groups)) if layout is not self._scalars_checked_for else edited
        name = type(self).__name__
        for index in groups:
            scalars = self.converted_scalars(self.param_groups[index]).items()
            for dtype in layout.group_dtypes.get(index, ()):
                for label, value in scalars:
                    if overflowing(value, dtype):
                        raise HyperparameterOverflowError(
                            f"{name} param group {index}: {label}={value!r} cannot be converted to {dtype} "
                            f"(largest {torch.finfo(dtype).max:.6g}) without overflow; torch.optim's step raises "
                            "the same. Nothing was updated"
                        )
        assert self._groups is not None
        self._groups.accept(self.param_groups, groups)
        self._scalars_checked_for = layout
        return layout

    def _check_structure(self) -> GroupsSnapshot:
        """O(groups): when a group's parameters, or the groups themselves, were edited in place
        (appended, removed, replaced, moved, reordered, a raw dict appended), check every group
        as ``add_param_group`` does and rebuild the layout at the next use; the state of every
        parameter follows it by identity, as in torch."""
        snapshot = self._groups
        if snapshot is not None and snapshot.same_structure(self.param_groups):
            return snapshot
        seen: dict[int, tuple[int, int]] = {}
        for index, group in enumerate(self.param_groups):
            if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)):
                raise InvalidParameterError(
                    f"{type(self).__name__} param group {index} is not a dict with a list of tensors under "
                    "'params'; add groups with optimizer.add_param_group(), which also fills in the default "
                    "hyperparameters"
                )
            self._check_group_params(index, group["params"], seen)
        if self._layout is not None:
            self._drop_layout()
        self._groups = GroupsSnapshot(self.param_groups)
        return self._groups

    def invalidate_layout(self) -> None:
        """Lay the parameters out afresh at the next use (step, ``zero_grad``, ``get_combined_*``),
        state carried over by identity. Never needed for what torch users do (re-allocation and
        ``param_groups`` edits are detected); for a plugin or tool that changes what the layout
        depends on in a way no check can see."""
        self._drop_layout()

    def _drop_layout(self) -> None:
        """Rebuild the layout at the next step (``param_groups`` changed), with the state of every
        parameter carried over by identity; parameters no longer in any group then get their
        own memory back (:meth:`~fused_core.layout.Layout.release`)."""
        self._reconcile_needed = True
        if self._layout is not None:
            self._layout.force_rebuild()

    def _current_layout(self) -> Layout:
        self._check_structure()
        layout, shards = self._layout, self._shards
        if layout is not None and not self._reconcile_needed and layout.is_current():
            return layout
        if layout is not None and shards is not None and not shards.unchanged():
            layout.force_rebuild()  # FSDP2 was given new local shards
        if layout is None or not layout.reconcile(self._layout_state(shards)):
            previous, previous_shards = layout, shards
            shards = LocalShards(self.param_groups, self.state_names) or None
            layout = Layout(
                shards.local_groups(self.param_groups) if shards else self.param_groups,
                self._layout_state(shards),
                kernel=self.kernel,
                state_names=self.state_names,
                registry=registry.kernels,
                names_for=self.state_names_for,
                scalar_names=self.scalar_state_names,
                reserves=shards.reserves() if shards else None,
            )
            if previous is not None:
                previous.release(layout, self._layout_state(previous_shards))
                if previous_shards is not None:
                    previous_shards.follow()
            self._layout, self._shards = layout, shards
        if shards is not None and shards.follow():
            layout.snapshot()
        self._reconcile_needed = False
        return layout

    def _refuse_sharded(self, what: str, instead: str) -> None:
        """Raise where a fused extra would read DTensor parameters' gradients as if unsharded."""
        if self._shards is not None:
            raise InvalidParameterError(
                f"{type(self).__name__}.{what}: this optimizer's parameters include DTensors (FSDP2's "
                f"fully_shard, tensor parallelism), whose gradients are sharded across ranks. {instead}"
            )

    # ----- fused extras (torch_npu's names) ---------------------------------
    @torch.no_grad()
    def clip_grad_norm_fused_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        r"""``torch.nn.utils.clip_grad_norm_`` over this optimizer's gradients, one reduction per bucket.

        .. math:: n = \lVert (\lVert g_b \rVert_p)_b \rVert_p, \qquad
                  g \leftarrow g \cdot \min\left(\frac{\text{max\_norm}}{n + 10^{-6}}, 1\right)

        where :math:`g_b` is bucket :math:`b`'s gradients (parameters without one count as zeros).
        The norms and the coefficient are computed in fp32 or wider (:mod:`fused_core.grad_norm`);
        the returned total norm :math:`n` has the gradients' dtype, as torch's. ``norm_type`` may
        be ``inf``. On the CPU the 2- and inf-norms read the gradients where they lie; otherwise
        they are bound to the flat gradient buffer first (:meth:`~fused_core.layout.Layout.bind_grads`).
        """
        layout = self._current_layout()
        self._refuse_sharded(
            "clip_grad_norm_fused_", "Use torch.nn.utils.clip_grad_norm_, which reduces over the ranks"
        )
        if not layout.buckets:
            return torch.tensor(0.0)
        total, read = self._grad_norm(layout, float(norm_type))
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(
                f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot be clipped"
            )
        coefficient = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for bucket, where in zip(layout.buckets, read):
            if where is not None:
                grad_norm.segments_scale_(where[0], bucket.numels, where[1], bucket.plan.dtype, coefficient)
            else:
                grad_norm.scale_(bucket.grads, coefficient)
        return total.to(layout.buckets[0].plan.dtype)

    @torch.no_grad()
    def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        r"""The total ``norm_type`` norm of this optimizer's gradients, as
        :meth:`clip_grad_norm_fused_` computes it, without scaling anything: a 0-d tensor in fp32
        (fp64 where a bucket is fp64) on the first bucket's device. Parameters without a gradient
        count as zeros. For plugins whose update needs it (Lamb's global gradient-norm clipping,
        through :meth:`step_values`)."""
        layout = self._current_layout()
        self._refuse_sharded("grad_norm", "Use torch.nn.utils.get_total_norm, which reduces over the ranks")
        if not layout.buckets:
            return torch.tensor(0.0)
        return self._grad_norm(layout, float(norm_type))[0]

    def _grad_norm(self, layout: Layout, norm_type: float) -> tuple[torch.Tensor, list[Any]]:
        """The total norm over every bucket, and where each bucket's gradients were read (their
        addresses, or None where they were bound to the flat gradient buffer instead)."""
        serve = grad_norm.segments_serve
        read = [
            layout.read_grads(bucket) if serve(bucket.plan.device, bucket.plan.dtype, norm_type) else None
            for bucket in layout.buckets
        ]
        if not all(where is not None for where in read):
            layout.bind_grads()
            read = [None] * len(read)
        norms = []
        for bucket, where in zip(layout.buckets, read):
            if where is not None:
                norms.append(grad_norm.segments_norm(where[0], bucket.numels, where[1], bucket.plan.dtype, norm_type))
            else:
                norms.append(grad_norm.bucket_norm(bucket, norm_type))
        first_device = layout.buckets[0].plan.device
        norms = [norm.to(first_device) for norm in norms]
        widest = max((norm.dtype for norm in norms), key=lambda dtype: torch.finfo(dtype).bits)
        return torch.linalg.vector_norm(torch.stack([norm.to(widest) for norm in norms]), norm_type), read

    def launchers(self) -> dict[tuple[torch.device, torch.dtype], str]:
        """Which launcher updates each (device, dtype) bucket, by name (``sgd_c_segments`` reads every
        gradient where it lies; see docs/kernels.md): what a benchmark or a bug report should say."""
        return self._current_layout().launchers()

    def get_combined_params(self) -> list[torch.Tensor]:
        """The flat parameter buffer of every bucket (torch_npu's ``get_combined_params``)."""
        return [bucket.params for bucket in self._current_layout().buckets]

    def get_combined_grads(self) -> list[torch.Tensor]:
        """The flat gradient buffer of every bucket; slots of parameters without a gradient hold zeros.

        Binds every gradient there first (see :meth:`~fused_core.layout.Layout.bind_grads`): the
        buffers are the gradients until autograd or the user replaces them."""
        layout = self._current_layout()
        self._refuse_sharded("get_combined_grads", "Their local shards are each parameter's .grad.to_local()")
        layout.bind_grads()
        return [bucket.grads for bucket in layout.buckets]

    def get_combined_state(self, name: str) -> list[torch.Tensor]:
        """The flat buffer of state ``name`` (e.g. ``"momentum_buffer"``) of every bucket."""
        layout = self._current_layout()
        return [layout.state_buffer(name, bucket) for bucket in layout.buckets]

    # ----- around the step ------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as ``torch.optim.Optimizer.zero_grad``: by default every ``.grad``
        becomes None (a parameter left without one is skipped by the next step). Where nothing
        moved, ``set_to_none=True`` is one C++ call per bucket on the CPU, and
        ``set_to_none=False`` one fill per bucket once the gradients are bound to the flat buffer
        (the first such call binds them: see :meth:`~fused_core.layout.Layout.bind_grads`)."""
        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            layout = self._layout
            edited = self._groups is None or not self._groups.same_structure(self.param_groups)
            sharded = self._shards is not None  # torch's zero_grad over the DTensor gradients
            if layout is None or edited or sharded or self._reconcile_needed or not layout.is_current():
                self._zero_grad_as_torch(set_to_none)
            elif set_to_none:
                layout.clear_grads()
            elif layout.grads_bound():
                for bucket in layout.buckets:
                    if bucket.grads_allocated:
                        bucket.grads.zero_()
            else:
                layout.bind_grads(zero=True)

    def _zero_grad_as_torch(self, set_to_none: bool) -> None:
        """torch's own zero_grad (for a layout about to be rebuilt), without its second profiler record."""
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if set_to_none:
                        param.grad = None
                        continue
                    if param.grad.grad_fn is not None:
                        param.grad.detach_()
                    else:
                        param.grad.requires_grad_(False)
                    param.grad.zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, after validating the saved hyperparameters; the loaded
        state is copied into the flat buffers at the next step."""
        for index, group in enumerate(state_dict.get("param_groups", [])):
            saved = {key: value for key, value in group.items() if key != "params"}
            validate_group(self.hyperparameters, saved, where=f"state_dict param group {index}", partial=True)
        super().load_state_dict(state_dict)
        self._reconcile_needed = True


class KeepsGradients:
    """Mixin for the optimizers under torch_npu's names (``class NpuFusedX(KeepsGradients, FusedX)``):
    ``zero_grad()`` defaults to ``set_to_none=False``, as torch_npu's fused optimizers do, so the
    gradients are kept, zeroed (after the first call they live in the flat gradient buffer, and
    this is one fill per bucket). ``set_to_none=True`` is torch's default."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)  # type: ignore[misc]
