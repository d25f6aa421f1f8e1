"""The rest of torch.optim.SGD's contract: the ``lr`` default, torch's keyword-only arguments,
state_dicts of older torch versions, arbitrary values in ``optimizer.state``, field-named errors.

The oracle is ``torch.optim.SGD(foreach=False)``, run in every test on the same random
model and batches as FusedSGD (fp32, relative error 1e-5).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import required

from fused_core import InvalidHyperparameterError
from fused_sgd import FusedSGD, NpuFusedSGD
from fused_testing.reference import relative_error

RTOL = 1e-5
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
TORCH_KEYWORDS = ("foreach", "differentiable", "fused")
OLD_TORCH_MISSING = ("maximize", "nesterov", "foreach", "fused", "differentiable")

Batch = tuple[Tensor, Tensor]


def make_twins(seed: int) -> tuple[nn.Module, nn.Module]:
    """Two copies of a small random MLP (a 40x25 = 1000-element weight, then 25x10)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(40, 25), nn.Tanh(), nn.Linear(25, 10))
    return model, copy.deepcopy(model)


def make_batches(seed: int, n: int = 4) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 40, generator=generator), torch.randn(16, 10, generator=generator)) for _ in range(n)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch]) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def assert_same_params(ours: nn.Module, theirs: nn.Module) -> None:
    for (name, mine), expected in zip(ours.named_parameters(), theirs.parameters()):
        assert relative_error(mine, expected) <= RTOL, name


def assert_moved(model: nn.Module, before: nn.Module) -> None:
    """The comparison is not vacuous: training changed the parameters."""
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before.parameters()))


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.state_dict()["param_groups"]]


# ----- 1. lr defaults to 1e-3 (FusedSGD), stays required (NpuFusedSGD) -------------------------
def test_lr_default_is_torchs() -> None:
    torch_lr = inspect.signature(torch.optim.SGD).parameters["lr"].default
    assert torch_lr == 1e-3
    assert inspect.signature(FusedSGD).parameters["lr"].default == torch_lr
    assert inspect.signature(NpuFusedSGD).parameters["lr"].default is required

    ours, theirs = make_twins(seed=1)
    start = copy.deepcopy(ours)
    fused = FusedSGD(ours.parameters(), momentum=0.9)
    reference = torch.optim.SGD(theirs.parameters(), momentum=0.9, foreach=False)
    assert fused.param_groups[0]["lr"] == reference.param_groups[0]["lr"] == 1e-3
    batches = make_batches(seed=101)
    train(ours, fused, batches)
    train(theirs, reference, batches)
    assert_same_params(ours, theirs)
    assert_moved(ours, start)


def test_lr_default_fills_a_param_group_without_lr() -> None:
    ours, theirs = make_twins(seed=2)

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        first, *rest = model.parameters()
        return [{"params": [first], "lr": 0.1}, {"params": rest}]

    fused = FusedSGD(groups(ours), momentum=0.5)
    reference = torch.optim.SGD(groups(theirs), momentum=0.5, foreach=False)
    assert [g["lr"] for g in fused.param_groups] == [g["lr"] for g in reference.param_groups] == [0.1, 1e-3]
    batches = make_batches(seed=102)
    train(ours, fused, batches)
    train(theirs, reference, batches)
    assert_same_params(ours, theirs)


def test_npu_fused_sgd_keeps_lr_required() -> None:
    ours, _ = make_twins(seed=3)
    with pytest.raises(InvalidHyperparameterError, match="'lr'"):
        NpuFusedSGD(ours.parameters())
    first, *rest = ours.parameters()
    with pytest.raises(ValueError, match="param group 1.*'lr'"):
        NpuFusedSGD([{"params": [first], "lr": 0.1}, {"params": rest}])


