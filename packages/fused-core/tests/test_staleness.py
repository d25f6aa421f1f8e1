"""Re-allocation detection, through Signum and its per-tensor reference: re-assigned data and
gradients are re-adopted, missing gradients skip their parameter, late gradients start their
state, loaded state is adopted, and what cannot be re-adopted is an error naming the parameter."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_core import InvalidParameterError, ParameterReallocatedError
from fused_testing import relative_error

RTOL = 1e-6
SHAPES = [(128, 64), (64,), (32, 16, 3, 3), (2000,), (10, 128)]


class Twins:
    """The fused optimizer and the reference over identical fp32 parameters, fed identical gradients."""

    def __init__(self, signum, generator: torch.Generator, lr: float = 0.01, beta: float = 0.9) -> None:
        self.generator = generator
        values = [torch.randn(shape, generator=generator) for shape in SHAPES]
        self.params = [nn.Parameter(v.clone()) for v in values]
        self.refs = [nn.Parameter(v.clone()) for v in values]
        self.optimizer = signum.Signum(self.params, lr=lr, beta=beta)
        self.reference = signum.Reference(self.refs, lr=lr, beta=beta)

    def set_grads(self, skip: tuple[int, ...] = ()) -> None:
        for index, (p, r) in enumerate(zip(self.params, self.refs)):
            grad = None if index in skip else torch.randn(p.shape, generator=self.generator)
            p.grad = None if grad is None else grad.clone()
            r.grad = grad

    def step(self) -> None:
        self.optimizer.step()
        self.reference.step()

    def check(self, where: str) -> None:
        for index, (p, r) in enumerate(zip(self.params, self.refs)):
            assert relative_error(p, r) <= RTOL, f"{where}: parameter {index}"
            assert (p in self.optimizer.state) == (r in self.reference.state), f"{where}: state of {index}"
            if r in self.reference.state:
                momentum = self.optimizer.state[p]["momentum"]
                assert relative_error(momentum, self.reference.state[r]["momentum"]) <= RTOL, (
                    f"{where}: momentum {index}"
                )


def test_reassigned_data_is_readopted_and_state_kept(signum, generator) -> None:
    twins = Twins(signum, generator)
    for _ in range(3):
        twins.set_grads()
        twins.step()
    twins.check("before")
    momenta = [twins.optimizer.state[p]["momentum"].clone() for p in twins.params]

    for index in (0, 2):  # a Linear weight and a conv weight get new storage
        new = torch.randn(SHAPES[index], generator=generator)
        twins.params[index].data = new.clone()
        twins.refs[index].data = new.clone()
    for p, momentum in zip(twins.params, momenta):
        assert torch.equal(twins.optimizer.state[p]["momentum"], momentum), "state kept"
    for step in range(3):
        twins.set_grads()
        twins.step()
        twins.check(f"step {step} after p.data = new")
    moved = twins.params[0]
    assert moved.untyped_storage().data_ptr() == twins.params[1].untyped_storage().data_ptr(), "back in the bucket"


def test_param_without_grad_is_skipped(signum, generator) -> None:
    twins = Twins(signum, generator)
    for _ in range(2):
        twins.set_grads()
        twins.step()
    skipped = twins.params[3]
    value, momentum = skipped.detach().clone(), twins.optimizer.state[skipped]["momentum"].clone()
    for step in range(2):
        twins.set_grads(skip=(3,))
        twins.step()
        twins.check(f"step {step} with parameter 3 skipped")
        assert torch.equal(skipped, value) and skipped.grad is None
        assert torch.equal(twins.optimizer.state[skipped]["momentum"], momentum)
    # Parameter 3 gets a gradient again, the others' are written in place into their bound
    # gradients: the only change is a gradient appearing where there was none.
    for index, (p, r) in enumerate(zip(twins.params, twins.refs)):
        r.grad = torch.randn(p.shape, generator=generator)
        if index == 3:
            p.grad = r.grad.clone()
        else:
            p.grad.copy_(r.grad)
    twins.step()
    twins.check("parameter 3 back")
    assert not torch.equal(skipped, value)


def test_grad_reassigned_to_another_tensor_is_read_where_it_lies(signum, generator) -> None:
    twins = Twins(signum, generator)
    twins.set_grads()
    twins.step()
    for step in range(3):
        # Gradients written in place into the bound p.grad, except one replaced by a new tensor.
        for index, (p, r) in enumerate(zip(twins.params, twins.refs)):
            grad = torch.randn(p.shape, generator=generator)
            if index == step:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
            r.grad = grad
        given = [p.grad for p in twins.params]
        twins.step()
        twins.check(f"step {step}, grad {step} replaced")
        assert all(p.grad is grad for p, grad in zip(twins.params, given)), "p.grad is still the tensor set"


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(32, 96)
        self.head_a = nn.Linear(96, 10)
        self.head_b = nn.Linear(96, 10)

    def forward(self, inputs: torch.Tensor, use_b: bool) -> torch.Tensor:
        hidden = torch.relu(self.trunk(inputs))
        return self.head_a(hidden) + self.head_b(hidden) if use_b else self.head_a(hidden)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batch, use_b: bool, set_to_none: bool | None):
    if set_to_none is not None:
        optimizer.zero_grad(set_to_none=set_to_none)
    inputs, targets = batch
    F.cross_entropy(model(inputs, use_b), targets).backward()
    optimizer.step()


def _batches(generator: torch.Generator, steps: int):
    return [
        (torch.randn(64, 32, generator=generator), torch.randint(0, 10, (64,), generator=generator))
        for _ in range(steps)
    ]


def _compare(model, optimizer, reference_model, reference, where: str) -> None:
    for (name, p), r in zip(model.named_parameters(), reference_model.parameters()):
        assert relative_error(p, r) <= RTOL, f"{where}: {name}"
        assert (p in optimizer.state) == (r in reference.state), f"{where}: state of {name}"
        if r in reference.state:
            assert relative_error(optimizer.state[p]["momentum"], reference.state[r]["momentum"]) <= RTOL


@pytest.mark.parametrize("set_to_none", [True, False])
def test_late_first_gradient_starts_its_state_then(signum, generator, set_to_none: bool) -> None:
    """head_b joins the loss at step 4: it is untouched before, and its momentum starts at (1 - beta) g then.
    With zero_grad(set_to_none=False) the other gradients stay bound: head_b's new gradient is the only change."""
    model = TwoHeads()
    reference_model = copy.deepcopy(model)
    optimizer = signum.Signum(model.named_parameters(), lr=0.01, beta=0.9)
    reference = signum.Reference(reference_model.parameters(), lr=0.01, beta=0.9)
    head_b = [p.detach().clone() for p in model.head_b.parameters()]
    for step, batch in enumerate(_batches(generator, 8)):
        use_b = step >= 4
        _train(model, optimizer, batch, use_b, set_to_none=set_to_none)
        _train(reference_model, reference, batch, use_b, set_to_none=set_to_none)
        _compare(model, optimizer, reference_model, reference, f"step {step}")
        for p, start in zip(model.head_b.parameters(), head_b):
            assert torch.equal(p, start) != use_b
            assert (p.grad is None) != use_b


