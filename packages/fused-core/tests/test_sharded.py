"""DTensor parameters through fused_core.sharded, in this process (a 1-rank gloo group), with Signum.

The multi-rank behaviour (FSDP2 over 2 and 4 ranks, HSDP, checkpoints) is tested with real ranks in
fused-sgd's tests_distributed; here, what fused-core itself promises for any element-wise plugin:
the local shards step as the reference steps the DTensors, state is kept as DTensors, no gradient
is kept past a step, FSDP2's padded shard follows its local shard, and non-element-wise optimizers
refuse DTensors.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from fused_core import InvalidParameterError, gradients, native, sharded

SHAPES = [(12, 5), (7,), (3, 4, 2)]


@pytest.fixture(scope="module")
def mesh() -> Iterator[object]:
    with tempfile.TemporaryDirectory() as directory:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=0, world_size=1)
        try:
            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()


def dtensor_params(mesh, generator: torch.Generator) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    values = [torch.randn(shape, generator=generator) for shape in SHAPES]
    placements = [[Shard(0)], [Replicate()], [Shard(1)]]

    def make() -> list[nn.Parameter]:
        return [nn.Parameter(distribute_tensor(v.clone(), mesh, p)) for v, p in zip(values, placements)]

    return make(), make()


@pytest.mark.parametrize("reader", ["native", "python"])
def test_dtensor_parameters_step_as_the_reference_steps_them(signum, mesh, generator, reader, monkeypatch) -> None:
    """With fused-core's C++ gradient reader (and lender), and without it (Python reads and lends)."""
    if reader == "python":
        monkeypatch.setattr(gradients, "library", lambda: None)
    mine, theirs = dtensor_params(mesh, generator)
    optimizer, reference = signum.Signum(mine, lr=0.01), signum.Reference(theirs, lr=0.01)
    for step in range(4):
        for index, (a, b) in enumerate(zip(mine, theirs)):
            grad = torch.randn(a.shape, generator=generator)
            if step == 1 and index == 1:  # a parameter without a gradient is skipped
                a.grad = b.grad = None
                continue
            a.grad = distribute_tensor(grad, mesh, a.placements)
            b.grad = distribute_tensor(grad.clone(), mesh, b.placements)
        grads = [a.grad for a in mine]
        optimizer.step()
        reference.step()
        assert [a.grad for a in mine] == grads  # the same objects: .grad untouched
        for a, b in zip(mine, theirs):
            assert torch.equal(a.to_local(), b.to_local()), f"step {step}"
            assert sharded.local_shard(a).grad is None  # lent for the launch only
            momentum = optimizer.state[a]["momentum"]
            assert isinstance(momentum, DTensor) and momentum.placements == a.placements
            assert torch.equal(momentum.to_local(), reference.state[b]["momentum"].to_local())


def test_state_dict_round_trips_with_dtensor_state(signum, mesh, generator) -> None:
    mine, theirs = dtensor_params(mesh, generator)
    optimizer = signum.Signum(mine, lr=0.01)
    for a in mine:
        a.grad = distribute_tensor(torch.randn(a.shape, generator=generator), mesh, a.placements)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())  # as torch's, its tensors are the live state
    assert all(isinstance(values["momentum"], DTensor) for values in saved["state"].values())
    with torch.no_grad():
        for a, b in zip(mine, theirs):
            b.copy_(a)
    resumed = signum.Signum(theirs, lr=0.01)
    resumed.load_state_dict(saved)
    for a, b in zip(mine, theirs):
        grad = torch.randn(a.shape, generator=generator)
        a.grad = distribute_tensor(grad, mesh, a.placements)
        b.grad = distribute_tensor(grad.clone(), mesh, b.placements)
    optimizer.step()
    resumed.step()
    for a, b in zip(mine, theirs):
        assert torch.equal(a.to_local(), b.to_local())
        assert torch.equal(optimizer.state[a]["momentum"].to_local(), resumed.state[b]["momentum"].to_local())


def test_fsdp2_padded_shard_follows_the_local_shard(signum, mesh, generator) -> None:
    """FSDP2 all-gathers from its padded shard: after steps, a forward sees the stepped weights."""
    torch.manual_seed(0)
    model = fully_shard(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), mesh=mesh)
    torch.manual_seed(0)
    twin = fully_shard(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), mesh=mesh)
    optimizer, reference = signum.Signum(model.parameters(), lr=0.05), signum.Reference(twin.parameters(), lr=0.05)
    inputs = torch.randn(4, 6, generator=generator)
    for _ in range(3):
        for net, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad()
            net(inputs).square().sum().backward()
            opt.step()
    padded = sharded.fsdp_padded_shards(list(model.parameters()))
    assert len(padded) == 4
    for param in model.parameters():
        assert sharded.starts(padded[id(param)], sharded.local_shard(param))
    with torch.no_grad():
        assert torch.equal(model(inputs), twin(inputs))


def test_an_optimizer_that_is_not_element_wise_refuses_dtensors(signum, mesh, generator) -> None:
    class Normalized(signum.Signum):
        elementwise = False

    mine, _ = dtensor_params(mesh, generator)
    with pytest.raises(InvalidParameterError, match=r"parameter 0: is a DTensor .* reduces over each whole parameter"):
        Normalized(mine, lr=0.01)


def test_an_fsdp2_layout_it_does_not_know_is_refused_naming_the_parameter(signum, mesh, generator) -> None:
    """A padded shard that does not start where the local shard does (a future FSDP2 could lay them out
    otherwise) is refused at the first step, naming the parameter, before anything moves."""
    model = fully_shard(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), mesh=mesh)
    optimizer = signum.Signum(model.named_parameters(), lr=0.01)
    model(torch.randn(2, 6, generator=generator)).sum().backward()  # FSDP2's lazy init: after it
    first = next(model.parameters())
    padded = sharded.fsdp_padded_shards([first])[id(first)]
    padded.set_(padded.clone())  # FSDP2's padded shard elsewhere than its local shard
    before = [p.to_local().clone() for p in model.parameters()]
    with pytest.raises(InvalidParameterError, match=r"param group 0, parameter 0 '0.weight' \(a DTensor of shape"):
        optimizer.step()
    assert all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))


def test_grad_lender_sets_and_takes_back_gradients() -> None:
    """The C++ lend: each tensor's .grad is the very gradient given (None where none is), and taking
    them back leaves every .grad None and the gradients as they were."""
    library = gradients.library()
    if library is None:
        pytest.fail(f"no gradient reader: {native.unavailable_reason(gradients.SOURCE, flag_sets=gradients.FLAG_SETS)}")
    tensors = [torch.zeros(3, 2) for _ in range(5)]
    grads = [torch.randn(3, 2), None, torch.randn(3, 2), None, torch.randn(3, 2)]
    copies = [None if g is None else g.clone() for g in grads]
    lender = gradients.GradLender(library, tensors)
    for _ in range(2):
        lender.lend(grads)
        assert all(t.grad is g for t, g in zip(tensors, grads))
        lender.take_back()
        assert all(t.grad is None for t in tensors)
    assert all(g is None or torch.equal(g, c) for g, c in zip(grads, copies))