# ----- 2. foreach, fused, differentiable ---------------------------------------------------------
def test_signature_is_torchs() -> None:
    """Names, order, kinds, defaults and the defaults' types (so param groups pickle alike)."""

    def described(cls: type) -> list[tuple[str, Any, Any, type]]:
        return [(p.name, p.kind, p.default, type(p.default)) for p in inspect.signature(cls).parameters.values()]

    assert described(FusedSGD) == described(torch.optim.SGD)
    for name in TORCH_KEYWORDS:
        assert inspect.signature(FusedSGD).parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert not set(TORCH_KEYWORDS) & set(inspect.signature(NpuFusedSGD).parameters)


OPTIONS = [{}, {"foreach": True}, {"foreach": False}, {"fused": True}, {"fused": False}, {"differentiable": False}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "none")
def test_torch_keywords_are_stored_like_torch_and_change_nothing(options: dict[str, Any]) -> None:
    ours, theirs = make_twins(seed=4)
    fused = FusedSGD(ours.parameters(), nesterov=True, **HP, **options)
    like_torch = torch.optim.SGD(copy.deepcopy(theirs).parameters(), nesterov=True, **HP, **options)
    assert hyperparameters(fused) == hyperparameters(like_torch)
    assert fused.defaults == like_torch.defaults

    reference = torch.optim.SGD(theirs.parameters(), nesterov=True, **HP, foreach=False)
    batches = make_batches(seed=104)
    train(ours, fused, batches)
    train(theirs, reference, batches)
    assert_same_params(ours, theirs)
    assert hyperparameters(fused) == hyperparameters(like_torch)


def test_differentiable_true_is_refused_clearly() -> None:
    ours, theirs = make_twins(seed=5)
    torch.optim.SGD(theirs.parameters(), lr=0.1, differentiable=True)  # torch accepts it
    pattern = r"'differentiable'.*do not support autograd through the step.*torch\.optim\.SGD\(differentiable=True\)"
    with pytest.raises(InvalidHyperparameterError, match=pattern):
        FusedSGD(ours.parameters(), lr=0.1, differentiable=True)

    first, *rest = ours.parameters()
    fused = FusedSGD([first], lr=0.1)
    with pytest.raises(InvalidHyperparameterError, match=pattern):
        fused.add_param_group({"params": rest, "differentiable": True})
    assert len(fused.param_groups) == 1

    saved = torch.optim.SGD(theirs.parameters(), lr=0.1, differentiable=True).state_dict()
    fused = FusedSGD(ours.parameters(), lr=0.1)
    with pytest.raises(InvalidHyperparameterError, match=pattern):
        fused.load_state_dict(saved)
    assert fused.param_groups[0]["differentiable"] is False


def test_add_param_group_with_torch_keywords() -> None:
    ours, theirs = make_twins(seed=6)
    first, *rest = ours.parameters()
    torch_first, *torch_rest = theirs.parameters()
    fused = FusedSGD([first], **HP)
    reference = torch.optim.SGD([torch_first], **HP, foreach=False)
    extra = {"lr": 0.02, "nesterov": True, "foreach": True, "fused": False, "differentiable": False}
    fused.add_param_group({"params": rest, **extra})
    reference.add_param_group({"params": torch_rest, **extra})
    assert hyperparameters(fused)[1] == hyperparameters(reference)[1]
    batches = make_batches(seed=106)
    train(ours, fused, batches)
    train(theirs, reference, batches)
    assert_same_params(ours, theirs)


def test_state_dicts_with_torch_keywords_load_both_ways() -> None:
    ours, theirs = make_twins(seed=7)
    fused = FusedSGD(ours.parameters(), **HP)
    reference = torch.optim.SGD(theirs.parameters(), **HP, foreach=False)
    batches = make_batches(seed=107, n=6)
    train(ours, fused, batches[:3])
    train(theirs, reference, batches[:3])
    assert set(fused.state_dict()["param_groups"][0]) == set(reference.state_dict()["param_groups"][0])

    # torch's state_dict (foreach=False, fused=None, differentiable=False) into FusedSGD, ours into torch
    ours_resumed, theirs_resumed = copy.deepcopy(ours), copy.deepcopy(theirs)
    fused_resumed = FusedSGD(ours_resumed.parameters(), lr=0.3)
    fused_resumed.load_state_dict(copy.deepcopy(reference.state_dict()))
    torch_resumed = torch.optim.SGD(theirs_resumed.parameters(), lr=0.3)
    torch_resumed.load_state_dict(copy.deepcopy(fused.state_dict()))
    assert hyperparameters(fused_resumed) == hyperparameters(reference)
    assert hyperparameters(torch_resumed) == hyperparameters(fused)

    train(ours_resumed, fused_resumed, batches[3:])
    train(theirs_resumed, torch_resumed, batches[3:])
    train(theirs, reference, batches[3:])
    assert_same_params(ours_resumed, theirs)
    assert_same_params(theirs_resumed, theirs)


