"""The side-by-side harness: it reports zero for equal optimizers and fails for different ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_testing.parity import (
    MODEL_KINDS,
    assert_parity,
    make_batches,
    make_model,
    mlp,
    train_side_by_side,
)


def _sgd(lr: float = 0.1, **hp: float | bool):
    def factory(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, foreach=False, **hp)

    return factory


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_identical_optimizers_agree_exactly(kind: str) -> None:
    result = train_side_by_side(_sgd(momentum=0.9), _sgd(momentum=0.9), model_kind=kind, steps=5)
    assert result.max_relative_error == 0.0
    assert result.losses_a == result.losses_b
    assert set(result.per_param) == {n for n, _ in result.model_a.named_parameters()}
    assert_parity(result, rtol=0.0)
    # training actually moved the parameters away from their initial values
    initial = make_model(kind)
    moved = [not torch.equal(p, q) for p, q in zip(result.model_a.parameters(), initial.parameters())]
    assert all(moved)


def test_different_learning_rates_are_caught() -> None:
    result = train_side_by_side(_sgd(lr=0.1), _sgd(lr=0.2), steps=5)
    assert result.max_relative_error > 1e-3
    with pytest.raises(AssertionError, match=r"exceeds rtol[\s\S]*weight"):
        assert_parity(result, rtol=1e-6)


def test_foreach_and_fused_torch_sgd_match_single_tensor() -> None:
    """Different torch implementations agree to float32 rounding, not bit for bit."""
    for variant in (dict(foreach=True), dict(fused=True)):

        def factory(model: nn.Module, variant=variant) -> torch.optim.Optimizer:
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, **variant)

        result = train_side_by_side(_sgd(momentum=0.9, nesterov=True), factory, steps=5)
        assert_parity(result, rtol=1e-5)


def test_between_steps_and_param_groups() -> None:
    calls: list[int] = []

    def grouped(model: nn.Module) -> torch.optim.Optimizer:
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return torch.optim.SGD([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay}], lr=0.1, foreach=False)

    def schedule(i: int, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer) -> None:
        calls.append(i)
        for opt in (opt_a, opt_b):
            for group in opt.param_groups:
                group["lr"] *= 0.5

    result = train_side_by_side(grouped, grouped, steps=4, between_steps=schedule)
    assert calls == [0, 1, 2, 3]
    assert result.optimizer_a.param_groups[0]["lr"] == pytest.approx(0.1 / 16)
    assert result.max_relative_error == 0.0


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_mode_is_forwarded(set_to_none: bool) -> None:
    result = train_side_by_side(_sgd(), _sgd(), steps=2, zero_grad_set_to_none=set_to_none)
    assert result.max_relative_error == 0.0
    grads = [p.grad for p in result.model_a.parameters()]
    assert all(g is not None for g in grads)  # backward ran after the last zero_grad


def test_low_precision_models() -> None:
    result = train_side_by_side(_sgd(), _sgd(), model_kind="convnet", steps=3, dtype=torch.bfloat16)
    assert result.max_relative_error == 0.0
    assert all(p.dtype == torch.bfloat16 for p in result.model_b.parameters())


def test_make_model_is_deterministic_and_keeps_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b = make_model("deep-mlp", seed=3), make_model("deep-mlp", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(iter(make_model("deep-mlp", seed=4).parameters())), next(iter(a.parameters())))


def test_model_kinds() -> None:
    deep = list(make_model("deep-mlp").parameters())
    assert len(deep) == 32 and all(p.numel() <= 32 * 32 for p in deep)
    mlp = list(make_model("mlp").parameters())
    assert len(mlp) == 6 and max(p.numel() for p in mlp) >= 1000
    conv_weights = [p for p in make_model("convnet", dtype=torch.float16).parameters() if p.dim() == 4]
    layouts = [p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in conv_weights]
    assert layouts == [False, True]
    with pytest.raises(ValueError, match="unknown model kind"):
        make_model("transformer")


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_make_batches_fit_their_model(kind: str) -> None:
    batches = make_batches(kind, 2, batch_size=4, dtype=torch.float64)
    assert len(batches) == 2
    inputs, targets = batches[0]
    assert inputs.dtype == torch.float64 and targets.dtype == torch.int64
    assert targets.min() >= 0 and targets.max() < 10
    logits = make_model(kind, dtype=torch.float64)(inputs)
    assert logits.shape == (4, 10)


def test_builder_and_batches_from_a_dataset() -> None:
    """A model builder and an iterable of batches: the harness trains on them, step by step, once."""
    generator = torch.Generator().manual_seed(0)
    data = [(torch.rand(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)) for _ in range(4)]
    consumed: list[int] = []

    def batches():
        for i, batch in enumerate(data):
            consumed.append(i)
            yield batch[0].double(), batch[1]  # moved to the harness's dtype

    def build() -> nn.Module:
        return mlp(in_features=5, width=7, depth=3, num_classes=3)

    result = train_side_by_side(_sgd(momentum=0.9), _sgd(momentum=0.9), model_kind=build, batches=batches(), seed=4)
    assert consumed == [0, 1, 2, 3]
    assert len(result.losses_a) == 4 and result.losses_a == result.losses_b
    assert result.max_relative_error == 0.0
    assert result.step_seconds_a == result.step_seconds_b == []  # not timed unless asked
    initial = make_model(build, seed=4)
    assert [p.shape for p in initial.parameters()] == [p.shape for p in result.model_a.parameters()]
    assert not torch.equal(next(iter(initial.parameters())), next(iter(result.model_a.parameters())))


def test_steps_caps_given_batches_and_time_steps_records_each_step() -> None:
    batches = make_batches("mlp", 6)
    result = train_side_by_side(_sgd(), _sgd(), batches=iter(batches), steps=4, time_steps=True)
    assert len(result.losses_a) == 4
    assert len(result.step_seconds_a) == len(result.step_seconds_b) == 4
    assert all(seconds > 0 for seconds in result.step_seconds_a + result.step_seconds_b)
    every = train_side_by_side(_sgd(), _sgd(), batches=batches)
    assert len(every.losses_a) == 6


def test_a_builder_needs_batches() -> None:
    with pytest.raises(ValueError, match="needs batches"):
        train_side_by_side(_sgd(), _sgd(), model_kind=lambda: mlp(depth=1))


def test_mlp_builder() -> None:
    assert [p.shape for p in mlp(in_features=4, depth=0, num_classes=3).parameters()] == [(3, 4), (3,)]
    deep = mlp(in_features=6, width=5, depth=4)
    assert len(list(deep.parameters())) == 10
    assert deep(torch.zeros(2, 6)).shape == (2, 10)
