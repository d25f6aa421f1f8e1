"""FusedSGD's state_dict is torch.optim.SGD's: same format, loadable both ways, resumable.

The oracle is ``torch.optim.SGD(foreach=False)``. Checkpoints go through ``torch.save``
and ``torch.load(weights_only=True)``, as a real checkpoint does; continued training is
compared with an uninterrupted run (relative 1e-5 against torch, bitwise against an
uninterrupted FusedSGD run).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_sgd import FusedSGD
from fused_testing.parity import make_batches, make_model
from fused_testing.reference import relative_error

RTOL = 1e-5
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
TORCH_ONLY_GROUP_KEYS = {"foreach", "differentiable", "fused"}
Batches = Sequence[tuple[Tensor, Tensor]]


class WithUnusedLayer(nn.Module):
    """``make_model(kind)`` with an extra layer between its first two modules that never
    gets a gradient, so its parameters sit in the middle of the flat buffer without state."""

    def __init__(self, kind: str = "mlp", seed: int = 0) -> None:
        super().__init__()
        model = make_model(kind, seed=seed)
        self.head = model[:2]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1000)
            self.unused = nn.Linear(48, 40)
        self.tail = model[2:]

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(self.head(x))


def torch_sgd(params: Any, **hp: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, foreach=False, **hp)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def roundtrip(obj: Any) -> Any:
    """A deep copy through a checkpoint file, loaded as safely as torch allows."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def saved_size(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter and every momentum buffer, cloned."""
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [
        optimizer.state[p]["momentum_buffer"].clone()
        for p in model.parameters()
        if "momentum_buffer" in optimizer.state.get(p, {})
    ]
    return params + buffers


def assert_close_to(model: nn.Module, reference: nn.Module, rtol: float = RTOL) -> None:
    reference_params = dict(reference.named_parameters())
    errors = {name: relative_error(p, reference_params[name]) for name, p in model.named_parameters()}
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.3e} > {rtol:.0e}"


