"""Direct edits of ``param_groups`` (issue 14, items 4 and 5): torch.optim.SGD reads
``param_groups`` afresh at every step, so every edit below is honoured at the next step, as
torch does, or refused with an error naming the group and parameter before anything moves.

Each scenario runs the same edit on FusedSGD and on ``torch.optim.SGD(foreach=False)`` over
copies of one model, with gradients drawn fresh each step, and compares every parameter and
momentum buffer after every step: bit for bit in fp32, to a few units in the last place in
fp16/bf16 (FusedSGD rounds once from fp32, torch after each op).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fused_core import HyperparameterOverflowError, InvalidHyperparameterError, InvalidParameterError
from fused_sgd import FusedSGD
from fused_testing.reference import relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
STEPS = 6
EDIT_AT = 3

Edit = Callable[[torch.optim.Optimizer, list[nn.Parameter]], None]


def _params(dtype: torch.dtype, seed: int) -> list[nn.Parameter]:
    """Six parameters of realistic layer shapes, and two more for edits to bring in."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(256, 512), (256,), (512, 256), (512,), (10, 512), (10,), (384, 128), (64,)]
    return [nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]


def _run(cls: Callable, edit: Edit, params: list[nn.Parameter], seed: int) -> list[list[torch.Tensor]]:
    """Steps with fresh gradients on every parameter; ``edit`` after step EDIT_AT. Returns every
    parameter (and momentum buffer, where one exists) after every step."""
    optimizer = cls([{"params": params[:4]}, {"params": params[4:6], "lr": 0.02}], **HP)
    generator = torch.Generator().manual_seed(seed + 1)
    history = []
    for step in range(STEPS):
        if step == EDIT_AT:
            edit(optimizer, params)
        optimizer.zero_grad()
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        optimizer.step()
        buffers = [optimizer.state[p].get("momentum_buffer") for p in params]
        history.append([p.detach().clone() for p in params] + [b.clone() for b in buffers if b is not None])
    return history


def _compare(edit: Edit, dtype: torch.dtype) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    ours = _run(FusedSGD, edit, _params(dtype, seed), seed)
    theirs = _run(lambda *a, **k: torch.optim.SGD(*a, foreach=False, **k), edit, _params(dtype, seed), seed)
    for step, (mine, reference) in enumerate(zip(ours, theirs)):
        assert len(mine) == len(reference), f"seed {seed}, step {step}: momentum buffers exist for other params"
        for index, (a, b) in enumerate(zip(mine, reference)):
            where = f"seed {seed}, step {step}, tensor {index}"
            if dtype == torch.float32:
                assert torch.equal(a, b), where
            else:
                assert relative_error(a, b) <= 8 * torch.finfo(dtype).eps, where


