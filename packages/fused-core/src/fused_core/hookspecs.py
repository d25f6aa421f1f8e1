"""Every plugin hook of fused-optim, documented where it is declared.

A plugin is a module (or object) with functions marked ``@fused_core.hookimpl``,
advertised under the entry-point group ``fused_optim`` in its ``pyproject.toml``::

    [project.entry-points.fused_optim]
    sgd = "fused_sgd.plugin"

Each hook receives a ``register`` callable; fused-core records which plugin
called it so every registration error names the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("fused_optim")
hookimpl = pluggy.HookimplMarker("fused_optim")


@hookspec
def register_optimizers(register: Callable[[type], None]) -> None:
    """Register optimizers: call ``register(cls)`` for each :class:`~fused_core.FusedOptimizer`
    subclass. ``cls.name`` (unique across plugins) is the name ``create_optimizer`` knows;
    ``cls.hyperparameters`` (a pydantic model) validates every param group;
    ``cls.kernel`` names its update kernel; ``cls.state_names`` lists its per-parameter
    state buffers, laid out like the parameters."""


@hookspec
def register_kernels(register: Callable[..., Any]) -> None:
    """Register kernel launchers: ``register(kernel, device_type, launcher, dtypes=None)``.

    ``device_type`` is ``"cpu"``, ``"cuda"``, ``"npu"`` or ``"*"`` (any device); ``dtypes``
    is ``None`` (any), a collection of dtypes, or a predicate ``(device, dtype) -> bool``
    called once per pair. See :mod:`fused_core.kernels` for the launcher signature and the
    fallback order."""
