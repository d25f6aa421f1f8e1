"""Watching ``param_groups`` for direct edits, as torch honours them at the next step.

torch.optim reads ``optimizer.param_groups`` afresh at every step, so users (and libraries)
edit it directly: append or replace tensors in ``group["params"]``, move a parameter between
groups, reorder or delete groups, append a raw dict, or assign new hyperparameters
(``group["lr"] = ...``, as every scheduler does). A fused optimizer has laid the parameters out
in flat buffers by group, so it must notice each of these before it steps.

:class:`ParamList` is the list a :class:`~fused_core.FusedOptimizer` keeps in every group's
``"params"``: a ``list`` that counts its mutations. :class:`GroupsSnapshot` remembers, per
group, which list of parameters it held (and that list's count) and which hyperparameter
objects; comparing it with ``param_groups`` costs O(groups) per step, not O(parameters).
A list that is not a :class:`ParamList` (one a user put in a raw dict) is compared element by
element, O(its length), every step.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex

import torch


class ParamList(list):  # type: ignore[type-arg]
    """A ``list`` whose :attr:`version` changes whenever an element is added, removed, replaced
    or reordered. Everything else is ``list``'s: it pickles, copies and compares as one."""

    version = 0
    """How many times the list was mutated (0 for a new list)."""

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, index: Any, value: Any) -> None:
        super().__setitem__(index, value)
        self._changed()

    def __delitem__(self, index: Any) -> None:
        super().__delitem__(index)
        self._changed()

    def __iadd__(self, values: Iterable[Any]) -> ParamList:  # type: ignore[override,misc]
        super().__iadd__(values)
        self._changed()
        return self

    def __imul__(self, times: SupportsIndex) -> ParamList:  # type: ignore[override,misc]
        super().__imul__(times)
        self._changed()
        return self

    def append(self, value: Any) -> None:
        super().append(value)
        self._changed()

    def extend(self, values: Iterable[Any]) -> None:
        super().extend(values)
        self._changed()

    def insert(self, index: SupportsIndex, value: Any) -> None:
        super().insert(index, value)
        self._changed()

    def pop(self, index: SupportsIndex = -1) -> Any:
        value = super().pop(index)
        self._changed()
        return value

    def remove(self, value: Any) -> None:
        super().remove(value)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        super().sort(*args, **kwargs)
        self._changed()

    def reverse(self) -> None:
        super().reverse()
        self._changed()


def _members(params: Any) -> int | tuple[Any, ...]:
    """What identifies the contents of a group's ``"params"`` now: a :class:`ParamList`'s
    version, or every element of any other sequence."""
    if isinstance(params, ParamList):
        return params.version
    return tuple(params) if isinstance(params, (list, tuple)) else (params,)


def _same_members(params: Any, members: int | tuple[Any, ...]) -> bool:
    if isinstance(members, int):
        return isinstance(params, ParamList) and params.version == members
    if not isinstance(params, (list, tuple)) or len(params) != len(members):
        return False
    return all(map(operator.is_, params, members))


def _hyperparameters(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((key, value) for key, value in group.items() if key != "params")


class GroupsSnapshot:
    """``param_groups`` as the optimizer last checked it: per group, its ``"params"`` object and
    contents, and its hyperparameter objects as last checked (compared by identity: a scheduler's new float is a
    new object; a tensor ``lr`` changed in place is the same one, as torch reads it too)."""

    def __init__(self, param_groups: Sequence[dict[str, Any]]) -> None:
        self.structure = [(group.get("params"), _members(group.get("params"))) for group in param_groups]
        self.hyperparameters: list[tuple[tuple[str, Any], ...] | None] = [None] * len(param_groups)
        """Per group, the hyperparameters as last checked (None: not checked yet)."""

    def same_structure(self, param_groups: Sequence[dict[str, Any]]) -> bool:
        """Whether every group holds the same parameters in the same order (O(groups) for
        :class:`ParamList` params)."""
        if len(param_groups) != len(self.structure):
            return False
        for group, (params, members) in zip(param_groups, self.structure):
            current = group.get("params")
            if current is not params or not _same_members(current, members):
                return False
        return True

    def changed_hyperparameters(self, param_groups: Sequence[dict[str, Any]]) -> list[int]:
        """Indices of the groups whose hyperparameters were assigned since the snapshot (the
        structure must be the same)."""
        changed = []
        for index, (group, saved) in enumerate(zip(param_groups, self.hyperparameters)):
            if (
                saved is None
                or len(group) != len(saved) + 1
                or any(group.get(key, _MISSING) is not value for key, value in saved)
            ):
                changed.append(index)
        return changed

    def accept(self, param_groups: Sequence[dict[str, Any]], indices: Iterable[int]) -> None:
        """Record the hyperparameters of ``indices`` as checked."""
        for index in indices:
            self.hyperparameters[index] = _hyperparameters(param_groups[index])


_MISSING = object()


def watch_params(group: dict[str, Any]) -> None:
    """Make ``group["params"]`` a :class:`ParamList` (a copy, as torch's ``add_param_group``
    makes one) unless it is one already."""
    if not isinstance(group["params"], ParamList):
        group["params"] = ParamList(group["params"])


def overflowing(value: float, dtype: torch.dtype) -> bool:
    """Whether torch refuses to convert the finite number ``value`` to ``dtype`` (an ``alpha`` of
    ``add_``): beyond the dtype's largest finite value. Infinities and NaN convert."""
    return abs(value) != float("inf") and value == value and abs(value) > torch.finfo(dtype).max