# ----- 3. state_dicts of an older torch ------------------------------------------------------------
@pytest.mark.parametrize("missing", [*[(key,) for key in OLD_TORCH_MISSING], OLD_TORCH_MISSING], ids=str)
def test_old_torch_state_dict_loads_and_steps(missing: tuple[str, ...]) -> None:
    source, _ = make_twins(seed=8)
    source_opt = torch.optim.SGD(source.parameters(), lr=0.05, momentum=0.9, foreach=False)
    batches = make_batches(seed=108, n=6)
    train(source, source_opt, batches[:3])
    old = source_opt.state_dict()
    for group in old["param_groups"]:
        for key in missing:
            del group[key]

    ours, theirs = copy.deepcopy(source), copy.deepcopy(source)
    # built with other values: what the old state_dict lacks comes from __setstate__, as in torch
    fused = FusedSGD(ours.parameters(), lr=0.2, momentum=0.5, nesterov=True, maximize=True, foreach=True)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.2, momentum=0.5, nesterov=True, maximize=True, foreach=True)
    fused.load_state_dict(copy.deepcopy(old))
    reference.load_state_dict(copy.deepcopy(old))
    assert hyperparameters(fused) == hyperparameters(reference)
    assert all(key in group for group in fused.param_groups for key in OLD_TORCH_MISSING)

    train(ours, fused, batches[3:])
    train(theirs, reference, batches[3:])
    assert_same_params(ours, theirs)
    assert_moved(ours, source)


# ----- 4. anything in optimizer.state ---------------------------------------------------------------
def add_extras(optimizer: torch.optim.Optimizer) -> None:
    first, second = list(optimizer.param_groups[0]["params"])[:2]
    optimizer.state[first]["extra"] = 3
    optimizer.state[second]["note"] = None
    optimizer.state["note"] = "x"
    optimizer.state["history"] = [1, 2]
    optimizer.state["counters"] = {"calls": 2}


def test_state_dict_with_arbitrary_state_values() -> None:
    ours, theirs = make_twins(seed=9)
    fused = FusedSGD(ours.parameters(), **HP)
    reference = torch.optim.SGD(theirs.parameters(), **HP, foreach=False)
    batches = make_batches(seed=109, n=6)
    train(ours, fused, batches[:3])
    train(theirs, reference, batches[:3])
    add_extras(fused)
    add_extras(reference)

    mine, expected = fused.state_dict(), reference.state_dict()
    assert mine["state"].keys() == expected["state"].keys()
    for key, value in expected["state"].items():
        if isinstance(value, dict) and "momentum_buffer" in value:
            assert mine["state"][key].keys() == value.keys()
            assert relative_error(mine["state"][key]["momentum_buffer"], value["momentum_buffer"]) <= RTOL
            assert {k: v for k, v in mine["state"][key].items() if k != "momentum_buffer"} == {
                k: v for k, v in value.items() if k != "momentum_buffer"
            }
        else:
            assert mine["state"][key] == value, key

    # and the extras survive a load both ways, and training goes on as torch's
    ours_resumed, theirs_resumed = copy.deepcopy(ours), copy.deepcopy(theirs)
    fused_resumed = FusedSGD(ours_resumed.parameters())
    fused_resumed.load_state_dict(copy.deepcopy(expected))
    torch_resumed = torch.optim.SGD(theirs_resumed.parameters())
    torch_resumed.load_state_dict(copy.deepcopy(mine))
    assert fused_resumed.state["note"] == torch_resumed.state["note"] == "x"
    assert fused_resumed.state_dict()["state"].keys() == expected["state"].keys()
    train(ours_resumed, fused_resumed, batches[3:])
    train(theirs_resumed, torch_resumed, batches[3:])
    train(theirs, reference, batches[3:])
    assert_same_params(ours_resumed, theirs)
    assert_same_params(theirs_resumed, theirs)