@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_grad(signum, generator, set_to_none: bool) -> None:
    model = TwoHeads()
    reference_model = copy.deepcopy(model)
    optimizer = signum.Signum(model.parameters(), lr=0.01, beta=0.9)
    reference = signum.Reference(reference_model.parameters(), lr=0.01, beta=0.9)
    for step, batch in enumerate(_batches(generator, 6)):
        if step > 0:
            grads = {name: p.grad for name, p in model.named_parameters()}
            optimizer.zero_grad(set_to_none=set_to_none)
            for name, p in model.named_parameters():
                if set_to_none:
                    assert p.grad is None, name
                else:  # the same tensors, zeroed (and, from the first such call on, in the flat buffer)
                    assert p.grad is grads[name], name
                    assert not p.grad.any(), name
        _train(model, optimizer, batch, True, set_to_none=None)
        _train(reference_model, reference, batch, True, set_to_none=True)
        _compare(model, optimizer, reference_model, reference, f"step {step}")


def test_loaded_state_is_adopted(signum, generator) -> None:
    """A state_dict loaded after some steps (here the reference's, momenta negated) replaces the
    momenta the flat buffers hold."""
    twins = Twins(signum, generator)
    for _ in range(3):
        twins.set_grads()
        twins.step()
    for r in twins.refs:
        twins.reference.state[r]["momentum"].neg_()
    twins.optimizer.load_state_dict(copy.deepcopy(twins.reference.state_dict()))
    twins.check("loaded")
    for step in range(2):
        twins.set_grads()
        twins.step()
        twins.check(f"step {step} after load_state_dict")