def assert_bitwise(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"tensor {i} differs by {(a - e).abs().max().item():.3e}"


def assert_same_format(ours: dict, theirs: dict) -> None:
    """Same state keys per parameter, same group keys (bar torch-only flags) and values."""
    assert set(ours) == set(theirs) == {"state", "param_groups"}
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for index, state in theirs["state"].items():
        assert set(ours["state"][index]) == set(state), f"param {index}"
        for name, value in state.items():
            mine = ours["state"][index][name]
            assert isinstance(mine, Tensor) and mine.shape == value.shape and mine.dtype == value.dtype
            assert relative_error(mine, value) <= RTOL, f"param {index}, {name}"
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for mine, group in zip(ours["param_groups"], theirs["param_groups"]):
        assert set(group) - TORCH_ONLY_GROUP_KEYS <= set(mine) <= set(group)
        for key in set(group) - TORCH_ONLY_GROUP_KEYS:
            assert mine[key] == group[key], key


# ----- format ---------------------------------------------------------------
Factory = Callable[[nn.Module], Any]
PARAM_SOURCES: dict[str, Factory] = {
    "parameters": lambda model: model.parameters(),
    "named_parameters": lambda model: model.named_parameters(),
    "two-groups": lambda model: [
        {"params": list(model.parameters())[::2], "lr": 0.02, "momentum": 0.5},
        {"params": list(model.parameters())[1::2], "weight_decay": 0.0},
    ],
}


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("source", sorted(PARAM_SOURCES))
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_format_matches_torch_before_and_after_steps(kind: str, source: str, momentum: float) -> None:
    model_a, model_b = make_model(kind), make_model(kind)
    hp = dict(lr=0.05, momentum=momentum, weight_decay=1e-3)
    ours = FusedSGD(PARAM_SOURCES[source](model_a), **hp)
    theirs = torch_sgd(PARAM_SOURCES[source](model_b), **hp)
    assert_same_format(roundtrip(ours.state_dict()), roundtrip(theirs.state_dict()))

    batches = make_batches(kind, 4, seed=7)
    train(model_a, ours, batches)
    train(model_b, theirs, batches)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert_same_format(ours_sd, theirs_sd)
    assert_same_format(roundtrip(ours_sd), roundtrip(theirs_sd))
    # the comparison saw real momentum wherever a group has momentum
    assert (len(theirs_sd["state"]) > 0) == any(group["momentum"] != 0 for group in theirs.param_groups)
    if source == "named_parameters":
        names = [name for name, _ in model_a.named_parameters()]
        assert ours_sd["param_groups"][0]["param_names"] == names


def test_weights_only_load_keeps_a_tensor_lr() -> None:
    model = make_model("mlp")
    ours = FusedSGD(model.parameters(), lr=torch.tensor(0.05), momentum=0.9)
    train(model, ours, make_batches("mlp", 2))
    loaded = roundtrip(ours.state_dict())
    lr = loaded["param_groups"][0]["lr"]
    assert isinstance(lr, Tensor) and lr.item() == pytest.approx(0.05)


# ----- loading both ways, continued training --------------------------------
def _continue_after_transfer(kind: str, from_cls: Callable, to_cls: Callable, k: int = 5, m: int = 6) -> None:
    """Train ``from_cls`` k steps, move model and optimizer state into ``to_cls`` (fresh
    objects, loaded before their first step), train m more: compare with torch run k + m."""
    batches = make_batches(kind, k + m, seed=3)
    uninterrupted = make_model(kind)
    torch_opt = torch_sgd(uninterrupted.parameters(), **HP)
    train(uninterrupted, torch_opt, batches)

    first = make_model(kind)
    first_opt = from_cls(first.parameters(), **HP)
    train(first, first_opt, batches[:k])
    model_state, optim_state = roundtrip(first.state_dict()), roundtrip(first_opt.state_dict())

    second = make_model(kind, seed=123)  # different weights: everything must come from the checkpoint
    second.load_state_dict(model_state)
    second_opt = to_cls(second.parameters(), lr=0.5)  # different lr: the checkpoint's must win
    second_opt.load_state_dict(optim_state)
    assert second_opt.param_groups[0]["lr"] == HP["lr"]
    train(second, second_opt, batches[k:])
    assert_close_to(second, uninterrupted)


@pytest.mark.parametrize("kind", ["mlp", "convnet", "deep-mlp"])
def test_ours_loads_into_torch_and_training_continues(kind: str) -> None:
    _continue_after_transfer(kind, FusedSGD, torch_sgd)


@pytest.mark.parametrize("kind", ["mlp", "convnet", "deep-mlp"])
def test_torch_loads_into_ours_and_training_continues(kind: str) -> None:
    _continue_after_transfer(kind, torch_sgd, FusedSGD)


def test_load_into_an_optimizer_that_already_stepped() -> None:
    """Loading torch's state after our own steps replaces our momentum, not just the values
    we had not touched yet."""
    batches = make_batches("mlp", 10, seed=5)
    uninterrupted = make_model("mlp")
    train(uninterrupted, torch_sgd(uninterrupted.parameters(), **HP), batches)

    donor = make_model("mlp")
    donor_opt = torch_sgd(donor.parameters(), **HP)
    train(donor, donor_opt, batches[:4])

    model = make_model("mlp", seed=9)
    ours = FusedSGD(model.parameters(), **HP)
    train(model, ours, make_batches("mlp", 3, seed=99))  # momentum that must be overwritten
    model.load_state_dict(roundtrip(donor.state_dict()))
    ours.load_state_dict(roundtrip(donor_opt.state_dict()))
    train(model, ours, batches[4:])
    assert_close_to(model, uninterrupted)


# ----- rewinding the same optimizer object -----------------------------------
@pytest.mark.parametrize("rewind_to", [0, 4])
def test_rewind_the_same_optimizer_is_bitwise(rewind_to: int) -> None:
    """Save at step ``rewind_to`` (0: before any step, so no momentum yet), train on, load the
    checkpoint back into the same objects and train the same batches again."""
    batches = make_batches("mlp", rewind_to + 6, seed=11)
    model = make_model("mlp")
    ours = FusedSGD(model.parameters(), **HP)
    train(model, ours, batches[:rewind_to])
    model_state, optim_state = roundtrip(model.state_dict()), roundtrip(ours.state_dict())

    train(model, ours, batches[rewind_to:])
    first_time = snapshot(model, ours)
    for group in ours.param_groups:
        group["lr"] = 1.0  # a scheduler's change; the checkpoint's lr must come back

    model.load_state_dict(model_state)
    ours.load_state_dict(optim_state)
    assert ours.param_groups[0]["lr"] == HP["lr"]
    if rewind_to == 0:
        assert len(ours.state) == 0
    train(model, ours, batches[rewind_to:])
    assert_bitwise(snapshot(model, ours), first_time)

    reference = make_model("mlp")
    train(reference, torch_sgd(reference.parameters(), **HP), batches)
    assert_close_to(model, reference)


def test_state_dict_is_live_like_torchs() -> None:
    """torch's state_dict holds the optimizer's own state tensors; so does ours."""
    model = make_model("mlp")
    ours = FusedSGD(model.parameters(), **HP)
    batches = make_batches("mlp", 3)
    train(model, ours, batches[:2])
    state_dict = ours.state_dict()
    train(model, ours, batches[2:])
    for index, p in enumerate(model.parameters()):
        assert torch.equal(state_dict["state"][index]["momentum_buffer"], ours.state[p]["momentum_buffer"])


# ----- checkpoint size ----------------------------------------------------------
SIZE_CASES: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: make_model("mlp"),
    "convnet": lambda: make_model("convnet"),
    "mlp-with-unused-layer": lambda: WithUnusedLayer("mlp"),
    "convnet-with-unused-layer": lambda: WithUnusedLayer("convnet"),
}


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("case", sorted(SIZE_CASES))
def test_checkpoint_is_no_larger_than_torchs(case: str, momentum: float) -> None:
    kind = case.split("-")[0]
    model_a, model_b = SIZE_CASES[case](), SIZE_CASES[case]()
    ours = FusedSGD(model_a.parameters(), lr=0.05, momentum=momentum)
    theirs = torch_sgd(model_b.parameters(), lr=0.05, momentum=momentum)
    batches = make_batches(kind, 3)
    train(model_a, ours, batches)
    train(model_b, theirs, batches)
    assert saved_size(ours.state_dict()) <= saved_size(theirs.state_dict())
    assert_same_format(ours.state_dict(), theirs.state_dict())
    if "unused" in case:
        assert all(p.grad is None for p in model_a.unused.parameters())


