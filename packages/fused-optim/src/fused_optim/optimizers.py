"""The optimizers ``fused-optim bench`` and ``fused-optim train`` compare (``--optimizer``): for each,
the fused class and the class it stands in for (a torch.optim class, or, where torch has none, the
plugin's per-tensor reference written with torch ops, e.g. ``fused_lamb.reference.Lamb``), the
benchmark's hyperparameters, the bytes its step must move, and ``train``'s default hyperparameters.

Both classes are imported when first asked for, so the command line works without the package of
an optimizer it is not asked to run (each plugin family is its own package).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEFAULT", "SPECS", "OptimizerSpec", "OptimizerUnavailable"]


class OptimizerUnavailable(ImportError):
    """The fused optimizer's package is not installed here."""


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    """``--optimizer``'s value, and the optimizer's name in the fused registry: ``sgd``, ``adamw``."""
    package: str
    """The distribution that ships the fused class: ``fused-sgd``."""
    module: str
    """Its import name: ``fused_sgd``."""
    fused_name: str
    """The fused class, in ``module``: ``FusedSGD``."""
    compared_with: str
    """The import path of the class it stands in for, with the same signature: ``torch.optim.SGD``, or a
    per-tensor reference of the plugin's package where torch has none (``fused_lamb.reference.Lamb``)."""
    hyperparameters: Mapping[str, Any]
    """What ``bench`` runs both with."""
    step_accesses: int
    """Bytes the step must move at least, in units of ``numel * itemsize`` (reads + writes)."""
    step_accesses_why: str
    """Which arrays those are, for the report."""
    train_defaults: Mapping[str, Any]
    """``train``'s default hyperparameters (each may be changed with ``--set KEY=VALUE``)."""
    flags: tuple[str, ...] = ("foreach", "fused")
    """The implementations the compared class offers besides its for-loop (``foreach=False``):
    ``foreach`` and ``fused`` for torch.optim.SGD, ``foreach`` only for torch.optim.RMSprop."""

    @property
    def title(self) -> str:
        """The compared class's name: ``SGD``, ``AdamW``, ``Lamb``."""
        return self.compared_with.rsplit(".", 1)[-1]

    @property
    def torch_path(self) -> str:
        """The compared class's import path: ``torch.optim.SGD``."""
        return self.compared_with

    @property
    def in_torch(self) -> bool:
        """Whether the compared class is torch's own (else a per-tensor reference of the plugin)."""
        return self.compared_with.startswith("torch.")

    @property
    def competitor(self) -> str:
        """The compared class in labels: ``torch SGD``, ``per-tensor Lamb``."""
        return f"torch {self.title}" if self.in_torch else f"per-tensor {self.title}"

    @property
    def reference(self) -> str:
        """The fused competitor's key in ``bench``'s JSON: ``fused_sgd``, ``fused_adamw``."""
        return f"fused_{self.name}"

    def torch_name(self, flavour: Mapping[str, Any]) -> str:
        """``torch.optim.SGD(foreach=False)``."""
        return "{}({})".format(self.torch_path, ", ".join(f"{key}={value}" for key, value in flavour.items()))

    def torch_optimizer(
        self, params: Any, hyperparameters: Mapping[str, Any], flavour: Mapping[str, Any]
    ) -> torch.optim.Optimizer:
        """``compared_class(params, **hyperparameters, **flavour)``, e.g. flavour ``{"foreach": False}``."""
        make: Callable[..., torch.optim.Optimizer] = self.compared_class()
        return make(params, **hyperparameters, **flavour)

    def compared_class(self) -> type[torch.optim.Optimizer]:
        """The class it stands in for, imported now; :class:`OptimizerUnavailable` where its package is missing."""
        module, name = self.compared_with.rsplit(".", 1)
        compared: type[torch.optim.Optimizer] = getattr(self._import(module, name), name)
        return compared

    def fused_class(self) -> type[torch.optim.Optimizer]:
        """The fused class, imported now; :class:`OptimizerUnavailable` where its package is missing."""
        fused: type[torch.optim.Optimizer] = getattr(self._import(self.module, self.fused_name), self.fused_name)
        return fused

    def _import(self, module: str, wanted: str) -> Any:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not module.startswith(error.name):
                raise
            raise OptimizerUnavailable(
                f"--optimizer {self.name} needs {wanted} from the {self.package} package, which is not "
                f"installed: pip install ./packages/{self.package}"
            ) from None


RMSPROP_ACCESSES = "reads param, grad, square_avg, momentum_buffer; writes param, square_avg, momentum_buffer"

