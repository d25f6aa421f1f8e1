"""fp32, fp16 and bf16 parameters in one FusedSGD (in one group and in several), with
0-dim and numel-0 parameters, trained through a real model with real backward passes.

Each step, the gradients FusedSGD sees are also fed to torch.optim.SGD(foreach=False)
over copies of the parameters and to a float64 ReferenceSGD. fp32 parameters must match
torch (relative 1e-5). fp16/bf16 ones must stay within one ulp per step of the float64
reference (eps * max|p| per step, as in test_low_precision.py) and no further from it
than torch in the same dtype is (plus one ulp). Each low-precision bucket holds more
than 4096 elements and an odd-sized tensor.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_sgd import FusedSGD
from fused_testing.parity import make_batches
from fused_testing.reference import ReferenceSGD, relative_error

STEPS = 8
LOW_PRECISION = (torch.float16, torch.bfloat16)


class MixedPrecisionNet(nn.Module):
    """fp32 -> fp16 -> bf16 -> fp32 layers, with 0-dim scales and numel-0 parameters.

    ``dtype`` replaces every dtype (``torch.float32``: the same model for a direct
    side-by-side comparison with torch)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        low16, low_bf = (dtype, dtype) if dtype else (torch.float16, torch.bfloat16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inp = nn.Linear(64, 64)  # fp32, 4096 + 64
            self.scale = nn.Parameter(torch.tensor(1.5))  # 0-dim fp32
            self.empty = nn.Parameter(torch.empty(0))  # numel-0 fp32, between two used tensors
            self.fp16 = nn.Linear(64, 67).to(low16)  # fp16, 4288 + 67 (odd)
            self.fp16_empty = nn.Parameter(torch.empty(3, 0, dtype=low16))  # numel-0, 2-D
            self.bf16 = nn.Linear(67, 64).to(low_bf)  # bf16, 4288 + 64
            self.bf16_scale = nn.Parameter(torch.tensor(0.75, dtype=low_bf))  # 0-dim bf16
            self.out = nn.Linear(64, 10)  # fp32
            self.unused_empty = nn.Parameter(torch.empty(0))  # numel-0, never gets a gradient

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x)) * self.scale + self.empty.sum()
        h = torch.relu(self.fp16(h.to(self.fp16.weight.dtype))) + self.fp16_empty.sum()
        h = torch.tanh(self.bf16(h.to(self.bf16.weight.dtype))) * self.bf16_scale
        return self.out(h.float())


HP = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False)

Grouping = Callable[[nn.Module], list[dict]]


def one_group(model: nn.Module) -> list[dict]:
    return [{"params": list(model.parameters()), **HP}]


