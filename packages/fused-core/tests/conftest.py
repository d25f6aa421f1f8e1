"""A tiny second optimizer plugin, Signum, and its independent per-tensor reference.

fused-core's hooks are proven general with an optimizer that is not SGD-shaped:
Signum (sign momentum; Bernstein et al., 2018, "signSGD: Compressed Optimisation
for Non-Convex Problems"). With learning rate γ and β in [0, 1)::

    m_1 = (1 - β) g_1                      on the first step of a parameter
    m_t = β m_{t-1} + (1 - β) g_t          afterwards
    θ_t = θ_{t-1} - γ sign(m_t)

The plugin is a module object whose ``@fused_core.hookimpl`` functions register
the optimizer and its kernel, exactly as an installed plugin would. Test modules
receive everything through the ``signum`` fixture (pytest imports this package's
test modules with ``--import-mode=importlib``, so they cannot import each other).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.optim.optimizer import required

import fused_core
from fused_core import FusedOptimizer, hookimpl
from fused_core.hyperparams import LearningRate, NonNegativeReal
from fused_core.kernels import RunInfo, as_float, in_fp32_chunks
from fused_core.plugins import DISABLE_AUTOLOAD_ENV, PluginRegistry


class SignumHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    beta: Annotated[NonNegativeReal, Field(lt=1)] = 0.9


def _signum_update(
    param: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, beta: float, lr: float, first_step: bool
) -> None:
    if first_step:
        torch.mul(grad, 1 - beta, out=momentum)
    else:
        momentum.mul_(beta).add_(grad, alpha=1 - beta)
    param.add_(torch.sign(momentum), alpha=-lr)


def signum_kernel(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    run: RunInfo,
) -> None:
    """Signum on flat slices; fp16/bf16 slices are computed in fp32 and rounded once."""
    beta, lr, first = hp["beta"], as_float(hp["lr"]), run.first_step
    in_fp32_chunks(lambda p, g, m: _signum_update(p, g, m, beta, lr, first), params, grads, state["momentum"])


class Signum(FusedOptimizer):
    """Sign momentum over flat buffers (the plugin under test)."""

    name = "signum"
    hyperparameters = SignumHyperparams
    kernel = "signum"
    state_names = ("momentum",)
    plugin: Any = None  # set to the plugin module below: constructing Signum registers it

    def __init__(self, params: Any, lr: Any = required, beta: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, beta=beta))


def make_plugin(
    module_name: str,
    optimizers: tuple[type, ...] = (),
    kernels: tuple[tuple[Any, ...], ...] = (),
) -> types.ModuleType:
    """A module-like plugin whose hookimpls register ``optimizers`` and ``kernels``
    (each a tuple of ``register``'s positional arguments)."""
    plugin = types.ModuleType(module_name)

    @hookimpl
    def register_optimizers(register: Callable[[type], None]) -> None:
        for cls in optimizers:
            register(cls)

    @hookimpl
    def register_kernels(register: Callable[..., Any]) -> None:
        for args in kernels:
            register(*args)

    plugin.register_optimizers = register_optimizers  # type: ignore[attr-defined]
    plugin.register_kernels = register_kernels  # type: ignore[attr-defined]
    return plugin


SIGNUM_PLUGIN = make_plugin("signum_test_plugin", (Signum,), (("signum", "*", signum_kernel),))
Signum.plugin = SIGNUM_PLUGIN


def signum_reference_step(
    param: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor | None, lr: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Signum step on one tensor, out of place, in the inputs' dtype (float64 for an oracle)."""
    if momentum is None:
        new_momentum = grad * (1 - beta)
    else:
        new_momentum = momentum.clone().mul_(beta).add_(grad, alpha=1 - beta)
    return param.detach().clone().add_(torch.sign(new_momentum), alpha=-lr), new_momentum


class ReferenceSignum(torch.optim.Optimizer):
    """Signum written per tensor, independent of fused-core; works in any float dtype."""

    def __init__(self, params: Any, lr: float, beta: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = as_float(group["lr"]), group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                new_p, state["momentum"] = signum_reference_step(p, p.grad, state.get("momentum"), lr, beta)
                p.copy_(new_p)
        return loss


@dataclass(frozen=True)
class SignumKit:
    Signum: type[Signum]
    Reference: type[ReferenceSignum]
    Hyperparams: type[SignumHyperparams]
    plugin: types.ModuleType
    kernel: Callable[..., None]
    reference_step: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    make_plugin: Callable[..., types.ModuleType]


@pytest.fixture(scope="session")
def signum() -> SignumKit:
    """The Signum plugin, registered with fused-core's global registry."""
    fused_core.register_plugin(SIGNUM_PLUGIN)
    return SignumKit(
        Signum, ReferenceSignum, SignumHyperparams, SIGNUM_PLUGIN, signum_kernel, signum_reference_step, make_plugin
    )


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> PluginRegistry:
    """An empty plugin registry, blind to whatever plugins are installed next to fused-core
    (autoloading itself is proven in a subprocess by test_entry_points.py)."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    return PluginRegistry()
