"""fused_core.reductions (per-slot sums of squares and dot products over a flat slice), and the
optimizer's step-wide values (``grad_norm``, ``step_values``), each against float64 torch."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

import fused_core
from fused_core import FusedOptimizer, reductions
from fused_core.hyperparams import LearningRate
from fused_core.kernels import as_float

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def random_layout(generator: torch.Generator, gap: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Slots as a model's parameters lie in a bucket: many small, some empty, a few large, gaps between."""
    sizes = [int(n) for n in torch.randint(0, 300, (400,), generator=generator)] + [0, 1, 262_147, 70_001]
    sizes = [sizes[i] for i in torch.randperm(len(sizes), generator=generator)]
    numels = torch.tensor(sizes, dtype=torch.int64)
    offsets = torch.cumsum(numels + gap, 0) - numels
    return offsets, numels, int(offsets[-1] + numels[-1]) + gap


def float64_sums(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    products = x.double() * y.double()
    return torch.stack([products[a : a + n].sum() for a, n in zip(offsets.tolist(), numels.tolist())])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == reductions.result_dtype(dtype)
    scale = expected.abs().max().clamp_min(1.0)
    error = float((actual.double() - expected).abs().max() / scale)
    assert error <= TOLERANCE[dtype], f"{dtype}: relative error {error:.3g}"


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_reductions_match_float64(path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "torch":
        monkeypatch.setattr(reductions, "_native", lambda x: None)
    else:
        assert reductions.library() is not None, reductions.unavailable_reason(reductions.SOURCE)
    seed = int(torch.randint(0, 2**31, ()))
    generator = torch.Generator().manual_seed(seed)
    offsets, numels, length = random_layout(generator, gap=3)
    x, y = (torch.randn(length, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2))
    assert_close(reductions.segment_sumsq(x, offsets, numels), float64_sums(x, x, offsets, numels), dtype)
    assert_close(reductions.segment_dot(x, y, offsets, numels), float64_sums(x, y, offsets, numels), dtype)
    norms = reductions.segment_norms(x, offsets, numels)
    assert_close(norms.square(), float64_sums(x, x, offsets, numels), dtype)


def test_results_do_not_depend_on_the_thread_count() -> None:
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    offsets, numels, length = random_layout(generator, gap=0)
    x = torch.randn(length, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = reductions.segment_sumsq(x, offsets, numels)
        torch.set_num_threads(max(2, threads))
        many = reductions.segment_sumsq(x, offsets, numels)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_bad_slot_tables_are_refused() -> None:
    x = torch.randn(10)
    with pytest.raises(ValueError, match="outside"):
        reductions.segment_sumsq(x, torch.tensor([5]), torch.tensor([6]))
    with pytest.raises(ValueError, match="one length"):
        reductions.segment_sumsq(x, torch.tensor([0, 5]), torch.tensor([5]))
    with pytest.raises(ValueError, match="alike"):
        reductions.segment_dot(x, torch.randn(10, dtype=torch.float64), torch.tensor([0]), torch.tensor([10]))


# ----- step-wide values: a normalised-gradient SGD, θ -= lr · g / ‖g‖ (the global 2-norm) -------------


class NormalizedHyperparams(BaseModel):
    model_config = ConfigDict(frozen=True)
    lr: LearningRate


def normalized_sgd(params: torch.Tensor, grads: torch.Tensor, state: Any, hp: Any, run: Any) -> None:
    params.add_(grads.float(), alpha=-as_float(hp["lr"]) / float(hp["global_grad_norm"]))


class NormalizedSGD(FusedOptimizer):
    name = "normalized_sgd_test"
    hyperparameters = NormalizedHyperparams
    kernel = "normalized_sgd_test"
    plugin: Any = None

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr))

    def step_values(self) -> dict[str, Any]:
        return {"global_grad_norm": self.grad_norm()}


@pytest.mark.parametrize("set_to_none", [True, False])
def test_step_values_reach_every_launcher_and_nothing_else(signum, set_to_none: bool) -> None:
    if NormalizedSGD.plugin is None:
        NormalizedSGD.plugin = signum.make_plugin(
            "normalized_sgd_test_plugin", (NormalizedSGD,), (("normalized_sgd_test", "*", normalized_sgd),)
        )
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    shapes = [(256, 128), (128,), (3, 5), (1000,)]
    params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    expected = [p.detach().double().clone() for p in params]
    optimizer = NormalizedSGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}])
    for _ in range(3):
        optimizer.zero_grad(set_to_none=set_to_none)
        grads = [torch.randn(p.shape, generator=generator) for p in params[:-1]]  # the last one has none
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        total = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        assert float(optimizer.grad_norm()) == pytest.approx(total, rel=1e-6)
        optimizer.step()
        for index, (value, g) in enumerate(zip(expected, grads)):
            value.sub_(g.double() * ((0.1 if index < 2 else 0.01) / total))
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g), "step() must not change the gradients"
    for p, value in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), value, rtol=1e-5, atol=1e-6)
    assert all("global_grad_norm" not in group for group in optimizer.param_groups)
    assert all("global_grad_norm" not in group for group in optimizer.state_dict()["param_groups"])
    assert "normalized_sgd_test" in fused_core.available_optimizers()