SPECS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            name="sgd",
            package="fused-sgd",
            module="fused_sgd",
            fused_name="FusedSGD",
            compared_with="torch.optim.SGD",
            hyperparameters={"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
            step_accesses=5,
            step_accesses_why="reads param, grad, momentum; writes param, momentum",
            train_defaults={"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False},
        ),
        OptimizerSpec(
            name="adamw",
            package="fused-adam",
            module="fused_adam",
            fused_name="FusedAdamW",
            compared_with="torch.optim.AdamW",
            hyperparameters={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
            step_accesses=7,
            step_accesses_why="reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq",
            # torch's AdamW defaults but lr: on the digits MLP (20 epochs) 3e-3 reaches about SGD's accuracy
            # (97 %), torch's 1e-3 about 95.5 %.
            train_defaults={"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False},
        ),
        OptimizerSpec(
            name="bert_adam",
            package="fused-adam",
            module="fused_adam",
            fused_name="FusedBertAdam",
            compared_with="fused_adam.bert_reference.BertAdam",
            flags=("foreach",),
            hyperparameters={"lr": 1e-3, "warmup": 0.1, "t_total": 1000, "weight_decay": 1e-2, "max_grad_norm": 1.0},
            step_accesses=8,
            step_accesses_why="reads grad for its per-parameter norm, then param, grad, exp_avg, exp_avg_sq; "
            "writes param, exp_avg, exp_avg_sq",
            # t_total stays -1 (no schedule): a schedule needs the run's step count.
            train_defaults={"lr": 3e-3, "weight_decay": 1e-2, "max_grad_norm": 1.0},
        ),
        OptimizerSpec(
            name="rmsprop",
            package="fused-rmsprop",
            module="fused_rmsprop",
            fused_name="FusedRMSprop",
            compared_with="torch.optim.RMSprop",
            flags=("foreach",),
            hyperparameters={"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "momentum": 0.9, "weight_decay": 0.0},
            step_accesses=7,
            step_accesses_why=RMSPROP_ACCESSES,
            # torch's defaults but lr: 3e-3 reaches 97.5 % on the digits MLP (torch's 1e-2: 96.9 %).
            train_defaults={
                "lr": 3e-3,
                "alpha": 0.99,
                "eps": 1e-8,
                "weight_decay": 0.0,
                "momentum": 0.0,
                "centered": False,
            },
        ),
        OptimizerSpec(
            name="rmsprop_tf",
            package="fused-rmsprop",
            module="fused_rmsprop",
            fused_name="FusedRMSpropTF",
            compared_with="fused_rmsprop.reference.RMSpropTF",
            flags=("foreach",),
            hyperparameters={"lr": 1e-2, "alpha": 0.9, "eps": 1e-3, "momentum": 0.9, "weight_decay": 1e-5},
            step_accesses=7,
            step_accesses_why=RMSPROP_ACCESSES,
            train_defaults={"lr": 3e-3, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.0, "momentum": 0.9},
        ),
        OptimizerSpec(
            name="adadelta",
            package="fused-rmsprop",
            module="fused_rmsprop",
            fused_name="FusedAdadelta",
            compared_with="torch.optim.Adadelta",
            flags=("foreach",),
            hyperparameters={"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
            step_accesses=7,
            step_accesses_why="reads param, grad, square_avg, acc_delta; writes param, square_avg, acc_delta",
            train_defaults={"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
        ),
        OptimizerSpec(
            name="lamb",
            package="fused-lamb",
            module="fused_lamb",
            fused_name="FusedLamb",
            compared_with="fused_lamb.reference.Lamb",
            flags=("foreach",),
            hyperparameters={
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-6,
                "weight_decay": 1e-2,
                "max_grad_norm": 1.0,
            },
            # The global norm, then two passes: the trust ratio needs both norms before any element moves.
            step_accesses=11,
            step_accesses_why="reads grad for the global norm; then reads param, grad, exp_avg, exp_avg_sq, writes "
            "exp_avg, exp_avg_sq; then reads param, exp_avg, exp_avg_sq, writes param",
            # apex's defaults but lr (clipping at 1 included): 95.8 % on the digits MLP (1e-2 unstable, 1e-3 85 %).
            train_defaults={"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 1e-2},
        ),
        OptimizerSpec(
            name="adamp",
            package="fused-lamb",
            module="fused_lamb",
            fused_name="FusedAdamP",
            compared_with="fused_lamb.reference.AdamP",
            flags=("foreach",),
            hyperparameters={
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 1e-2,
                "delta": 0.1,
                "wd_ratio": 0.1,
            },
            # The projection needs per-row sums before any element moves.
            step_accesses=10,
            step_accesses_why="reads param, grad, exp_avg, exp_avg_sq, writes exp_avg, exp_avg_sq (the per-row "
            "sums); then reads param, exp_avg, exp_avg_sq, writes param",
            train_defaults={"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
        ),
        OptimizerSpec(
            name="lion",
            package="fused-lion",
            module="fused_lion",
            fused_name="FusedLion",
            compared_with="fused_lion.reference.Lion",
            flags=("foreach",),
            hyperparameters={"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 1e-1},
            step_accesses=5,
            step_accesses_why="reads param, grad, exp_avg; writes param, exp_avg",
            train_defaults={"lr": 3e-4, "betas": (0.9, 0.99), "weight_decay": 1e-1},
        ),
    )
}
"""Every optimizer ``--optimizer`` takes, by name."""
DEFAULT = "sgd"
