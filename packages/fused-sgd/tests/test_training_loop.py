"""FusedSGD inside real training loops, against torch.optim.SGD(foreach=False).

Param groups (also added before and after the first step), LR schedulers (one of
which changes momentum every step), a tensor lr, both zero_grad modes, parameters
that get no gradient on some steps or only from some step on, closures and the
hooks torch.optim.Optimizer offers.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_sgd import FusedSGD, NpuFusedSGD
from fused_testing.parity import assert_parity, make_batches, make_model, train_side_by_side
from fused_testing.reference import relative_error

RTOL = 1e-5
StepHook = Callable[[int, torch.optim.Optimizer, torch.optim.Optimizer], None]


def torch_sgd(params: Any, **hp: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, foreach=False, **hp)


def both(make: Callable[[Callable[..., torch.optim.Optimizer], nn.Module], torch.optim.Optimizer]) -> dict:
    """The two optimizer factories of ``train_side_by_side`` from one recipe."""
    return dict(
        make_optimizer_a=lambda model: make(torch_sgd, model),
        make_optimizer_b=lambda model: make(FusedSGD, model),
    )


# ----- param groups ------------------------------------------------------------
def three_groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": params[0::3], "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        {"params": params[1::3], "lr": 0.02, "momentum": 0.5, "dampening": 0.3},
        {"params": params[2::3], "lr": 0.01, "momentum": 0.0, "weight_decay": 1e-2, "maximize": True},
    ]


@pytest.mark.parametrize("kind", ["mlp", "convnet", "deep-mlp"])
def test_groups_with_different_hyperparameters(kind: str) -> None:
    result = train_side_by_side(**both(lambda cls, model: cls(three_groups(model), lr=0.05)), model_kind=kind, steps=12)
    assert_parity(result, RTOL)
    assert result.losses_a[0] != result.losses_a[-1]


def test_add_param_group_before_first_step() -> None:
    def make(cls: Callable[..., torch.optim.Optimizer], model: nn.Module) -> torch.optim.Optimizer:
        groups = three_groups(model)
        optimizer = cls(groups[:1], lr=0.05)
        for group in groups[1:]:
            optimizer.add_param_group(group)
        return optimizer

    assert_parity(train_side_by_side(**both(make), model_kind="deep-mlp", steps=10), RTOL)


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_add_param_group_after_steps(kind: str) -> None:
    """A third of the layers train from the start; the others join as new groups at steps 3
    and 6 (the momentum already there survives the re-layout each addition causes)."""
    later: dict[int, list[dict]] = {}

    def make(cls: Callable[..., torch.optim.Optimizer], model: nn.Module) -> torch.optim.Optimizer:
        groups = three_groups(model)
        optimizer = cls(groups[:1], lr=0.05)
        later[id(optimizer)] = groups[1:]
        return optimizer

    def add_groups(step: int, *optimizers: torch.optim.Optimizer) -> None:
        if step in (3, 6):
            for optimizer in optimizers:
                optimizer.add_param_group(later[id(optimizer)].pop(0))

    result = train_side_by_side(**both(make), model_kind=kind, steps=10, between_steps=add_groups)
    assert_parity(result, RTOL)
    assert len(result.optimizer_b.param_groups) == 3


# ----- schedulers -------------------------------------------------------------
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=1e-3),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.2, total_steps=13, cycle_momentum=True, base_momentum=0.6, max_momentum=0.95
    ),
}


def _with_scheduler(name: str, lr: Any, momentum: float = 0.9) -> tuple[dict, StepHook, list]:
    schedulers: dict[int, Any] = {}
    seen: list[tuple[float, float]] = []

    def make(cls: Callable[..., torch.optim.Optimizer], model: nn.Module) -> torch.optim.Optimizer:
        this_lr = lr.clone() if isinstance(lr, Tensor) else lr
        optimizer = cls(model.parameters(), lr=this_lr, momentum=momentum, weight_decay=1e-3)
        schedulers[id(optimizer)] = SCHEDULERS[name](optimizer)
        return optimizer

    def advance(step: int, *optimizers: torch.optim.Optimizer) -> None:
        for optimizer in optimizers:
            schedulers[id(optimizer)].step()
        group = optimizers[1].param_groups[0]
        seen.append((float(group["lr"]), group["momentum"]))

    return both(make), advance, seen


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers(name: str) -> None:
    factories, advance, seen = _with_scheduler(name, lr=0.1)
    result = train_side_by_side(**factories, model_kind="mlp", steps=12, between_steps=advance)
    assert_parity(result, RTOL)
    assert len({lr for lr, _ in seen}) > 2  # the schedule really changed lr between steps
    if name == "OneCycleLR":
        assert len({momentum for _, momentum in seen}) > 2  # ... and momentum


@pytest.mark.parametrize("name", ["none", "StepLR"])
def test_tensor_lr(name: str) -> None:
    lr = torch.tensor(0.05)
    if name == "none":
        factories = both(lambda cls, model: cls(model.parameters(), lr=lr.clone(), momentum=0.9, nesterov=True))
        result = train_side_by_side(**factories, model_kind="deep-mlp", steps=10)
    else:
        factories, advance, seen = _with_scheduler(name, lr=lr)
        result = train_side_by_side(**factories, model_kind="deep-mlp", steps=10, between_steps=advance)
        assert len({lr for lr, _ in seen}) > 2
    assert_parity(result, RTOL)
    group = result.optimizer_b.param_groups[0]
    assert isinstance(group["lr"], Tensor)
    assert group["lr"].item() == result.optimizer_a.param_groups[0]["lr"].item()


# ----- zero_grad ------------------------------------------------------------------
def test_zero_grad_defaults_are_torchs_and_torch_npus() -> None:
    """FusedSGD's default is torch's (every .grad becomes None); NpuFusedSGD keeps torch_npu's (zeroed)."""
    torch_default = inspect.signature(torch.optim.SGD.zero_grad).parameters["set_to_none"].default
    assert torch_default is True
    assert inspect.signature(FusedSGD.zero_grad).parameters["set_to_none"].default is torch_default
    assert inspect.signature(NpuFusedSGD.zero_grad).parameters["set_to_none"].default is False
    model = make_model("mlp")
    fused, npu = FusedSGD(model.parameters(), lr=0.05), NpuFusedSGD(model.parameters(), lr=0.05)
    for inputs, targets in make_batches("mlp", 3):
        F.cross_entropy(model(inputs), targets).backward()
        fused.step()
        grads = [p.grad for p in model.parameters()]
        npu.zero_grad()
        assert all(p.grad is g and torch.count_nonzero(g) == 0 for p, g in zip(model.parameters(), grads))
        fused.zero_grad()
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("set_to_none", [False, True, None])
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_zero_grad_modes_match_torch(kind: str, set_to_none: bool | None) -> None:
    """``None``: each optimizer's own default (ours False, torch's True)."""
    result = train_side_by_side(
        **both(lambda cls, model: cls(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)),
        model_kind=kind,
        steps=10,
        zero_grad_set_to_none=set_to_none,
    )
    assert_parity(result, RTOL)


