"""fused-signum: Signum (sign momentum) as a fused-optim plugin, in one file.

Bernstein et al., 2018, "signSGD: Compressed Optimisation for Non-Convex Problems".
With learning rate γ and β in [0, 1), for each parameter θ with gradient g::

    m_1 = (1 - β) g_1                      on the parameter's first step
    m_t = β m_{t-1} + (1 - β) g_t          afterwards
    θ_t = θ_{t-1} - γ sign(m_t)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.optim.optimizer import required

from fused_core import FusedOptimizer, hookimpl
from fused_core.hyperparams import LearningRate, NonNegativeReal
from fused_core.kernels import RunInfo, as_float, in_fp32_chunks


class SignumHyperparams(BaseModel):
    """Checks every param group; torch's param_groups stay plain dicts."""

    model_config = ConfigDict(frozen=True)

    lr: LearningRate
    beta: Annotated[NonNegativeReal, Field(lt=1)] = 0.9


def _update(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    hp: Mapping[str, Any],
    first: bool,
) -> None:
    beta = hp["beta"]
    if first:
        torch.mul(g, 1 - beta, out=m)
    else:
        m.mul_(beta).add_(g, alpha=1 - beta)
    p.add_(torch.sign(m), alpha=-as_float(hp["lr"]))


def signum_launcher(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    hp: Mapping[str, Any],
    run: RunInfo,
) -> None:
    """One Signum update of a run of parameters: flat 1-D slices of one bucket.
    fp16/bf16 slices are computed in fp32, chunk by chunk, and rounded once."""
    update = lambda p, g, m: _update(p, g, m, hp, run.first_step)  # noqa: E731
    in_fp32_chunks(update, params, grads, state["momentum"])


class Signum(FusedOptimizer):
    """Signum over flat buffers: ``Signum(params, lr, beta=0.9)``."""

    # create_optimizer("signum", ...)
    name = "signum"
    hyperparameters = SignumHyperparams
    # the name its launchers are registered under
    kernel = "signum"
    # state[p]["momentum"], in a flat buffer laid out like the parameters
    state_names = ("momentum",)
    # this module: constructing Signum registers its hooks
    plugin = "fused_signum"

    def __init__(self, params: Any, lr: Any = required, beta: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, beta=beta))


@hookimpl
def register_optimizers(register: Callable[[type], None]) -> None:
    register(Signum)


@hookimpl
def register_kernels(register: Callable[..., Any]) -> None:
    # any device, any dtype; add faster launchers for given devices and dtypes
    register("signum", "*", signum_launcher)
