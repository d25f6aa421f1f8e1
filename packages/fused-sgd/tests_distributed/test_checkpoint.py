"""torch.distributed.checkpoint: get/set_optimizer_state_dict and dcp.save/dcp.load round-trip FusedSGD's state.

Training resumed from a checkpoint goes on exactly like training that never stopped, and
the checkpoint has torch.optim.SGD's layout (the same param group keys): torch.optim.SGD
resumes from it, and FusedSGD resumes from torch.optim.SGD's. The gradients are averaged
with fused_core.distributed.all_reduce_grads.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from dist_training import (
    RTOL,
    STEPS,
    average_gradients,
    fused_sgd,
    max_error,
    mlp,
    shard,
    spread,
    torch_sgd,
    train,
)
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fused_core.distributed import all_reduce_grads
from fused_testing.parity import make_model
from fused_testing.reference import relative_error


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=directory)


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Into freshly built objects: their state dicts are the templates dcp.load fills in place."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=directory, planner=DefaultLoadPlanner())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def momentum_error(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    reference: torch.optim.Optimizer,
    reference_model: torch.nn.Module,
) -> float:
    pairs = zip(model.parameters(), reference_model.parameters())
    return max(
        relative_error(optimizer.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"]) for p, q in pairs
    )


def checkpoint_case(directory: str) -> dict[str, float]:
    first, second = shard(STEPS), shard(STEPS, epoch=1)
    model = mlp()
    optimizer = fused_sgd(model.parameters())
    train(model, optimizer, first, sync=lambda: all_reduce_grads(optimizer))
    save(model, optimizer, directory)

    resumed = make_model("mlp", seed=1)  # other weights: everything must come from the checkpoint
    resumed_optimizer = fused_sgd(resumed.parameters())
    load(resumed, resumed_optimizer, directory)
    by_torch = make_model("mlp", seed=1)
    torch_optimizer = torch_sgd(by_torch.parameters())
    load(by_torch, torch_optimizer, directory)
    result = {
        "loaded_momentum_error": momentum_error(resumed_optimizer, resumed, optimizer, model),
        "torch_loaded_momentum_error": momentum_error(torch_optimizer, by_torch, optimizer, model),
    }

    train(model, optimizer, second, sync=lambda: all_reduce_grads(optimizer))
    train(resumed, resumed_optimizer, second, sync=lambda: all_reduce_grads(resumed_optimizer))
    train(by_torch, torch_optimizer, second, sync=lambda: average_gradients(by_torch))
    result["resumed_error"] = max_error(resumed, model)
    result["resumed_momentum_error"] = momentum_error(resumed_optimizer, resumed, optimizer, model)
    result["error"] = max_error(model, by_torch)
    result["spread"] = spread(model)

    # And the other way round: FusedSGD resumes from torch.optim.SGD's checkpoint.
    save(by_torch, torch_optimizer, directory + "-torch")
    from_torch = make_model("mlp", seed=2)
    from_torch_optimizer = fused_sgd(from_torch.parameters())
    load(from_torch, from_torch_optimizer, directory + "-torch")
    result["from_torch_error"] = max_error(from_torch, by_torch)
    result["from_torch_momentum_error"] = momentum_error(from_torch_optimizer, from_torch, torch_optimizer, by_torch)
    return result


def test_dcp_round_trips_the_optimizer_state(ranks, tmp_path):
    for rank, result in enumerate(ranks.run(checkpoint_case, str(tmp_path / "checkpoint"))):
        assert result["loaded_momentum_error"] == 0.0, f"rank {rank}: {result}"
        assert result["torch_loaded_momentum_error"] == 0.0, f"rank {rank}: {result}"
        assert result["resumed_error"] == 0.0, f"rank {rank}: {result}"
        assert result["resumed_momentum_error"] == 0.0, f"rank {rank}: {result}"
        assert result["error"] <= RTOL, (
            f"rank {rank}: against torch.optim.SGD resumed from the same checkpoint: {result}"
        )
        assert result["spread"] == 0.0, f"rank {rank}: {result}"
        assert result["from_torch_error"] == 0.0, f"rank {rank}: {result}"
        assert result["from_torch_momentum_error"] == 0.0, f"rank {rank}: {result}"