class Branchy(nn.Module):
    """An MLP whose middle branch is used only on the steps a caller chooses."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inp = nn.Linear(64, 48)
            self.branch = nn.Sequential(nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 48))
            self.out = nn.Linear(48, 10)

    def forward(self, x: Tensor, use_branch: bool) -> Tensor:
        h = torch.relu(self.inp(x))
        if use_branch:
            h = h + self.branch(h)
        return self.out(h)


ZERO_GRADS: dict[str, Callable[[nn.Module, torch.optim.Optimizer], None]] = {
    "model.zero_grad()": lambda model, optimizer: model.zero_grad(),
    "optimizer.zero_grad(set_to_none=True)": lambda model, optimizer: optimizer.zero_grad(set_to_none=True),
    # a gradient, once it exists, stays a tensor (of zeros): from then on no parameter is skipped
    "optimizer.zero_grad(set_to_none=False)": lambda model, optimizer: optimizer.zero_grad(set_to_none=False),
}
TO_NONE = [how for how in ZERO_GRADS if "False" not in how]


def _branchy_run(
    optimizer_cls: Callable[..., torch.optim.Optimizer],
    uses: Sequence[bool],
    how: str,
    hp: dict,
) -> tuple[nn.Module, torch.optim.Optimizer, list[list[Tensor]]]:
    """Train ``Branchy``; after every step, snapshot every parameter and momentum buffer
    (``None`` where a parameter has none yet)."""
    model = Branchy()
    optimizer = optimizer_cls(model.parameters(), **hp)
    history = []
    for (inputs, targets), use in zip(make_batches("mlp", len(uses), seed=31), uses):
        ZERO_GRADS[how](model, optimizer)
        F.cross_entropy(model(inputs, use), targets).backward()
        if not use and "False" not in how:
            assert all(p.grad is None for p in model.branch.parameters())
        optimizer.step()
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in model.parameters()]
        history.append(
            [p.detach().clone() for p in model.parameters()] + [b.clone() if b is not None else None for b in buffers]
        )
    return model, optimizer, history


def _assert_histories_match(ours: list[list[Tensor]], theirs: list[list[Tensor]]) -> None:
    for step, (mine, reference) in enumerate(zip(ours, theirs)):
        for i, (a, b) in enumerate(zip(mine, reference)):
            assert (a is None) == (b is None), f"step {step}, tensor {i}: state exists in one optimizer only"
            if a is not None:
                assert relative_error(a, b) <= RTOL, f"step {step}, tensor {i}"


BRANCH_HP = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)


@pytest.mark.parametrize("how", TO_NONE)
def test_parameters_without_gradient_are_skipped(how: str) -> None:
    uses = [True, False, False, True, True, False, True, False]
    _, _, ours = _branchy_run(FusedSGD, uses, how, BRANCH_HP)
    _, _, theirs = _branchy_run(torch_sgd, uses, how, BRANCH_HP)
    _assert_histories_match(ours, theirs)
    n_params = len(list(Branchy().parameters()))
    branch = range(2, 6)  # Branchy's parameter order: inp (2), branch (4), out (2)
    for step in range(1, len(uses)):
        for i in branch:
            skipped = not uses[step]
            # skipped: no weight decay, no momentum decay; used: both really moved
            assert torch.equal(ours[step][i], ours[step - 1][i]) == skipped
            assert torch.equal(ours[step][n_params + i], ours[step - 1][n_params + i]) == skipped


@pytest.mark.parametrize("how", sorted(ZERO_GRADS))
def test_late_gradient_starts_momentum_at_its_first_gradient(how: str) -> None:
    """The branch gets its first gradient at step 3: it is untouched and stateless before,
    updated from then on with momentum initialised from that gradient (as torch does)."""
    uses = [False, False, False, True, False, True, True, True]
    hp = dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2)
    model, optimizer, ours = _branchy_run(FusedSGD, uses, how, hp)
    _, _, theirs = _branchy_run(torch_sgd, uses, how, hp)
    _assert_histories_match(ours, theirs)
    initial = list(Branchy().parameters())
    n_params = len(initial)
    for i in range(2, 6):
        for step in range(3):
            assert torch.equal(ours[step][i], initial[i])
            assert ours[step][n_params + i] is None
        assert not torch.equal(ours[3][i], initial[i])
        assert ours[3][n_params + i] is not None
    assert all("momentum_buffer" in optimizer.state[p] for p in model.parameters())


# ----- closures and hooks ----------------------------------------------------------
def make_closure(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]) -> Callable:
    def closure() -> Tensor:
        assert torch.is_grad_enabled()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return closure


def test_step_with_closure_returns_the_loss_and_enables_grad() -> None:
    losses: dict[str, list[float]] = {"ours": [], "torch": []}
    models = {}
    for name, cls in (("ours", FusedSGD), ("torch", torch_sgd)):
        model = make_model("mlp")
        optimizer = cls(model.parameters(), lr=0.05, momentum=0.9)
        for batch in make_batches("mlp", 6, seed=2):
            with torch.no_grad():  # step must turn grad on for the closure anyway
                loss = optimizer.step(make_closure(model, optimizer, batch))
            assert isinstance(loss, Tensor) and loss.requires_grad
            losses[name].append(loss.item())
        models[name] = model
    assert losses["ours"][0] == losses["torch"][0]
    assert losses["ours"][-1] == pytest.approx(losses["torch"][-1], rel=RTOL)
    assert losses["ours"][0] != losses["ours"][-1]
    for (name, p), q in zip(models["ours"].named_parameters(), models["torch"].parameters()):
        assert relative_error(p, q) <= RTOL, name


def test_step_pre_and_post_hooks_fire_around_the_update() -> None:
    """A pre-hook that halves the gradients and a post-hook that records the parameters:
    same effect as on torch, and the post-hook sees the updated parameters."""
    calls: dict[str, list[str]] = {"ours": [], "torch": []}

    def make(cls: Callable[..., torch.optim.Optimizer], model: nn.Module) -> torch.optim.Optimizer:
        optimizer = cls(model.parameters(), lr=0.05, momentum=0.9)
        log = calls["ours" if cls is FusedSGD else "torch"]

        def pre(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            assert opt is optimizer
            log.append("pre")
            for p in model.parameters():
                p.grad.mul_(0.5)
            pre.before = [p.detach().clone() for p in model.parameters()]  # type: ignore[attr-defined]

        def post(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            log.append("post")
            assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), pre.before))  # type: ignore[attr-defined]

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)
        return optimizer

    assert_parity(train_side_by_side(**both(make), steps=5), RTOL)
    assert calls["ours"] == calls["torch"] == ["pre", "post"] * 5


def test_hook_handles_remove_hooks() -> None:
    model = make_model("mlp")
    optimizer = FusedSGD(model.parameters(), lr=0.05)
    fired: list[str] = []
    handle = optimizer.register_step_pre_hook(lambda *args: fired.append("pre"))
    inputs, targets = make_batches("mlp", 1)[0]
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    handle.remove()
    optimizer.step()
    assert fired == ["pre"]


def _trained(cls: Callable[..., torch.optim.Optimizer]) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model("mlp")
    optimizer = cls(model.named_parameters(), lr=0.05, momentum=0.9)
    for inputs, targets in make_batches("mlp", 2):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("cls", [FusedSGD, torch_sgd], ids=["ours", "torch"])
def test_state_dict_hooks(cls: Callable[..., torch.optim.Optimizer]) -> None:
    _, optimizer = _trained(cls)
    events: list[str] = []

    def pre(opt: torch.optim.Optimizer) -> None:
        events.append("pre")

    def post(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        events.append("post")
        state_dict["extra"] = {"epoch": 3}
        return state_dict

    optimizer.register_state_dict_pre_hook(pre)
    optimizer.register_state_dict_post_hook(post)
    state_dict = optimizer.state_dict()
    assert events == ["pre", "post"]
    assert state_dict["extra"] == {"epoch": 3}
    assert len(state_dict["state"]) == 6


@pytest.mark.parametrize("cls", [FusedSGD, torch_sgd], ids=["ours", "torch"])
def test_load_state_dict_hooks(cls: Callable[..., torch.optim.Optimizer]) -> None:
    """A pre-hook may rewrite the incoming state_dict (here: a new lr); a post-hook sees the
    loaded optimizer. Training then continues with the rewritten value."""
    _, source = _trained(cls)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    saved_buffers = [saved["state"][index]["momentum_buffer"].clone() for index in range(6)]

    model, optimizer = _trained(cls)
    events: list[str] = []

    def pre(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        events.append("pre")
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [{**group, "lr": 0.0} for group in state_dict["param_groups"]]
        return state_dict

    def post(opt: torch.optim.Optimizer) -> None:
        events.append("post")
        assert opt.param_groups[0]["lr"] == 0.0

    optimizer.register_load_state_dict_pre_hook(pre)
    optimizer.register_load_state_dict_post_hook(post)
    optimizer.load_state_dict(saved)
    assert events == ["pre", "post"]
    before = [p.detach().clone() for p in model.parameters()]
    inputs, targets = make_batches("mlp", 1, seed=4)[0]
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # lr 0: nothing moves
    for p, saved_buffer in zip(model.parameters(), saved_buffers):  # momentum continued from the loaded buffers
        expected = saved_buffer * 0.9 + p.grad
        assert relative_error(optimizer.state[p]["momentum_buffer"], expected) <= 1e-6