def by_dtype(model: nn.Module) -> list[dict]:
    """One group per dtype, each with its own hyperparameters."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dtype == torch.float32], **HP},
        {
            "params": [p for p in params if p.dtype == torch.float16],
            **HP,
            "lr": 0.02,
            "nesterov": False,
            "dampening": 0.1,
        },
        {"params": [p for p in params if p.dtype == torch.bfloat16], **HP, "momentum": 0.0, "nesterov": False},
    ]


def interleaved(model: nn.Module) -> list[dict]:
    """Two groups, each mixing all three dtypes."""
    params = list(model.parameters())
    return [
        {"params": params[0::2], **HP},
        {"params": params[1::2], **HP, "lr": 0.03, "momentum": 0.5, "nesterov": False},
    ]


GROUPINGS: dict[str, Grouping] = {"one-group": one_group, "by-dtype": by_dtype, "interleaved": interleaved}


def _copies(group: dict) -> dict:
    return {**group, "params": [p.detach().clone().requires_grad_() for p in group["params"]]}


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_mixed_dtypes_against_torch_and_float64_reference(grouping: str) -> None:
    model = MixedPrecisionNet()
    groups = GROUPINGS[grouping](model)
    ours = FusedSGD(groups, lr=0.05)
    shadow_groups = [_copies(group) for group in groups]
    shadow = torch.optim.SGD(shadow_groups, lr=0.05, foreach=False)
    references = [ReferenceSGD(group["params"], **{k: v for k, v in group.items() if k in HP}) for group in groups]
    names = {p: name for name, p in model.named_parameters()}
    buckets = {dtype: sum(p.numel() for p in model.parameters() if p.dtype == dtype) for dtype in LOW_PRECISION}
    assert all(numel > 4096 and numel % 2 == 1 for numel in buckets.values())

    losses = []
    for inputs, targets in make_batches("mlp", STEPS, seed=17):
        ours.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        losses.append(loss.item())
        for group, shadow_group, reference in zip(groups, shadow_groups, references):
            grads = [p.grad.clone() if p.grad is not None else None for p in group["params"]]
            for copy, grad in zip(shadow_group["params"], grads):
                copy.grad = grad
            reference.step(grads)
        ours.step()
        shadow.step()
    assert losses[0] != losses[-1]

    for group, shadow_group, reference in zip(groups, shadow_groups, references):
        for p, theirs, exact in zip(group["params"], shadow_group["params"], reference.params):
            name = f"{names[p]} ({p.dtype})"
            assert p.shape == exact.shape and p.dtype == theirs.dtype
            if p.dtype == torch.float32:
                assert relative_error(p, theirs) <= 1e-5, name
                assert relative_error(p, exact) <= 1e-5, name
            else:
                eps = torch.finfo(p.dtype).eps
                ours_error, torch_error = relative_error(p, exact), relative_error(theirs, exact)
                assert ours_error <= STEPS * eps, f"{name}: {ours_error:.2e} > {STEPS} ulps"
                assert ours_error <= torch_error + eps, f"{name}: ours {ours_error:.2e}, torch {torch_error:.2e}"
            if p.grad is not None:
                momentum = ours.state[p].get("momentum_buffer")
                expected = shadow.state[theirs].get("momentum_buffer")
                assert (momentum is None) == (expected is None), name
                if momentum is not None:
                    assert momentum.dtype == p.dtype, name
                    tolerance = 1e-5 if p.dtype == torch.float32 else STEPS * torch.finfo(p.dtype).eps
                    assert relative_error(momentum, exact_buffer(reference, exact)) <= tolerance, name
    assert model.unused_empty.grad is None
    ours_state, torch_state = ours.state_dict()["state"], shadow.state_dict()["state"]
    assert {i: sorted(v) for i, v in ours_state.items()} == {i: sorted(v) for i, v in torch_state.items()}
    assert saved_size(ours.state_dict()) <= saved_size(shadow.state_dict())


def saved_size(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def exact_buffer(reference: ReferenceSGD, param: Tensor) -> Tensor:
    index = next(i for i, p in enumerate(reference.params) if p is param)
    buffer = reference.momentum_buffers[index]
    assert buffer is not None
    return buffer


@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_dim_and_empty_parameters_side_by_side_with_torch(set_to_none: bool) -> None:
    """The same network in fp32 throughout, trained by FusedSGD and by torch directly."""
    models = {"ours": MixedPrecisionNet(dtype=torch.float32), "torch": MixedPrecisionNet(dtype=torch.float32)}
    optimizers = {
        "ours": FusedSGD(models["ours"].parameters(), **HP),
        "torch": torch.optim.SGD(models["torch"].parameters(), foreach=False, **HP),
    }
    for inputs, targets in make_batches("mlp", STEPS, seed=19):
        for key, model in models.items():
            optimizers[key].zero_grad(set_to_none=set_to_none)
            F.cross_entropy(model(inputs), targets).backward()
            optimizers[key].step()
    theirs = dict(models["torch"].named_parameters())
    for name, p in models["ours"].named_parameters():
        assert p.shape == theirs[name].shape
        assert relative_error(p, theirs[name]) <= 1e-5, name
    assert models["ours"].scale.dim() == 0 and models["ours"].scale.item() != 1.5
    assert models["ours"].bf16_scale.item() != 0.75


def test_each_dtype_gets_one_flat_buffer_holding_its_parameters() -> None:
    model = MixedPrecisionNet()
    ours = FusedSGD(interleaved(model), lr=0.05)
    inputs, targets = make_batches("mlp", 1)[0]
    F.cross_entropy(model(inputs), targets).backward()
    ours.step()
    flats = ours.get_combined_params()
    assert len(flats) == 3 and {flat.dtype for flat in flats} == {torch.float32, torch.float16, torch.bfloat16}
    for flat in flats:
        members = [p for p in model.parameters() if p.dtype == flat.dtype]
        assert flat.numel() == sum(p.numel() for p in members)
        ours_values = torch.sort(flat.float()).values
        theirs = torch.sort(torch.cat([p.detach().reshape(-1).float() for p in members])).values
        assert torch.equal(ours_values, theirs)
