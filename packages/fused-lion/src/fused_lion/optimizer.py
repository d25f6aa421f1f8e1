"""FusedLion: Lion over flat buffers."""

from __future__ import annotations

from typing import Any

from fused_core import FusedOptimizer
from fused_core.kernels import as_float

from .hyperparams import LionHyperparams
from .reference import GROUP_DEFAULTS


class FusedLion(FusedOptimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") over flat buffers.

    For every parameter :math:`\theta` with a gradient :math:`g`, with learning rate :math:`\gamma`,
    betas :math:`\beta_1, \beta_2` and weight decay :math:`\lambda`; the momentum :math:`m` starts at zero::

        g = -∇θ f(θ) if maximize else ∇θ f(θ)
        c = β1 m + (1 - β1) g
        θ = θ (1 - γλ) - γ sign(c)
        m = β2 m + (1 - β2) g

    Step for step the per-tensor :class:`fused_lion.reference.Lion` (the paper's reference
    implementation and its rounding), bit for bit in fp32 and fp64; fp16/bf16 are computed in fp32
    and rounded once per step.

    Args: the paper's, with its defaults (``lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0``), and
    torch's ``maximize``. ``lr`` may be a one-element tensor (``1 - lr * weight_decay`` is then
    computed in its dtype, as torch.optim does). ``foreach`` is stored in the param groups and
    changes nothing (the step is always fused).

    State: ``state[p]["exp_avg"]``, the momentum :math:`m` (the reference's name); a ``state_dict()``
    loads into :class:`fused_lion.reference.Lion` and back, and one saved by the paper's Lion loads.
    """

    name = "lion"
    hyperparameters = LionHyperparams
    kernel = "lion"
    state_names = ("exp_avg",)
    plugin = "fused_lion.plugin"
    group_defaults = GROUP_DEFAULTS  # param groups saved without maximize or foreach (the paper's Lion)

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    def converted_scalars(self, group: dict[str, Any]) -> dict[str, float]:
        """What the reference's step converts to the parameters' dtype: ``add_(alpha=-lr)``."""
        return {"lr": as_float(group["lr"])}
