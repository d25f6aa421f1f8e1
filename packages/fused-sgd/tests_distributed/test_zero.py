"""ZeroRedundancyOptimizer(optimizer_class=FusedSGD) matches ZeroRedundancyOptimizer(optimizer_class=torch.optim.SGD).

Each rank's local FusedSGD holds only that rank's share of the parameters; ZeRO broadcasts
the updated parameters from their owners. Gradients are averaged by DDP.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from dist_training import HYPERPARAMETERS, ORDERS, RTOL, STEPS, average_gradients, check, mlp, outcome, shard, train
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from fused_core import InvalidParameterError
from fused_sgd import FusedSGD
from fused_testing.reference import relative_error


def zero(params, optimizer_class: type, **options) -> ZeroRedundancyOptimizer:
    extra = {"foreach": False} if optimizer_class is torch.optim.SGD else {}
    return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, **HYPERPARAMETERS, **extra, **options)


def wrap(model: torch.nn.Module, optimizer_class: type, order: str, **options):
    """DDP and ZeRO around ``model``; with order "optimizer-first" the local optimizer lays
    out its flat buffers before DDP registers its hooks."""
    if order == "ddp-first":
        wrapped = DDP(model)
        return wrapped, zero(wrapped.parameters(), optimizer_class, **options)
    optimizer = zero(model.parameters(), optimizer_class, **options)
    if isinstance(optimizer.optim, FusedSGD):
        optimizer.optim.get_combined_params()
    return DDP(model), optimizer


def zero_case(order: str) -> dict[str, float]:
    batches = shard(STEPS)
    reference = mlp()
    train(*wrap(reference, torch.optim.SGD, "ddp-first"), batches)
    model = mlp()
    train(*wrap(model, FusedSGD, order), batches)
    return outcome(model, reference)


@pytest.mark.parametrize("order", ORDERS)
def test_zero_with_fused_sgd_matches_zero_with_torch_sgd(ranks, order):
    check(ranks.run(zero_case, order))


def consolidated(optimizer: ZeroRedundancyOptimizer) -> dict:
    """The full state_dict, on every rank: consolidated on rank 0, then broadcast as bytes."""
    optimizer.consolidate_state_dict(to=0)
    payload = torch.empty(0, dtype=torch.uint8)
    if dist.get_rank() == 0:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    size = torch.tensor([payload.numel()])
    dist.broadcast(size, src=0)
    payload = payload if dist.get_rank() == 0 else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(payload, src=0)
    return torch.load(io.BytesIO(bytes(payload.tolist())), weights_only=True)


def momentum_error(state_dict: dict, reference: dict) -> float:
    assert state_dict["state"].keys() == reference["state"].keys()
    return max(
        relative_error(state["momentum_buffer"], reference["state"][index]["momentum_buffer"])
        for index, state in state_dict["state"].items()
    )


def round_trip_case() -> dict[str, float]:
    reference = mlp()
    reference_ddp, reference_zero = wrap(reference, torch.optim.SGD, "ddp-first")
    train(reference_ddp, reference_zero, shard(STEPS))
    model = mlp()
    model_ddp, model_zero = wrap(model, FusedSGD, "optimizer-first")
    train(model_ddp, model_zero, shard(STEPS))
    result = outcome(model, reference)

    saved = consolidated(model_zero)
    assert [group["params"] for group in saved["param_groups"]] == [list(range(len(list(model.parameters()))))]
    result["format_error"] = momentum_error(saved, consolidated(reference_zero))

    # A fresh model and optimizer resumed from the checkpoint go on exactly like the original.
    # (Gradients averaged one parameter at a time: a fresh DDP's buckets, hence its sums, differ.)
    resumed = mlp()
    resumed.load_state_dict(model.state_dict())
    resumed_zero = zero(resumed.parameters(), FusedSGD)
    resumed_zero.load_state_dict(saved)
    second = shard(STEPS, epoch=1)
    train(resumed, resumed_zero, second, sync=lambda: average_gradients(resumed))
    train(model, model_zero, second, sync=lambda: average_gradients(model))
    result["resumed_error"] = max(relative_error(p, q) for p, q in zip(resumed.parameters(), model.parameters()))
    result["momentum_error"] = momentum_error(consolidated(resumed_zero), consolidated(model_zero))
    return result


def test_consolidated_state_dict_round_trips(ranks):
    results = ranks.run(round_trip_case)
    check(results)
    for rank, result in enumerate(results):
        assert result["format_error"] <= RTOL, f"rank {rank}: momentum against ZeRO(torch.optim.SGD)'s"
        assert result["resumed_error"] == 0.0, f"rank {rank}: resumed parameters differ from the original's"
        assert result["momentum_error"] == 0.0, f"rank {rank}: resumed momentum differs from the original's"


def bucket_view_case() -> dict[str, float] | str:
    batches = shard(STEPS)
    reference = mlp()
    train(*wrap(reference, torch.optim.SGD, "ddp-first", parameters_as_bucket_view=True), batches)
    model = mlp()
    try:
        train(*wrap(model, FusedSGD, "optimizer-first", parameters_as_bucket_view=True), batches)
    except InvalidParameterError as error:
        return str(error)
    return outcome(model, reference)


def test_zero_parameters_as_bucket_view_is_rejected_naming_a_parameter(two_ranks):
    """ZeRO points every parameter into its own per-rank bucket and broadcasts that bucket after
    each step; FusedSGD would move the parameters into its flat buffer and ZeRO would broadcast
    stale values. The first step refuses, on every rank, naming a parameter and the fix."""
    for message in two_ranks.run(bucket_view_case):
        assert isinstance(message, str), f"not refused: {message}"
        assert "parameter (param group 0, index 0" in message, message
        assert "parameters_as_bucket_view=False" in message, message


def overlap_case() -> str:
    try:
        zero(mlp().parameters(), FusedSGD, overlap_with_ddp=True)
    except ValueError as error:
        return str(error)
    return ""


def test_overlap_with_ddp_is_refused_by_torch(two_ranks):
    """overlap_with_ddp=True needs a functional optimizer: torch says so when ZeRO is built."""
    for message in two_ranks.run(overlap_case):
        assert "functional optimizer" in message, message