# ----- 5. the Nesterov conflict names 'nesterov' -----------------------------------------------------
@pytest.mark.parametrize("conflict", [{"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.1}], ids=str)
def test_nesterov_conflict_names_nesterov(conflict: dict[str, float]) -> None:
    ours, theirs = make_twins(seed=10)
    with pytest.raises(ValueError, match="Nesterov"):
        torch.optim.SGD(theirs.parameters(), lr=0.1, nesterov=True, **conflict)
    for build in (
        lambda: FusedSGD(ours.parameters(), lr=0.1, nesterov=True, **conflict),
        lambda: NpuFusedSGD(ours.parameters(), 0.1, nesterov=True, **conflict),
        lambda: FusedSGD(ours.parameters(), lr=0.1).add_param_group(
            {"params": [nn.Parameter(torch.randn(1000))], "nesterov": True, **conflict}
        ),
    ):
        with pytest.raises(InvalidHyperparameterError) as error:
            build()
        assert "'nesterov': Nesterov momentum requires momentum > 0 and dampening == 0" in str(error.value)
        assert "hyperparameters'" not in str(error.value)


def test_bad_momentum_with_nesterov_names_momentum_only() -> None:
    ours, theirs = make_twins(seed=11)
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=-0.9, nesterov=True)
    with pytest.raises(InvalidHyperparameterError, match="'momentum'") as error:
        FusedSGD(ours.parameters(), lr=0.1, momentum=-0.9, nesterov=True)
    assert "'nesterov'" not in str(error.value)


# ----- loaded momentum_buffer None, and the profiler ---------------------------------------
@pytest.mark.parametrize("cls", [FusedSGD, NpuFusedSGD])
def test_loaded_momentum_buffer_none_resets_momentum_as_torch(cls: type) -> None:
    """torch keeps ``momentum_buffer: None`` in state and re-initialises the buffer from the next
    gradient; the old buffer must not be kept."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = nn.Sequential(nn.Linear(40, 25), nn.ReLU(), nn.Linear(25, 10))
    twin = copy.deepcopy(model)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    ours, theirs = cls(model.parameters(), **hp), torch.optim.SGD(twin.parameters(), foreach=False, **hp)
    batches = [(torch.randn(16, 40), torch.randint(0, 10, (16,))) for _ in range(6)]
    for step, (inputs, targets) in enumerate(batches):
        if step == 3:
            saved = theirs.state_dict()
            for values in saved["state"].values():
                values["momentum_buffer"] = None
            theirs.load_state_dict(saved)
            ours.load_state_dict(saved)
            assert all(value["momentum_buffer"] is None for value in ours.state.values())
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            F.cross_entropy(m(inputs), targets).backward()
            opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"step {step}"
            assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"]), f"step {step}"


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_is_recorded_by_the_profiler_on_every_call(set_to_none: bool) -> None:
    model = nn.Sequential(nn.Linear(40, 25), nn.ReLU(), nn.Linear(25, 10))
    optimizer = FusedSGD(model.parameters(), lr=0.05, momentum=0.9)
    reference = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def events(opt: torch.optim.Optimizer) -> list[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):  # the first call lays out nothing; later ones take the fast paths
                opt.zero_grad(set_to_none=set_to_none)
                model(torch.randn(8, 40)).sum().backward()
                opt.step()
        return [event.name for event in prof.events() if event.name.startswith("Optimizer.zero_grad#")]

    assert events(reference) == ["Optimizer.zero_grad#SGD.zero_grad"] * 3
    assert events(optimizer) == ["Optimizer.zero_grad#FusedSGD.zero_grad"] * 3
