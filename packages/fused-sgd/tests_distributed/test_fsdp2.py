"""FSDP2 (``fully_shard``): fused optimizers step the local shards, exactly as torch.optim steps the DTensors.

Two copies of one model are sharded the same way; one trains with a fused optimizer, the other
with torch's (``foreach=False``), on the same per-rank batches. After every step each rank's
local shards of the parameters and of the optimizer state must be bit for bit torch's, and a
forward pass after training (which all-gathers from FSDP2's padded shards, the storage a fused
optimizer re-points) must give torch's outputs bit for bit.

The model has a layer whose rows do not split evenly (FSDP2 pads its shards; with 4 ranks one
rank's shard of it is empty), a branch used on alternate steps and a layer never used
(parameters without gradients).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

from fused_adam import FusedAdamW
from fused_core import InvalidParameterError
from fused_lamb import FusedLamb
from fused_lion import FusedLion
from fused_lion.reference import Lion
from fused_rmsprop import FusedRMSprop
from fused_sgd import FusedSGD, NpuFusedSGD

STEPS = 6
SGD_HYPERPARAMETERS: dict[str, Any] = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
ADAMW_HYPERPARAMETERS: dict[str, Any] = dict(lr=1e-2, weight_decay=0.1)

RMSPROP_HYPERPARAMETERS: dict[str, Any] = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3)
LION_HYPERPARAMETERS: dict[str, Any] = dict(lr=1e-3, weight_decay=0.1)

OPTIMIZERS = {
    "sgd": (
        FusedSGD,
        lambda params: torch.optim.SGD(params, foreach=False, **SGD_HYPERPARAMETERS),
        SGD_HYPERPARAMETERS,
    ),
    "adamw": (
        FusedAdamW,
        lambda params: torch.optim.AdamW(params, foreach=False, **ADAMW_HYPERPARAMETERS),
        ADAMW_HYPERPARAMETERS,
    ),
    "rmsprop": (
        FusedRMSprop,
        lambda params: torch.optim.RMSprop(params, foreach=False, **RMSPROP_HYPERPARAMETERS),
        RMSPROP_HYPERPARAMETERS,
    ),
    "lion": (FusedLion, lambda params: Lion(params, **LION_HYPERPARAMETERS), LION_HYPERPARAMETERS),
}
"""Each fused optimizer and its oracle (Lion: the per-tensor reference, torch has none)."""


class Net(nn.Module):
    """A trunk, a head, a branch that only even steps use, and a layer no step uses."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 30), nn.ReLU())
        self.head = nn.Linear(30, 10)
        self.branch = nn.Linear(30, 3)
        self.unused = nn.Linear(30, 10)
        self.use_branch = True

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.trunk(inputs)
        out = self.head(hidden)
        return out + self.branch(hidden).sum(-1, keepdim=True) if self.use_branch else out


