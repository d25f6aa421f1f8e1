"""FusedBertAdam and NpuFusedBertAdam: the BERT version of Adam (pytorch-pretrained-BERT's
``BertAdam``, torch_npu's ``NpuFusedBertAdam``) over flat buffers."""

from __future__ import annotations

from typing import Any

from torch.optim.optimizer import required

from fused_core import FusedOptimizer, KeepsGradients

from .bert_hyperparams import BertAdamHyperparams


class FusedBertAdam(FusedOptimizer):
    r"""BertAdam over flat buffers: Adam without bias correction, with decoupled weight decay, a
    per-parameter gradient clipping and a warmup schedule of the learning rate.

    For every parameter :math:`\theta` with a gradient :math:`g`, at its step :math:`t` (counted
    from 0), with ``b1, b2, e`` = :math:`\beta_1, \beta_2, \epsilon` and weight decay :math:`\lambda`::

        g  = g · min(1, max_grad_norm / (‖g‖ + 1e-6))       if max_grad_norm > 0 (this parameter's norm)
        m  = β1 m + (1 - β1) g
        v  = β2 v + (1 - β2) g²
        u  = m / (sqrt(v) + ε) + λ θ                          (λ θ if λ > 0)
        γt = lr · schedule(t / t_total, warmup)               (lr if t_total == -1)
        θ  = θ - γt u
        t  = t + 1

    ``schedule`` is ``warmup_linear`` (default), ``warmup_constant``, ``warmup_cosine`` or
    ``warmup_poly`` (:data:`fused_adam.bert_reference.SCHEDULES`). Step for step the per-tensor
    :class:`fused_adam.bert_reference.BertAdam`, bit for bit in fp32 and fp64; fp16/bf16 are
    computed in fp32 and rounded once per step.

    The clipping scales the gradient inside the update: ``step()`` neither modifies nor replaces
    the parameters' ``.grad`` (pytorch-pretrained-BERT clips ``p.grad`` in place).

    Args: torch_npu's ``NpuFusedBertAdam``'s, with its defaults; ``lr`` is required.

    State, as torch_npu's: ``state[p]["step"]`` (this parameter's count, a 0-dim float32 tensor;
    torch_npu's int loads too), ``"exp_avg"`` and ``"exp_avg_sq"``.
    """

    name = "bert_adam"
    hyperparameters = BertAdamHyperparams
    kernel = "bert_adam"
    elementwise = False  # per-parameter gradient clipping: over whole parameters
    scalar_state_names = ("step",)
    state_names = ("exp_avg", "exp_avg_sq")
    plugin = "fused_adam.plugin"

    def __init__(
        self,
        params: Any,
        lr: Any = required,
        warmup: float = -1,
        t_total: float = -1,
        schedule: str = "warmup_linear",
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            schedule=schedule,
            warmup=warmup,
            t_total=t_total,
            b1=b1,
            b2=b2,
            e=e,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults)


class NpuFusedBertAdam(KeepsGradients, FusedBertAdam):
    """:class:`FusedBertAdam` under torch_npu's name and signature, on every device; ``zero_grad()``
    keeps the gradients, zeroed, as torch_npu's fused optimizers do."""

    def __init__(
        self,
        params: Any,
        lr: Any = required,
        warmup: float = -1,
        t_total: float = -1,
        schedule: str = "warmup_linear",
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ) -> None:
        super().__init__(params, lr, warmup, t_total, schedule, b1, b2, e, weight_decay, max_grad_norm)
