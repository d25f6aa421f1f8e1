"""The optimizers ``fused-optim bench`` and ``fused-optim train`` compare (``--optimizer``): for each,
the fused class and the torch class it stands in for, the benchmark's hyperparameters, the bytes
its step must move, and ``train``'s default hyperparameters.

The fused class is imported when it is first asked for, so the command line works without the
package of an optimizer it is not asked to run (``fused-adam`` is its own package).
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
    torch_class: type[torch.optim.Optimizer]
    """The torch optimizer it stands in for, with the same signature."""
    hyperparameters: Mapping[str, Any]
    """What ``bench`` runs both with."""
    step_accesses: int
    """Bytes the step must move at least, in units of ``numel * itemsize`` (reads + writes)."""
    step_accesses_why: str
    """Which arrays those are, for the report."""
    train_defaults: Mapping[str, Any]
    """``train``'s default hyperparameters (each also a ``--`` option of ``train``)."""

    @property
    def title(self) -> str:
        """The torch class's name: ``SGD``, ``AdamW``."""
        return self.torch_class.__name__

    @property
    def torch_path(self) -> str:
        """``torch.optim.SGD``."""
        return f"torch.optim.{self.title}"

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
        """``torch_class(params, **hyperparameters, **flavour)``, e.g. flavour ``{"foreach": False}``."""
        make: Callable[..., torch.optim.Optimizer] = self.torch_class
        return make(params, **hyperparameters, **flavour)

    def fused_class(self) -> type[torch.optim.Optimizer]:
        """The fused class, imported now; :class:`OptimizerUnavailable` where its package is missing."""
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as error:
            if error.name != self.module:
                raise
            raise OptimizerUnavailable(
                f"--optimizer {self.name} needs {self.fused_name} from the {self.package} package, which is not "
                f"installed: pip install ./packages/{self.package}"
            ) from None
        fused: type[torch.optim.Optimizer] = getattr(module, self.fused_name)
        return fused


SPECS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            name="sgd",
            package="fused-sgd",
            module="fused_sgd",
            fused_name="FusedSGD",
            torch_class=torch.optim.SGD,
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
            torch_class=torch.optim.AdamW,
            hyperparameters={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
            step_accesses=7,
            step_accesses_why="reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq",
            # torch's AdamW defaults but lr: on the digits MLP (20 epochs) 3e-3 reaches about SGD's accuracy
            # (97 %), torch's 1e-3 about 95.5 %.
            train_defaults={"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False},
        ),
    )
}
"""Every optimizer ``--optimizer`` takes, by name."""
DEFAULT = "sgd"