def sharded_net(case: str) -> Net:
    """A Net from seed 0, sharded as ``case`` says, over every rank (HSDP: 2 replicas of 2 shards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Net()
    world = dist.get_world_size()
    if case == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    options: dict[str, Any] = {"mesh": mesh}
    if case == "keep-unsharded":
        options["reshard_after_forward"] = False
    if case == "mixed-precision":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if case != "root-only":
        for layer in [*model.trunk, model.head, model.branch]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, **options)
    return fully_shard(model, **options)


def batches(steps: int, *, offset: int = 0) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1000 * (offset + 1) + dist.get_rank())
    return [
        (torch.randn(16, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(steps)
    ]


def train_step(
    model: Net, optimizer: torch.optim.Optimizer, step: int, batch: tuple[Tensor, Tensor], case: str
) -> None:
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=case != "keep-grads")
    model.use_branch = step % 2 == 0
    if case == "accumulate":  # two micro-batches, the first without the reduce-scatter
        model.set_requires_gradient_sync(False)
        F.cross_entropy(model(inputs[:8]), targets[:8]).backward()
        model.set_requires_gradient_sync(True)
        F.cross_entropy(model(inputs[8:]), targets[8:]).backward()
    else:
        F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


def differences(
    model: nn.Module, optimizer: torch.optim.Optimizer, reference: nn.Module, expected: torch.optim.Optimizer
) -> list[str]:
    """Where this rank's local shards (parameters, state) differ from the reference's, bitwise."""
    found = []
    for (name, param), other in zip(model.named_parameters(), reference.parameters()):
        assert isinstance(param, DTensor) and isinstance(other, DTensor)
        if not torch.equal(param.to_local(), other.to_local()):
            found.append(f"{name}: max difference {(param.to_local() - other.to_local()).abs().max().item():.3e}")
        state, torch_state = optimizer.state.get(param, {}), expected.state.get(other, {})
        if sorted(state) != sorted(torch_state):
            found.append(f"{name}: state {sorted(state)}, torch's {sorted(torch_state)}")
        for key, value in torch_state.items():
            mine = state.get(key)
            if isinstance(value, DTensor):
                if not isinstance(mine, DTensor) or mine.placements != value.placements:
                    found.append(f"{name}: state {key} is {type(mine).__name__}, torch's a DTensor {value.placements}")
                elif not torch.equal(mine.to_local(), value.to_local()):
                    found.append(f"{name}: state {key} differs")
            elif isinstance(value, Tensor) and not torch.equal(torch.as_tensor(mine), value):
                found.append(f"{name}: state {key} {mine} against torch's {value}")
    return found


def training_case(case: str, optimizer_name: str) -> list[str]:
    """Train both copies; the differences found after each step and in a final forward."""
    fused_class, torch_optimizer, hyperparameters = OPTIMIZERS[optimizer_name]
    model, reference = sharded_net(case), sharded_net(case)
    optimizer, expected = fused_class(model.parameters(), **hyperparameters), torch_optimizer(reference.parameters())
    found = []
    for step, batch in enumerate(batches(STEPS)):
        train_step(model, optimizer, step, batch, case)
        train_step(reference, expected, step, batch, case)
        found += [f"step {step}: {difference}" for difference in differences(model, optimizer, reference, expected)]
    inputs = batches(1, offset=7)[0][0]
    with torch.no_grad():
        if not torch.equal(model(inputs), reference(inputs)):
            found.append("a forward pass after training differs: FSDP2 all-gathers stale values")
    return found


CASES = ["nested", "root-only", "keep-unsharded", "accumulate", "mixed-precision", "keep-grads"]


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case", CASES)
def test_fsdp2_steps_local_shards_like_torch(ranks, case, optimizer_name):
    for rank, found in enumerate(ranks.run(training_case, case, optimizer_name)):
        assert not found, f"rank {rank} of {ranks.world_size}: " + "; ".join(found[:5])


def test_hsdp_steps_like_torch(rank_pools):
    four = rank_pools.get(4)
    for rank, found in enumerate(four.run(training_case, "hsdp", "sgd")):
        assert not found, f"rank {rank}: " + "; ".join(found[:5])


def test_npu_fused_sgd_keeps_gradients_under_fsdp2(two_ranks):
    """NpuFusedSGD's zero_grad keeps (zeroes) the gradients, and FSDP2 accumulates into them."""
    for rank, found in enumerate(two_ranks.run(npu_case)):
        assert not found, f"rank {rank}: " + "; ".join(found[:5])


def npu_case() -> list[str]:
    model, reference = sharded_net("nested"), sharded_net("nested")
    optimizer = NpuFusedSGD(model.parameters(), **SGD_HYPERPARAMETERS)
    expected = torch.optim.SGD(reference.parameters(), foreach=False, **SGD_HYPERPARAMETERS)
    found = []
    for step, batch in enumerate(batches(STEPS)):
        for net, opt, set_to_none in ((model, optimizer, None), (reference, expected, False)):
            opt.zero_grad() if set_to_none is None else opt.zero_grad(set_to_none=False)
            net.use_branch = step % 2 == 0
            F.cross_entropy(net(batch[0]), batch[1]).backward()
            opt.step()
        found += [f"step {step}: {d}" for d in differences(model, optimizer, reference, expected)]
    return found


# ----- torch.distributed.checkpoint ------------------------------------------------------------


def frozen_unused(model: Net) -> Net:
    """The layer no step uses, frozen: a fresh optimizer's DCP template (built by a step over zero
    gradients, torch.distributed.checkpoint's ``_init_optim_state``) would otherwise hold state for it
    that no checkpoint of a trained optimizer has, with torch.optim as with fused ones."""
    model.unused.requires_grad_(False)
    return model


