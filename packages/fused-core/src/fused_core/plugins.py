"""The plugin manager, entry-point discovery and the optimizer registry.

Plugins are discovered from the entry-point group ``fused_optim`` the first time
the registry is consulted, unless ``FUSED_OPTIM_DISABLE_PLUGIN_AUTOLOAD`` is set
to a non-empty value (as with pytest's variable); :func:`register_plugin` then
adds plugins explicitly.

The registry is shared by the threads of a process: registering and autoloading hold one
re-entrant lock, so two threads building the first optimizer of a process at once register
each plugin once (the second waits for the first's registrations to be complete).
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownOptimizerError
from .kernels import KernelRegistry

if TYPE_CHECKING:
    from .optimizer import FusedOptimizer

ENTRY_POINT_GROUP = "fused_optim"
DISABLE_AUTOLOAD_ENV = "FUSED_OPTIM_DISABLE_PLUGIN_AUTOLOAD"


class PluginRegistry:
    """Plugins and what they registered: optimizer classes by name, and kernels."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager("fused_optim")
        self.manager.add_hookspecs(hookspecs)
        self.kernels = KernelRegistry()
        self._optimizers: dict[str, tuple[type[FusedOptimizer], str]] = {}
        self._collected: set[str] = set()
        self._autoloaded = False
        self._autoloading = False
        self._lock = threading.RLock()

    def optimizers(self) -> dict[str, type[FusedOptimizer]]:
        self._autoload()
        return {name: cls for name, (cls, _) in self._optimizers.items()}

    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        """Register ``plugin`` (a module or object with hookimpls) and collect its registrations."""
        if isinstance(plugin, str):
            plugin = importlib.import_module(plugin)
        with self._lock:
            self._autoload()  # so a plugin that is also an entry point keeps its entry-point name
            known_as = self.manager.get_name(plugin)
            if known_as is not None:
                return known_as
            registered = self.manager.register(plugin, name)
            if registered is None:
                raise PluginError(f"plugin '{name}' is blocked")
            self._collect()
            return registered

    def _autoload(self) -> None:
        if self._autoloaded:  # set once the entry points' registrations are complete
            return
        with self._lock:  # other threads wait here until they are
            if self._autoloading:  # re-entered by a plugin registering itself as it is imported
                return
            self._autoloading = True
            try:
                if not os.environ.get(DISABLE_AUTOLOAD_ENV):
                    self.manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
                    self._collect()
            finally:
                self._autoloaded = True

    def _collect(self) -> None:
        """Collect the registrations of every plugin not collected yet, one plugin at a time.

        A plugin's registrations are staged and checked first, then committed together; a
        plugin with any invalid registration is unregistered whole and the error raised.
        """
        for plugin_name, plugin in self.manager.list_name_plugin():
            if plugin is None or plugin_name in self._collected:
                continue
            try:
                optimizers, kernels = self._stage(plugin_name)
            except Exception:
                self.manager.unregister(name=plugin_name)
                raise
            self._collected.add(plugin_name)
            for cls in optimizers:
                self._optimizers[cls.name] = (cls, plugin_name)
            for kernel in kernels:
                self.kernels.register(*kernel, plugin=plugin_name)

    def _stage(self, plugin: str) -> tuple[list[type[FusedOptimizer]], list[tuple[Any, ...]]]:
        """Call ``plugin``'s hooks with registering callables that check and record, not commit."""
        optimizers: list[type[FusedOptimizer]] = []
        kernels: list[tuple[Any, ...]] = []

        def add_optimizer(cls: type[FusedOptimizer]) -> None:
            self._check_optimizer(plugin, cls, staged=optimizers)
            optimizers.append(cls)

        def add_kernel(kernel: str, device_type: str, launcher: Any, dtypes: Any = None) -> None:
            KernelRegistry.check(kernel, device_type, launcher, plugin=plugin)
            kernels.append((kernel, device_type, launcher, dtypes))

        for hook_name, register in (("register_optimizers", add_optimizer), ("register_kernels", add_kernel)):
            for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
                if impl.plugin_name == plugin:
                    hook: Callable[..., None] = impl.function
                    hook(register=register)
        return optimizers, kernels

    def _check_optimizer(self, plugin: str, cls: Any, staged: list[type[FusedOptimizer]]) -> None:
        from .optimizer import FusedOptimizer

        if not (isinstance(cls, type) and issubclass(cls, FusedOptimizer)):
            raise PluginError(f"plugin '{plugin}' registered {cls!r}, which is not a FusedOptimizer subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered {cls.__name__} without a 'name'")
        owners = {other.name: plugin for other in staged}
        owners.update({taken: owner for taken, (_, owner) in self._optimizers.items()})
        if name in owners:
            raise PluginError(
                f"plugin '{plugin}' registered optimizer name '{name}', already taken by plugin '{owners[name]}'"
            )


registry = PluginRegistry()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin (module, object or module path) explicitly; returns its name."""
    return registry.register_plugin(plugin, name)


def available_optimizers() -> list[str]:
    """Names of every registered optimizer, sorted."""
    return sorted(registry.optimizers())


def create_optimizer(name: str, params: Any, **hyperparameters: Any) -> FusedOptimizer:
    """Build the optimizer registered as ``name``: ``create_optimizer("sgd", params, lr=0.1)``."""
    optimizers = registry.optimizers()
    if name not in optimizers:
        available = ", ".join(sorted(optimizers)) or f"none (is {DISABLE_AUTOLOAD_ENV} set?)"
        raise UnknownOptimizerError(f"unknown optimizer '{name}'; available: {available}")
    return optimizers[name](params, **hyperparameters)
