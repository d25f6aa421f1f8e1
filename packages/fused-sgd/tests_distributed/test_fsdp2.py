"""FSDP2 (``fully_shard``) is not supported, and says so when the optimizer is built.

``fully_shard`` turns every parameter into a DTensor whose local shard lives in storage that
FSDP2 all-gathers from. A fused optimizer re-points each parameter at its flat buffer, which
would cut the shard off from that storage; today the first step fails deep inside DTensor
("aten.copy_.default got mixed torch.Tensor and DTensor"). The supported paths are DDP,
ZeroRedundancyOptimizer and fused_core.distributed.all_reduce_grads (docs/distributed.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_training import fused_sgd, mlp, shard, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def sharded_model() -> torch.nn.Module:
    model = mlp()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def construction_case() -> tuple[str, str] | None:
    """The error FusedSGD's constructor raises over a fully_shard-ed model, as (type, message)."""
    model = sharded_model()
    try:
        fused_sgd(model.parameters())
    except Exception as error:  # noqa: BLE001 - the test checks which one
        return type(error).__name__, str(error)
    return None


def test_fully_shard_is_rejected_when_the_optimizer_is_built(two_ranks):
    for rank, outcome in enumerate(two_ranks.run(construction_case)):
        assert outcome is not None, f"rank {rank}: FusedSGD accepted DTensor parameters"
        kind, message = outcome
        assert kind == "InvalidParameterError", f"rank {rank}: {kind}: {message}"
        assert "param group 0, parameter 0: is a DTensor" in message, message
        for pointer in ("DistributedDataParallel", "ZeroRedundancyOptimizer", "all_reduce_grads", "distributed.md"):
            assert pointer in message, f"the error should point to {pointer}: {message}"


def first_step_case() -> str:
    """Whatever the first step over a fully_shard-ed model does, it raises (never trains silently)."""
    try:
        model = sharded_model()
        optimizer = fused_sgd(model.parameters())
        train(model, optimizer, shard(1))
    except Exception as error:  # noqa: BLE001 - today DTensor's RuntimeError; once rejected, ours
        return f"{type(error).__name__}: {error}"
    return ""


def test_fully_shard_never_trains_silently(two_ranks):
    for message in two_ranks.run(first_step_case):
        assert message, "FusedSGD stepped over DTensor parameters"