def checkpoint_case(directory: str, first: str, second: str) -> list[str]:
    """Train 3 steps with ``first`` ("fused" or "torch"), save through DCP, load into a fresh model
    and optimizer of kind ``second``, train 3 more; against torch training 6 steps unbroken."""
    kinds = {
        "fused": lambda params: FusedSGD(params, **SGD_HYPERPARAMETERS),
        "torch": lambda params: torch.optim.SGD(params, foreach=False, **SGD_HYPERPARAMETERS),
    }
    data = batches(6)
    reference = frozen_unused(sharded_net("nested"))
    expected = kinds["torch"](reference.parameters())
    for step, batch in enumerate(data):
        train_step(reference, expected, step, batch, "nested")

    model = frozen_unused(sharded_net("nested"))
    optimizer = kinds[first](model.parameters())
    for step, batch in enumerate(data[:3]):
        train_step(model, optimizer, step, batch, "nested")
    dcp.save(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=directory
    )

    resumed = frozen_unused(sharded_net("nested"))
    resumed_optimizer = kinds[second](resumed.parameters())
    state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(state, checkpoint_id=directory)
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
    for step, batch in enumerate(data[3:], start=3):
        train_step(resumed, resumed_optimizer, step, batch, "nested")
    return differences(resumed, resumed_optimizer, reference, expected)


@pytest.mark.parametrize(("first", "second"), [("fused", "fused"), ("fused", "torch"), ("torch", "fused")])
def test_distributed_checkpoint_is_interchangeable_with_torch(two_ranks, tmp_path, first, second):
    for rank, found in enumerate(two_ranks.run(checkpoint_case, str(tmp_path / "checkpoint"), first, second)):
        assert not found, f"rank {rank}: " + "; ".join(found[:5])


# ----- DTensors without FSDP2, and what is refused --------------------------------------------


def tensor_parallel_case() -> list[str]:
    """DTensor parameters sharded and replicated by hand (as tensor parallelism makes them)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    values = [torch.randn(13, 6), torch.randn(7)]
    placements = [[Shard(0)], [Shard(0)]]

    def params() -> list[nn.Parameter]:
        return [nn.Parameter(distribute_tensor(v.clone(), mesh, p)) for v, p in zip(values, placements)]

    mine, theirs = params(), params()
    optimizer = FusedSGD(mine, **SGD_HYPERPARAMETERS)
    expected = torch.optim.SGD(theirs, foreach=False, **SGD_HYPERPARAMETERS)
    found = []
    for step in range(4):
        grads = [
            torch.randn(v.shape, generator=torch.Generator().manual_seed(step * 10 + i)) for i, v in enumerate(values)
        ]
        for group, opt in ((mine, optimizer), (theirs, expected)):
            opt.zero_grad()
            for param, grad, place in zip(group, grads, placements):
                param.grad = distribute_tensor(grad, mesh, place)
            opt.step()
        for index, (a, b) in enumerate(zip(mine, theirs)):
            if not torch.equal(a.to_local(), b.to_local()):
                found.append(f"step {step}, parameter {index} differs")
    return found


def test_tensor_parallel_dtensors_step_like_torch(two_ranks):
    for rank, found in enumerate(two_ranks.run(tensor_parallel_case)):
        assert not found, f"rank {rank}: " + "; ".join(found)


def refusal_case() -> dict[str, str]:
    """What is refused, with the messages."""
    messages = {}
    model = sharded_net("nested")
    try:
        FusedLamb(model.parameters(), lr=1e-3)
    except InvalidParameterError as error:
        messages["lamb"] = str(error)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    partial = nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Partial()]))
    try:
        FusedSGD([partial], lr=0.1)
    except InvalidParameterError as error:
        messages["partial"] = str(error)
    optimizer = FusedSGD(model.parameters(), **SGD_HYPERPARAMETERS)
    train_step(model, optimizer, 0, batches(1)[0], "nested")
    for name, call in (
        ("clip", lambda: optimizer.clip_grad_norm_fused_(1.0)),
        ("combined", optimizer.get_combined_grads),
    ):
        try:
            call()
        except InvalidParameterError as error:
            messages[name] = str(error)
    return messages


def test_what_fsdp2_refuses_is_refused_clearly(two_ranks):
    for messages in two_ranks.run(refusal_case):
        assert "param group 0, parameter 0: is a DTensor" in messages.get("lamb", ""), messages
        assert "reduces over each whole parameter" in messages["lamb"]
        assert "Partial placement" in messages.get("partial", ""), messages
        assert "clip_grad_norm_" in messages.get("clip", ""), messages
        assert "get_combined_grads" in messages.get("combined", ""), messages


# ----- the example in docs/distributed.md ---------------------------------------------------------

DOCS = Path(__file__).resolve().parents[3] / "docs" / "distributed.md"


def test_the_docs_fsdp2_example_runs(tmp_path):
    """The FSDP2 example of docs/distributed.md, run as it says: torchrun, 2 processes."""
    section = DOCS.read_text().split("## FSDP2 (fully_shard)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "train_fsdp.py"
    script.write_text(code)
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=environment,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 20: loss" in run.stdout, run.stdout
    assert "momentum is a DTensor sharded as (Shard(dim=0),)" in run.stdout, run.stdout