def _append(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    optimizer.param_groups[0]["params"].append(params[6])


def _remove(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    optimizer.param_groups[0]["params"].pop(1)


def _replace(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    optimizer.param_groups[0]["params"][2] = params[6]


def _move(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    moved = optimizer.param_groups[0]["params"].pop(0)
    optimizer.param_groups[1]["params"].insert(1, moved)


def _reverse(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    optimizer.param_groups.reverse()


def _raw_dict(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    optimizer.param_groups.append({**group, "params": [params[6], params[7]], "lr": 0.01})


def _raw_dict_then_its_list(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """A raw dict's own list, edited through the user's handle after the optimizer has seen it."""
    members = [params[6]]
    group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    optimizer.param_groups.append({**group, "params": members})
    optimizer.step()  # with the one-element list; then the list grows
    members.append(params[7])


def _delete_group(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    del optimizer.param_groups[0]


def _new_list(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    optimizer.param_groups[1]["params"] = [params[5], params[4], params[7]]


def _new_group_dict(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    optimizer.param_groups[1] = {**optimizer.param_groups[1], "lr": 0.03}


def _clear_and_refill(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    members = optimizer.param_groups[0]["params"]
    kept = list(members)
    members.clear()
    members += kept[::-1]


EDITS = {
    "append a tensor": _append,
    "remove a tensor": _remove,
    "replace a tensor": _replace,
    "move a tensor between groups": _move,
    "reverse param_groups": _reverse,
    "append a raw dict": _raw_dict,
    "edit a raw dict's own list": _raw_dict_then_its_list,
    "delete a group": _delete_group,
    "assign a new params list": _new_list,
    "replace a group dict": _new_group_dict,
    "clear and refill reversed": _clear_and_refill,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("edit", list(EDITS))
def test_edit_is_honoured_as_torch_does(edit: str, dtype: torch.dtype) -> None:
    _compare(EDITS[edit], dtype)


def test_removed_parameter_keeps_its_values_and_its_state() -> None:
    """A parameter removed from param_groups stops moving, keeps its values (in memory of its
    own: the flat buffer may go) and its momentum buffer stays in ``optimizer.state``, as torch's."""
    params = _params(torch.float32, 0)[:4]
    optimizer = FusedSGD(params, **HP)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    removed = optimizer.param_groups[0]["params"].pop(0)
    before, buffer = removed.detach().clone(), optimizer.state[removed]["momentum_buffer"].clone()
    optimizer.step()
    optimizer.step()
    assert torch.equal(removed, before)
    assert torch.equal(optimizer.state[removed]["momentum_buffer"], buffer)
    flat = {p.untyped_storage().data_ptr() for p in optimizer.param_groups[0]["params"]}
    assert removed.untyped_storage().data_ptr() not in flat


def _refused(optimizer: FusedSGD, params: list[nn.Parameter], error: type[Exception], match: str) -> None:
    """``step()`` raises ``error`` and changes no parameter, gradient or state."""
    before = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    with pytest.raises(error, match=match):
        optimizer.step()
    for param, value, grad in zip(params, before, grads):
        assert torch.equal(param, value)
        assert (param.grad is None and grad is None) or torch.equal(param.grad, grad)


def _stepped(dtype: torch.dtype = torch.float32) -> tuple[FusedSGD, list[nn.Parameter]]:
    optimizer, params, _, _ = _stepped_with_reference(dtype)
    return optimizer, params


def _stepped_with_reference(
    dtype: torch.dtype = torch.float32,
) -> tuple[FusedSGD, list[nn.Parameter], torch.optim.SGD, list[nn.Parameter]]:
    """FusedSGD and torch.optim.SGD over copies of the same parameters, after one step on the
    same gradients (the last two parameters are outside both optimizers)."""
    params = _params(dtype, int(torch.randint(0, 2**31 - 1, ())))
    twin = [p.detach().clone().requires_grad_() for p in params]
    optimizer = FusedSGD([{"params": params[:4]}, {"params": params[4:6]}], **HP)
    reference = torch.optim.SGD([{"params": twin[:4]}, {"params": twin[4:6]}], foreach=False, **HP)
    _step_both(optimizer, params, reference, twin)
    return optimizer, params, reference, twin


def _step_both(optimizer: FusedSGD, params: list, reference: torch.optim.SGD, twin: list) -> None:
    for mine, theirs in zip(params, twin):
        mine.grad = torch.randn_like(mine)
        theirs.grad = mine.grad.clone()
    optimizer.step()
    reference.step()
    for index, (mine, theirs) in enumerate(zip(params, twin)):
        if mine.dtype == torch.float32:
            assert torch.equal(mine, theirs), f"parameter {index}"
        else:
            assert relative_error(mine, theirs) <= 8 * torch.finfo(mine.dtype).eps, f"parameter {index}"


def test_a_raw_dict_without_hyperparameters_is_refused_naming_them() -> None:
    """torch: ``KeyError: 'momentum'`` at the step. Here: the missing keys, and the way out."""
    optimizer, params = _stepped()
    optimizer.param_groups.append({"params": [params[6]], "lr": 0.1})
    params[6].grad = torch.randn_like(params[6])
    _refused(optimizer, params, InvalidHyperparameterError, r"param group 2.*'momentum'")


def test_the_same_tensor_twice_is_refused() -> None:
    """torch would step it twice; a flat buffer holds it once: refused, naming both places."""
    optimizer, params = _stepped()
    optimizer.param_groups[1]["params"].append(params[0])
    _refused(optimizer, params, InvalidParameterError, r"param group 1, parameter 2.*param group 0, parameter 0")


def test_a_non_tensor_is_refused() -> None:
    optimizer, params = _stepped()
    optimizer.param_groups[0]["params"].append("weight")
    _refused(optimizer, params, InvalidParameterError, r"param group 0, parameter 4: is a str")


def test_a_refused_edit_can_be_undone() -> None:
    """After the error, undoing the edit steps as torch (nothing half-applied)."""
    optimizer, params, reference, twin = _stepped_with_reference()
    optimizer.param_groups[0]["params"].append(params[1])
    with pytest.raises(InvalidParameterError):
        optimizer.step()
    optimizer.param_groups[0]["params"].pop()
    _step_both(optimizer, params, reference, twin)


# ----- hyperparameters written after construction (item 5) ---------------------------------


def _torch_raises(dtype: torch.dtype, group: dict) -> type[Exception] | None:
    """What torch.optim.SGD(foreach=False) raises on a second step with ``group``'s values."""
    param = nn.Parameter(torch.randn(1000).to(dtype))
    optimizer = torch.optim.SGD([param], foreach=False, **HP)
    try:
        for _ in range(2):
            param.grad = torch.randn(1000).to(dtype)
            optimizer.step()
            optimizer.param_groups[0].update(group)
    except (RuntimeError, TypeError) as error:
        return type(error)
    return None


OVERFLOWS = [
    (torch.float32, {"lr": 1e39}),
    (torch.float32, {"weight_decay": 1e300}),
    (torch.float32, {"dampening": -1e39}),
    (torch.float32, {"momentum": 1e39, "nesterov": True}),
    (torch.float16, {"lr": 1e5}),
    (torch.float16, {"lr": 65520.0}),
    (torch.bfloat16, {"weight_decay": 1e39}),
]


@pytest.mark.parametrize(("dtype", "group"), OVERFLOWS, ids=lambda x: str(x))
def test_a_value_that_overflows_the_dtype_raises_as_torch(dtype: torch.dtype, group: dict) -> None:
    assert _torch_raises(dtype, group) is RuntimeError  # the oracle raises: so must we
    optimizer, params = _stepped(dtype)
    optimizer.param_groups[0].update(group)
    _refused(optimizer, params, HyperparameterOverflowError, r"param group 0: .* without overflow")
    assert issubclass(HyperparameterOverflowError, RuntimeError)


@pytest.mark.parametrize(
    ("dtype", "group"),
    [
        (torch.bfloat16, {"lr": 1e5}),  # bf16 holds 1e5: torch converts it
        (torch.float16, {"lr": 65504.0}),  # fp16's largest value
        (torch.float32, {"momentum": 1e300}),  # multiplies, never converted
    ],
    ids=str,
)
def test_a_value_torch_converts_is_accepted(dtype: torch.dtype, group: dict) -> None:
    assert _torch_raises(dtype, group) is None
    optimizer, params = _stepped(dtype)
    optimizer.param_groups[0].update(group)
    optimizer.step()


def test_the_overflow_check_follows_the_dtype_after_model_half() -> None:
    """lr=1e5 is fine for fp32 parameters, too large once they become fp16 (torch raises then)."""
    optimizer, params = _stepped(torch.float32)
    optimizer.param_groups[0]["lr"] = 1e5
    optimizer.step()
    for param in params:
        param.data = param.data.half()
        param.grad = torch.randn_like(param)
    _refused(optimizer, params, HyperparameterOverflowError, r"lr=100000.0 cannot be converted to torch.float16")


@pytest.mark.parametrize("value", ["0.1", None, [0.1]], ids=repr)
def test_a_non_number_written_after_construction_raises_a_type_error(value: object) -> None:
    """torch: ``TypeError: bad operand type for unary -``; here a TypeError naming the group and field."""
    param = nn.Parameter(torch.randn(10))
    reference = torch.optim.SGD([param], foreach=False, lr=0.1)
    reference.param_groups[0]["lr"] = value
    param.grad = torch.randn(10)
    with pytest.raises(TypeError):
        reference.step()
    optimizer, params = _stepped()
    optimizer.param_groups[1]["lr"] = value
    _refused(optimizer, params, TypeError, r"param group 1: invalid hyperparameter 'lr'")


def test_a_fixed_value_steps_as_torch_again() -> None:
    """The error is raised at every step until the value is fixed; then the step is torch's."""
    optimizer, params, reference, twin = _stepped_with_reference()
    optimizer.param_groups[0]["lr"] = 1e39
    for _ in range(2):
        with pytest.raises(HyperparameterOverflowError):
            optimizer.step()
    optimizer.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = 0.2
    _step_both(optimizer, params, reference, twin)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_schedulers_assigning_lr_and_momentum_every_step(dtype: torch.dtype) -> None:
    """OneCycleLR writes ``lr`` and ``momentum`` into every group at every step: each new value is
    checked and used, as torch uses it."""

    def run(cls: Callable, params: list[nn.Parameter]) -> list[torch.Tensor]:
        optimizer = cls([{"params": params[:4]}, {"params": params[4:6]}], **HP)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=12)
        generator = torch.Generator().manual_seed(7)
        for _ in range(12):
            optimizer.zero_grad()
            for param in params[:6]:
                param.grad = torch.randn(param.shape, generator=generator).to(dtype)
            optimizer.step()
            schedule.step()
        return [p.detach() for p in params[:6]]

    seed = int(torch.randint(0, 2**31 - 1, ()))
    ours = run(FusedSGD, _params(dtype, seed))
    theirs = run(lambda *a, **k: torch.optim.SGD(*a, foreach=False, **k), _params(dtype, seed))
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if dtype == torch.float32:
            assert torch.equal(a, b), f"seed {seed}, parameter {index}"
        else:
            assert relative_error(a, b) <= 16 * torch.finfo(dtype).eps, f"seed {seed}, parameter {index}"


def test_invalidate_layout_rebuilds_and_steps_as_torch() -> None:
    """The public way to force a new layout: the next step lays the parameters out afresh, momentum
    carried by identity, and equals torch."""
    optimizer, params, reference, twin = _stepped_with_reference()
    before = optimizer.get_combined_params()[0].data_ptr()
    optimizer.invalidate_layout()
    _step_both(optimizer, params, reference, twin)
    assert optimizer.get_combined_params()[0].data_ptr() != before
    for mine, theirs in zip(params[:6], twin[:6]):
        assert torch.equal(optimizer.state[mine]["momentum_buffer"], reference.state[theirs]["momentum_buffer"])
