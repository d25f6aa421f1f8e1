"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): stepped through their local shards.

A DTensor parameter ``p`` is a wrapper: its values on this rank are a plain tensor, its local
shard ``L``. A fused optimizer lays out ``L`` as it lays out any parameter (its storage moves to a
slot of a flat buffer; ``L`` keeps its identity, so ``p`` still wraps it) and steps it with the
same launchers, with no DTensor dispatch in the step. Per parameter and step, on the local shards:

.. math:: \\theta_L \\leftarrow \\text{update}(\\theta_L, g_L, s_L)

where :math:`g_L` is the local shard of ``p.grad`` and :math:`s_L` the local shards of the state.
For an element-wise update that is the update of the whole DTensor, which is what torch's
optimizers compute over DTensors, element for element. Updates that reduce over a parameter
(Lamb's trust ratio, AdamP's projection, BertAdam's per-parameter clipping) would reduce over one
rank's shard only, so their optimizers refuse DTensor parameters (:attr:`FusedOptimizer.elementwise`).

What this module keeps in step with the layout:

* **FSDP2's padded shard.** FSDP2 all-gathers from a padded 1-D tensor whose first elements are
  ``L`` (the shard of dim 0, padded so every rank's is the same size). It is re-pointed to the
  same place as ``L`` (the slot reserves the padding), so every all-gather reads the stepped
  values. Anything else holding ``L``'s old storage is refused as for any parameter.
* **Gradients.** Before a launch every ``L.grad`` is set to the local shard of ``p.grad`` (None
  where ``p.grad`` is), after it back to None: the layout reads gradients as usual, and no
  gradient is kept alive past the step.
* **State.** ``optimizer.state[p]`` holds DTensors with ``p``'s mesh and placements over the flat
  state slots, as torch's optimizers keep DTensor state: ``state_dict()``,
  ``torch.distributed.checkpoint`` and ``load_state_dict`` see torch's format. The layout sees
  the same state through :class:`LocalState`, keyed by the local shards and unwrapped.

FSDP2 keeps the padded shard in a private attribute of its private ``FSDPParam``, the one place
this module reads torch internals (:func:`fsdp_padded_shards`); the local shard is DTensor's
``_local_tensor`` (``to_local()`` returns a new alias, which a re-pointing would not reach).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import torch

from . import gradients, storage
from .buckets import param_name
from .distributed import is_dtensor
from .errors import InvalidParameterError

FSDP_PARAM_MODULES = (
    "torch.distributed.fsdp._fully_shard._fsdp_param",  # torch >= 2.6
    "torch.distributed._composable.fsdp._fsdp_param",  # torch 2.4, 2.5
)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The plain tensor a DTensor wraps: its values on this rank (the very object, not an alias)."""
    return param._local_tensor  # type: ignore[attr-defined, no-any-return]


def starts(padded: torch.Tensor, local: torch.Tensor) -> bool:
    """Whether ``local`` lies at the start of ``padded`` (compared by storage and offset, as
    ``data_ptr()`` is 0 for an empty shard)."""
    return (
        padded.untyped_storage().data_ptr() == local.untyped_storage().data_ptr()
        and padded.storage_offset() == local.storage_offset()
    )


def fsdp_padded_shards(params: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """FSDP2's padded 1-D shard of each of ``params`` it manages, by ``id`` of the parameter.
    One pass over the garbage collector's objects, once per layout build."""
    classes = tuple(sys.modules[name].FSDPParam for name in FSDP_PARAM_MODULES if name in sys.modules)
    if not classes or not params:
        return {}
    wanted = {id(param) for param in params}
    found = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), classes) and id(getattr(obj, "sharded_param", None)) in wanted:
            padded = getattr(obj, "_sharded_param_data", None)
            if isinstance(padded, torch.Tensor):
                found[id(obj.sharded_param)] = padded
    return found


def _describe(param_groups: Sequence[dict[str, Any]], param: torch.Tensor) -> str:
    """How an error names ``param``: its group, index and name (looked up only for the error)."""
    for group_index, group in enumerate(param_groups):
        for index, other in enumerate(group["params"]):
            if other is param:
                name = param_name(group, index)
                return f"param group {group_index}, parameter {index}" + (f" '{name}'" if name else "")
    return "a parameter"


