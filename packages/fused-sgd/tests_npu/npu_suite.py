"""Shared helpers of the NPU hardware suite (conftest.py puts this folder on sys.path).

Two kinds of comparison with ``torch.optim.SGD(foreach=False)``:

* fixed gradients (:func:`run_fixed`): both optimizers see the same gradient tensors, so only
  the optimizers' arithmetic can differ, and fp32 must agree to 1e-6 relative;
* real training (:func:`train_pair`): forward and backward passes on the NPU may reduce in a
  different order from one run to the next, so 1e-4.

Errors are computed on the CPU in float64 (``fused_testing.reference.relative_error`` on CPU
copies): the NPU's float64 support is not something this suite should depend on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_testing.parity import make_batches, make_model
from fused_testing.reference import relative_error

ND, NC1HWC0, FRACTAL_Z, FRACTAL_NZ = 2, 3, 4, 29
FIXED_RTOL = 1e-6
TRAINING_RTOL = 1e-4
SHAPES: list[tuple[int, ...]] = [(64, 32), (32,), (16, 8, 3, 3), (16,), (10, 64), (10,), (7, 11), ()]


def grid(*, maximize: bool = True) -> list[dict[str, Any]]:
    """torch.optim.SGD's hyperparameter grid (Nesterov only where it is allowed)."""
    combos = []
    for momentum, dampening, nesterov, weight_decay, flip in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-3), (False, True) if maximize else (False,)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        hp = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        combos.append({**hp, "maximize": flip} if maximize else hp)
    return combos


def grid_id(hp: dict[str, Any]) -> str:
    return "-".join(f"{key}={value}" for key, value in hp.items())


def torch_sgd(params: Any, **hp: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, foreach=False, **hp)


def make_params(
    device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0, shapes: Sequence[tuple[int, ...]] = SHAPES
) -> list[nn.Parameter]:
    """Standard-normal parameters drawn on the CPU (the same on every device), then moved."""
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype)) for shape in shapes]


def copies(params: Sequence[Tensor], torch_npu: Any = None) -> list[nn.Parameter]:
    """Independent parameters with the same values (and, given torch_npu, the same formats)."""
    result = [nn.Parameter(p.detach().clone()) for p in params]
    if torch_npu is not None:
        for copy, p in zip(result, params):
            copy.data = torch_npu.npu_format_cast(copy.data, torch_npu.get_npu_format(p))
    return result


def grads_for(params: Sequence[Tensor], step: int) -> list[Tensor]:
    """Step ``step``'s gradients: plain (ND) tensors like the parameters, drawn on the CPU."""
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]


def run_fixed(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], steps: int, first_step: int = 0) -> None:
    for step in range(first_step, first_step + steps):
        for p, grad in zip(params, grads_for(params, step)):
            p.grad = grad
        optimizer.step()


def max_error(params: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """The largest ``relative_error`` over the pairs, computed on CPU copies."""
    return max(relative_error(p.detach().cpu(), q.detach().cpu()) for p, q in zip(params, expected))


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class Pair:
    """Two identical models trained on the same batches; ``a`` is the reference."""

    model_a: nn.Module
    model_b: nn.Module
    optimizer_a: torch.optim.Optimizer
    optimizer_b: torch.optim.Optimizer
    losses_b: list[float]

    def error(self) -> float:
        return max_error(list(self.model_b.parameters()), list(self.model_a.parameters()))

    def assert_parity(self, rtol: float = TRAINING_RTOL) -> None:
        errors = {
            name: relative_error(p.detach().cpu(), q.detach().cpu())
            for (name, p), q in zip(self.model_b.named_parameters(), self.model_a.parameters())
        }
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.3e} > {rtol:.0e}"


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]) -> float:
    optimizer.zero_grad()
    inputs, targets = batch
    loss = F.cross_entropy(model(inputs).float(), targets)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_pair(
    make_a: OptimizerFactory,
    make_b: OptimizerFactory,
    device: torch.device,
    *,
    model_kind: str = "mlp",
    steps: int = 15,
    dtype: torch.dtype = torch.float32,
    between_steps: Callable[[int, Pair], None] | None = None,
) -> Pair:
    """``fused_testing.parity.train_side_by_side``'s loop on the NPU, with the comparison on the CPU."""
    model_a = make_model(model_kind, dtype=dtype, device=device)
    model_b = make_model(model_kind, dtype=dtype, device=device)
    pair = Pair(model_a, model_b, make_a(model_a), make_b(model_b), [])
    for step, batch in enumerate(make_batches(model_kind, steps, seed=1, dtype=dtype, device=device)):
        train_step(pair.model_a, pair.optimizer_a, batch)
        pair.losses_b.append(train_step(pair.model_b, pair.optimizer_b, batch))
        if between_steps is not None:
            between_steps(step, pair)
    return pair


def cast_like_torch_npu(model: nn.Module, torch_npu: Any) -> dict[str, int]:
    """Put the model's weights in the NPU-private formats torch_npu uses for them: conv weights in
    FRACTAL_Z, batch-norm parameters in NC1HWC0, linear weights in FRACTAL_NZ. Returns name -> format."""
    wanted: dict[str, int] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            wanted[f"{prefix}.weight"] = FRACTAL_Z
        elif isinstance(module, nn.BatchNorm2d):
            wanted[f"{prefix}.weight"] = wanted[f"{prefix}.bias"] = NC1HWC0
        elif isinstance(module, nn.Linear):
            wanted[f"{prefix}.weight"] = FRACTAL_NZ
    for name, param in model.named_parameters():
        if name in wanted:
            param.data = torch_npu.npu_format_cast(param.data, wanted[name])
            got = torch_npu.get_npu_format(param)
            assert got == wanted[name], f"npu_format_cast left {name} in format {got}, not {wanted[name]}"
    return wanted


def with_formats(torch_npu: Any, factory: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable[..., Any]:
    """An optimizer factory for train_side_by_side that first casts the model like torch_npu does."""

    def make(model: nn.Module) -> torch.optim.Optimizer:
        cast_like_torch_npu(model, torch_npu)
        return factory(model)

    return make


def in_flat_buffers(optimizer: Any, tensor: Tensor) -> bool:
    """Whether ``tensor``'s data lies inside one of the optimizer's flat parameter buffers."""
    for flat in optimizer.get_combined_params():
        start = flat.data_ptr()
        if start <= tensor.data_ptr() < start + flat.numel() * flat.element_size():
            return True
    return False
