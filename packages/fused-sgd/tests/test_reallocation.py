"""Re-allocated parameters and gradients are detected: re-adopted, rebuilt, or reported. Never lost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_core import InvalidParameterError, ParameterReallocatedError
from fused_sgd import FusedSGD
from fused_testing.parity import make_batches, make_model
from fused_testing.reference import relative_error

HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


class Pair:
    """The same model trained by torch.optim.SGD (a) and FusedSGD (b), step by step."""

    def __init__(self, kind: str = "mlp", dtype: torch.dtype = torch.float32) -> None:
        self.models = [make_model(kind, seed=0, dtype=dtype) for _ in range(2)]
        self.opts = [
            torch.optim.SGD(self.models[0].parameters(), foreach=False, **HP),
            FusedSGD(self.models[1].parameters(), **HP),
        ]
        self.batches = iter(make_batches(kind, 100, seed=3, dtype=dtype))

    def train(self, steps: int, zero_grad=lambda model, opt: opt.zero_grad(set_to_none=True)) -> None:
        for _ in range(steps):
            inputs, targets = next(self.batches)
            for model, opt in zip(self.models, self.opts):
                zero_grad(model, opt)
                dtype = next(model.parameters()).dtype
                F.cross_entropy(model(inputs.to(dtype)).float(), targets).backward()
                opt.step()

    def apply(self, change) -> None:
        for model in self.models:
            change(model)

    def error(self) -> float:
        a, b = (list(model.parameters()) for model in self.models)
        return max(relative_error(pb, pa) for pa, pb in zip(a, b))


def test_p_data_same_shape_is_readopted_with_state_kept() -> None:
    pair = Pair()
    pair.train(3)
    new_values = [p.detach() * 0.5 for p in pair.models[0].parameters()]

    def replace(model):
        for p, value in zip(model.parameters(), new_values):
            p.data = value.clone()

    pair.apply(replace)
    fused = pair.opts[1]
    momentum_before = [fused.state[p]["momentum_buffer"].clone() for p in pair.models[1].parameters()]
    pair.train(1)
    # momentum carried (not re-initialised): torch kept its buffers too, so parity holds
    assert pair.error() <= 1e-5
    assert all(b.abs().sum() > 0 for b in momentum_before)
    pair.train(4)
    assert pair.error() <= 1e-5
    # the re-adopted tensors live in the flat buffer again
    flat = fused.get_combined_params()[0]
    for p in pair.models[1].parameters():
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_p_data_other_shape_raises_naming_the_parameter_and_mutates_nothing() -> None:
    model = make_model("mlp")
    opt = FusedSGD(model.named_parameters(), **HP)
    inputs, targets = make_batches("mlp", 1)[0]
    F.cross_entropy(model(inputs), targets).backward()
    opt.step()
    model[2].weight.data = torch.randn(7, 5)
    others = {name: p.detach().clone() for name, p in model.named_parameters() if name != "2.weight"}
    momentum = {name: opt.state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()}
    with pytest.raises(ParameterReallocatedError, match=r"'2\.weight'.*param group 0, index 2.*\(7, 5\)"):
        opt.step()
    for name, p in model.named_parameters():
        if name != "2.weight":
            assert torch.equal(p, others[name])
            assert torch.equal(opt.state[p]["momentum_buffer"], momentum[name])


def test_module_double_rebuilds_and_carries_momentum() -> None:
    pair = Pair()
    pair.train(3)
    fused = pair.opts[1]
    old_layout = fused._layout
    pair.apply(lambda model: model.double())
    pair.train(5)
    assert fused._layout is not old_layout
    assert [b.dtype for b in fused.get_combined_params()] == [torch.float64]
    # torch keeps fp32 momentum buffers beside fp64 params; ours converts them to fp64
    assert pair.error() <= 1e-6


def test_module_half_rebuilds_and_carries_momentum() -> None:
    pair = Pair()
    pair.train(3)
    model, fused = pair.models[1], pair.opts[1]
    momentum = {id(p): fused.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    model.half()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    inputs, targets = next(pair.batches)
    fused.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs.half()).float(), targets).backward()
    fused.step()
    for p in model.parameters():
        assert p.dtype == torch.float16
        buf = fused.state[p]["momentum_buffer"]
        assert buf.dtype == torch.float16
        # b = μ b_old + (g + λ θ): the carried momentum is in there, to fp16 precision
        expected = 0.9 * momentum[id(p)].double() + p.grad.double() + 1e-3 * before[id(p)].double()
        assert relative_error(buf, expected) <= 4 * torch.finfo(torch.float16).eps
        assert relative_error(p, before[id(p)].double() - 0.05 * expected) <= 4 * torch.finfo(torch.float16).eps


def test_module_cpu_on_cpu_changes_nothing() -> None:
    pair = Pair()
    pair.train(2)
    layout = pair.opts[1]._layout
    pair.apply(lambda model: model.cpu())
    pair.train(3)
    assert pair.opts[1]._layout is layout
    assert pair.error() <= 1e-5


def test_module_load_state_dict_in_place_needs_no_rebuild() -> None:
    pair = Pair()
    pair.train(2)
    snapshot = {k: v.clone() * 0.9 for k, v in pair.models[0].state_dict().items()}
    pair.apply(lambda model: model.load_state_dict(snapshot))
    fused = pair.opts[1]
    layout = fused._layout
    assert layout.is_current()  # in-place copies leave the flat buffers bound
    pair.train(3)
    assert fused._layout is layout
    assert pair.error() <= 1e-5


@pytest.mark.parametrize(
    "zero_grad",
    [
        pytest.param(lambda model, opt: opt.zero_grad(), id="optimizer-default"),
        pytest.param(lambda model, opt: opt.zero_grad(set_to_none=True), id="optimizer-set-to-none"),
        pytest.param(lambda model, opt: model.zero_grad(), id="module-zero-grad"),
    ],
)
def test_gradients_replaced_by_zero_grad_variants(zero_grad) -> None:
    pair = Pair()
    pair.train(5, zero_grad=zero_grad)
    assert pair.error() <= 1e-5


def test_p_grad_assigned_another_tensor() -> None:
    pair = Pair()
    pair.train(2)
    generator = torch.Generator().manual_seed(5)
    grads = [torch.randn(p.shape, generator=generator) for p in pair.models[0].parameters()]
    for model, opt in zip(pair.models, pair.opts):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    assert pair.error() <= 1e-5


def test_gradient_of_another_shape_is_an_error_naming_the_parameter() -> None:
    model = make_model("mlp")
    opt = FusedSGD(model.named_parameters(), **HP)
    inputs, targets = make_batches("mlp", 1)[0]
    F.cross_entropy(model(inputs), targets).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    model[0].bias.grad.data = torch.randn(3)
    with pytest.raises(InvalidParameterError, match=r"'0\.bias'.*gradient of shape"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