class LocalShards:
    """The DTensor parameters of some param groups, with their local shards."""

    def __init__(self, param_groups: Sequence[dict[str, Any]], state_names: Sequence[str]) -> None:
        params = [param for group in param_groups for param in group["params"] if is_dtensor(param)]
        self.params = params
        self.locals = [local_shard(param) for param in params]
        self.pairs = list(zip(params, self.locals))
        library = gradients.library() if params else None
        self._lender = gradients.GradLender(library, self.locals) if library is not None else None
        self.state_names = frozenset(state_names)
        self.param_of: dict[int, torch.Tensor] = {id(local): param for param, local in zip(params, self.locals)}
        padded = fsdp_padded_shards(params)
        self.padded = [padded.get(id(param)) for param in params]
        """FSDP2's padded shard of each parameter (None for a DTensor FSDP2 does not manage)."""
        for param, local, shard in zip(params, self.locals, self.padded):
            if shard is not None and not (starts(shard, local) and local.is_contiguous()):
                raise InvalidParameterError(
                    f"{_describe(param_groups, param)} (a DTensor of shape {tuple(param.shape)}): its local shard "
                    "is not the start of FSDP2's padded shard, which this version of fused-core expects (a newer "
                    "torch?). "
                    "Nothing was modified. Use torch.optim for this model and report it"
                )

    def __bool__(self) -> bool:
        return bool(self.params)

    def local_groups(self, param_groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``param_groups`` with every DTensor parameter replaced by its local shard."""
        return [
            {**group, "params": [local_shard(p) if is_dtensor(p) else p for p in group["params"]]}
            for group in param_groups
        ]

    def reserves(self) -> dict[int, int]:
        """Elements each local shard's slot must hold (by ``id``): FSDP2's padded shard lies there too."""
        return {id(local): padded.numel() for local, padded in zip(self.locals, self.padded) if padded is not None}

    def unchanged(self) -> bool:
        """Whether every parameter still wraps the local shard it was laid out with
        (``load_state_dict(assign=True)`` on the model gives FSDP2 new ones)."""
        return all(local_shard(param) is local for param, local in zip(self.params, self.locals))

    @torch.no_grad()
    def follow(self) -> bool:
        """Re-point FSDP2's padded shards to where their local shards now lie; a local shard that
        was given its own memory (a parameter dropped from the optimizer) gets a padded home.
        Returns whether anything was re-pointed."""
        moved = False
        for local, padded in zip(self.locals, self.padded):
            if padded is None or starts(padded, local):
                continue
            home = local.untyped_storage()
            if not storage.is_flat(home):
                fresh = local.new_zeros(padded.numel())
                fresh[: local.numel()].copy_(local.reshape(-1))
                local.set_(fresh.untyped_storage(), 0, local.shape, local.stride())
                home = fresh.untyped_storage()
            padded.set_(home, local.storage_offset(), padded.shape, (1,))
            moved = True
        return moved

    def lend_grads(self) -> None:
        """Give each local shard the local shard of its parameter's gradient, for one launch: one C++
        call where fused-core's gradient reader is built (:class:`fused_core.gradients.GradLender`)."""
        if self._lender is not None:
            self._lender.lend([None if (grad := param.grad) is None else grad._local_tensor for param in self.params])
            return
        for param, local in self.pairs:  # no call per parameter
            grad = param.grad
            local.grad = None if grad is None else grad._local_tensor

    def take_back_grads(self) -> None:
        if self._lender is not None:
            self._lender.take_back()
            return
        for local in self.locals:
            local.grad = None

    def wrap(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``value`` (a local state tensor of ``param``'s shard) as a DTensor laid out like ``param``."""
        dtensor_type = type(param)
        return dtensor_type.from_local(  # type: ignore[attr-defined, no-any-return]
            value,
            param.device_mesh,  # type: ignore[attr-defined]
            param.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )


class LocalValues(MutableMapping[str, Any]):
    """One DTensor parameter's state as the layout sees it: DTensor values unwrapped to their
    local shards; state buffers the layout stores are wrapped as DTensors like the parameter."""

    def __init__(self, values: dict[str, Any], param: torch.Tensor, shards: LocalShards) -> None:
        self.entries, self.param, self.shards = values, param, shards

    def __getitem__(self, name: str) -> Any:
        value = self.entries[name]
        return local_shard(value) if is_dtensor(value) else value

    def __setitem__(self, name: str, value: Any) -> None:
        if name in self.shards.state_names and isinstance(value, torch.Tensor) and not is_dtensor(value):
            value = self.shards.wrap(self.param, value)
        self.entries[name] = value

    def __delitem__(self, name: str) -> None:
        del self.entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class LocalState(MutableMapping[torch.Tensor, Any]):
    """An optimizer's ``state`` keyed by local shards where its parameters are DTensors: what a
    layout built over :meth:`LocalShards.local_groups` reads and writes."""

    def __init__(self, state: MutableMapping[torch.Tensor, Any], shards: LocalShards) -> None:
        self.state, self.shards = state, shards

    def _key(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.shards.param_of.get(id(tensor), tensor)

    def __getitem__(self, tensor: torch.Tensor) -> Any:
        key = self._key(tensor)
        values = self.state[key]
        return LocalValues(values, key, self.shards) if key is not tensor and isinstance(values, dict) else values

    def __contains__(self, tensor: object) -> bool:
        return isinstance(tensor, torch.Tensor) and self._key(tensor) in self.state

    def get(self, tensor: torch.Tensor, default: Any = None) -> Any:  # type: ignore[override]
        return self[tensor] if tensor in self else default

    def __setitem__(self, tensor: torch.Tensor, values: Any) -> None:
        self.state[self._key(tensor)] = values

    def __delitem__(self, tensor: torch.Tensor) -> None:
        del self.state[self._key(tensor)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def check_placements(param: torch.Tensor, where: str) -> None:
    """A DTensor parameter must be sharded or replicated (not a pending sum)."""
    for placement in param.placements:  # type: ignore[attr-defined]
        if placement.is_partial():
            raise InvalidParameterError(
                f"{where}: is a DTensor with a Partial placement ({param.placements}); its local values are "  # type: ignore[attr-defined]
                "not its values. Redistribute it to Shard or Replicate first"
            )