# ----- checkpoint and resume -------------------------------------------------------
@pytest.mark.parametrize("set_to_none", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "convnet", "deep-mlp"])
def test_resume_in_fresh_objects_is_bitwise(kind: str, set_to_none: bool) -> None:
    """Model + optimizer saved at step k and resumed in a fresh model and a fresh FusedSGD
    continue exactly as the run that was never interrupted."""
    k, m = 4, 6
    batches = make_batches(kind, k + m, seed=21)

    def run(model: nn.Module, optimizer: FusedSGD, part: Batches) -> None:
        for inputs, targets in part:
            optimizer.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()

    uninterrupted = make_model(kind)
    uninterrupted_opt = FusedSGD(uninterrupted.parameters(), **HP)
    run(uninterrupted, uninterrupted_opt, batches)

    first = make_model(kind)
    first_opt = FusedSGD(first.parameters(), **HP)
    run(first, first_opt, batches[:k])
    checkpoint = roundtrip({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    del first, first_opt

    resumed = make_model(kind, seed=77)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = FusedSGD(resumed.parameters(), lr=0.3)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    run(resumed, resumed_opt, batches[k:])

    assert_bitwise(snapshot(resumed, resumed_opt), snapshot(uninterrupted, uninterrupted_opt))
    assert_bitwise(list(resumed.state_dict().values()), list(uninterrupted.state_dict().values()))
