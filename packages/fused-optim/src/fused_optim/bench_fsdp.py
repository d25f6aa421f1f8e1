"""The optimizer step under FSDP2 (``fully_shard``): FusedSGD against torch.optim.SGD over DTensors.

    fused-optim bench --distributed 2 --fsdp

Spawns N processes (gloo over loopback, one thread each unless --threads says otherwise) that
train FSDP2 models with SGD (momentum, weight decay), one model and optimizer per competitor,
in interleaved rounds:

* ``fused``: FusedSGD, stepping the local shards from flat buffers (:mod:`fused_core.sharded`);
* ``torch``: torch.optim.SGD(foreach=False), its for-loop over the DTensors;
* ``torch foreach``: torch.optim.SGD(foreach=True);
* ``torch fused``: torch.optim.SGD(fused=True), which has no DTensor sharding rule in torch 2.13
  (reported as unsupported where it raises).

Models: ``1000-small``, 50 blocks of 10 ``Linear(32, 32)`` (1,000 parameters), each block
``fully_shard``-ed, then the root; ``large``, 8 ``Linear(3072, 3072)`` (75.5 M elements), each
layer ``fully_shard``-ed. Each step is zero_grad, forward, backward, then the timed
``optimizer.step()``; a step's time is the slowest rank's, the table shows the median. The floor
is SGD's 5 element transfers (read p, g, m; write p, m) over the largest rank's local shard at the
bandwidth of ``a.add_(b)`` measured on every rank at once.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fused_sgd import FusedSGD

from .bench_distributed import run_ranks, slowest
from .bench_measure import bandwidth_probe

HYPERPARAMETERS: dict[str, Any] = dict(lr=1e-4, momentum=0.9, weight_decay=1e-4)
COMPETITORS = ("fused", "torch", "torch foreach", "torch fused")
MODELS = ("1000-small", "large")
STEPS = 3
"""Timed steps per competitor and round."""
TRANSFERS = 5
PROBE_MIB = 256


def build_model(name: str) -> tuple[nn.Module, int]:
    """The sharded model and its input width."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    blocks: list[nn.Module]
    if name == "1000-small":
        blocks = [nn.Sequential(*[nn.Linear(32, 32) for _ in range(10)]) for _ in range(50)]
        width = 32
    else:
        blocks = [nn.Linear(3072, 3072) for _ in range(8)]
        width = 3072
    model = nn.Sequential(*blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, width


def make_optimizer(competitor: str, params: Any) -> torch.optim.Optimizer:
    if competitor == "fused":
        return FusedSGD(params, **HYPERPARAMETERS)
    flags = {"torch": dict(foreach=False), "torch foreach": dict(foreach=True), "torch fused": dict(fused=True)}
    return torch.optim.SGD(params, **HYPERPARAMETERS, **flags[competitor])


def make_step(competitor: str, model_name: str) -> Callable[[], float] | None:
    """One training step returning the seconds of its ``optimizer.step()``; None where the
    competitor cannot step this model (raises at its first step)."""
    model, width = build_model(model_name)
    optimizer = make_optimizer(competitor, model.parameters())
    inputs = torch.randn(8, width)

    def step() -> float:
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - start

    failed = torch.zeros(1)
    try:
        step()
        step()
    except (NotImplementedError, RuntimeError):
        failed += 1
    dist.all_reduce(failed)  # every rank agrees, so no rank waits in a barrier alone
    return None if failed.item() else step


def local_elements(model_name: str) -> int:
    """The largest rank's local shard, in elements."""
    model, _ = build_model(model_name)
    mine = torch.tensor([float(sum(param.to_local().numel() for param in model.parameters()))])  # type: ignore[attr-defined]
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return int(mine.item())


def measure(model_name: str, rounds: int) -> dict[str, Any]:
    """On every rank: the median step (ms, slowest rank) per competitor, and the floor."""
    steps = {competitor: make_step(competitor, model_name) for competitor in COMPETITORS}
    times: dict[str, list[float]] = {competitor: [] for competitor in COMPETITORS}
    for round_index in range(rounds):
        shift = round_index % len(COMPETITORS)
        for competitor in COMPETITORS[shift:] + COMPETITORS[:shift]:
            step = steps[competitor]
            if step is not None:
                times[competitor] += [step() for _ in range(STEPS)]
    elements = local_elements(model_name)
    dist.barrier()
    probe = bandwidth_probe(torch.device("cpu"), PROBE_MIB, 5)
    gbps = _min_over_ranks(probe["gbps"])
    floor_ms = 1e3 * TRANSFERS * elements * 4 / (gbps * 1e9)
    step_ms = {
        competitor: (1e3 * statistics.median(slowest(values)) if values else None)
        for competitor, values in times.items()
    }
    return {"step_ms": step_ms, "local_elements": elements, "gbps": gbps, "floor_ms": floor_ms}


def _min_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return float(tensor.item())


def run(ranks: int, rounds: int, models: tuple[str, ...] = MODELS, threads: int = 1) -> dict[str, dict[str, Any]]:
    """Spawn the ranks; the measurements by model."""
    return run_ranks(measure, {name: name for name in models}, ranks, rounds, threads)


def table(measured: dict[str, dict[str, Any]], ranks: int) -> str:
    """Step times, each competitor's ratio to FusedSGD's, and FusedSGD's ratio to the floor."""
    lines = [
        f"| model ({ranks} ranks) | local shard | " + " | ".join(COMPETITORS) + " | fused / floor |",
        "|---|---|" + "---|" * (len(COMPETITORS) + 1),
    ]
    for name, result in measured.items():
        fused = result["step_ms"]["fused"]
        cells = []
        for competitor in COMPETITORS:
            value = result["step_ms"][competitor]
            if value is None:
                cells.append("unsupported")
            elif competitor == "fused":
                cells.append(f"{value:.2f} ms")
            else:
                cells.append(f"{value:.1f} ms ({value / fused:.1f}x)")
        floor = f"{fused / result['floor_ms']:.2f}x of {result['floor_ms']:.2f} ms"
        lines.append(f"| {name} | {result['local_elements'] / 1e6:.2f} M | " + " | ".join(cells) + f" | {floor} |")
    return "\n".join(lines)