def _signum_on_mlp(signum, generator, named: bool = True):
    model = nn.Sequential(nn.Linear(40, 80), nn.ReLU(), nn.Linear(80, 10))
    optimizer = signum.Signum(model.named_parameters() if named else model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    return model, optimizer


@pytest.mark.parametrize("named", [True, False])
def test_reallocated_with_another_shape_is_an_error(signum, generator, named: bool) -> None:
    model, optimizer = _signum_on_mlp(signum, generator, named)
    optimizer.step()
    model[2].weight.data = torch.randn(10, 81, generator=generator)
    with pytest.raises(ParameterReallocatedError) as info:
        optimizer.step()
    message = str(info.value)
    assert "(10, 81)" in message
    assert "'2.weight'" in message if named else "param group 0, index 2" in message


@pytest.mark.parametrize("when", ["first step", "later step"])
@pytest.mark.parametrize("what", ["dtype", "shape"])
def test_unusable_grad_is_an_error_naming_the_parameter(signum, generator, when: str, what: str) -> None:
    model, optimizer = _signum_on_mlp(signum, generator)
    if when == "later step":
        optimizer.step()
    grad = model[0].bias.grad
    grad.data = grad.data.double() if what == "dtype" else torch.randn(81, generator=generator)
    with pytest.raises(InvalidParameterError) as info:
        optimizer.step()
    message = str(info.value)
    assert "'0.bias'" in message and f"gradient of {what}" in message


def test_zero_grad_set_to_none_while_old_grads_are_referenced(signum, generator) -> None:
    """A gradient logger keeps the bound (flat) gradients alive, so dropping them changes no
    storage use count: switching to zero_grad(set_to_none=True) must still use the fresh
    autograd gradients, not the stale flat ones."""
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10))
    twin = copy.deepcopy(model)
    optimizer = signum.Signum(model.parameters(), lr=0.01)
    reference = signum.Reference(twin.parameters(), lr=0.01)
    logged = {}
    for step in range(4):
        inputs, targets = torch.randn(32, 48, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        if step >= 2:
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.zero_grad()
        reference.zero_grad()
        for m, opt in ((model, optimizer), (twin, reference)):
            F.cross_entropy(m(inputs), targets).backward()
            opt.step()
        logged = {name: p.grad for name, p in model.named_parameters()}
        for (name, p), r in zip(model.named_parameters(), twin.parameters()):
            assert relative_error(p, r) <= RTOL, f"step {step}: {name}"
    assert len(logged) == 4


def test_module_zero_grad_while_old_grads_are_referenced(signum, generator) -> None:
    """Same, with the model's own zero_grad() (torch sets every p.grad to None), which fused-core
    does not see being called."""
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10))
    twin = copy.deepcopy(model)
    optimizer = signum.Signum(model.parameters(), lr=0.01)
    reference = signum.Reference(twin.parameters(), lr=0.01)
    logged = {}
    for step in range(4):
        inputs, targets = torch.randn(32, 48, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        for m, opt in ((model, optimizer), (twin, reference)):
            m.zero_grad()
            F.cross_entropy(m(inputs), targets).backward()
            opt.step()
        logged = {name: p.grad for name, p in model.named_parameters()}
        for (name, p), r in zip(model.named_parameters(), twin.parameters()):
            assert relative_error(p, r) <= RTOL, f"step {step}: {name}"
    assert len(logged) == 4


def test_reassigned_data_while_a_new_view_keeps_the_use_count(signum, generator) -> None:
    """``p.data = new`` drops one use count of the flat parameter buffer, a new ``detach()`` of
    another parameter adds one: the re-pointed parameter must still be re-adopted and updated."""
    twins = Twins(signum, generator)
    for _ in range(3):
        twins.set_grads()
        twins.step()
    kept = twins.params[3].detach()
    new = torch.randn(SHAPES[0], generator=generator)
    twins.params[0].data = new.clone()
    twins.refs[0].data = new.clone()
    for p, r in zip(twins.params, twins.refs):  # gradients written in place: nothing else changes
        r.grad = torch.randn(p.shape, generator=generator)
        p.grad.copy_(r.grad)
    twins.step()
    twins.check("after p.data = new")
    assert kept.shape == SHAPES[3]


def test_middle_grad_set_to_none_while_referenced_elsewhere(signum, generator) -> None:
    """``p.grad = None`` on one parameter while its old gradient is referenced elsewhere (here a
    gradient logger): the step skips it, as torch.optim does (a step reads every ``.grad``)."""
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10))
    twin = copy.deepcopy(model)
    optimizer = signum.Signum(model.parameters(), lr=0.01)
    reference = signum.Reference(twin.parameters(), lr=0.01)
    for step in range(4):
        batch = torch.randn(32, 48, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        for m, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(m(batch[0]), batch[1]).backward()
        logged = {name: p.grad for name, p in model.named_parameters()}  # e.g. a gradient-norm logger
        if step == 3:  # skip the middle layer's update this step
            model[2].weight.grad = None
            twin[2].weight.grad = None
        optimizer.step()
        reference.step()
        for (name, p), r in zip(model.named_parameters(), twin.parameters()):
            assert relative_error(p, r) <= 1e-6, f"step {step}: {name}"
    assert len(logged) == 4


def test_middle_param_reassigned_while_a_new_view_exists(signum, generator) -> None:
    """``p.data = new`` on a parameter inside a group's range drops one use count of the flat param
    buffer, a new ``detach()`` of another parameter adds one, and the range's first and last
    parameters are untouched: the use counts and sentinels see nothing, and the check of every
    parameter's data pointer on the staged path (this plugin has no segment launcher) must."""
    params = [nn.Parameter(torch.randn(1000, generator=generator)) for _ in range(3)]
    optimizer = signum.Signum(params, lr=0.1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    kept = params[0].detach()  # e.g. a snapshot holding one tensor
    new = torch.randn(1000, generator=generator)
    params[1].data = new.clone()
    optimizer.step()
    assert kept.shape == (1000,)
    assert not torch.equal(params[1].detach(), new), "parameter 1 was not updated"
