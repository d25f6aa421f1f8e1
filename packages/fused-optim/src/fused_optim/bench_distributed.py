"""Gradient averaging per training step: fused_core.distributed.all_reduce_grads against DDP.

    fused-optim bench --distributed 2 --sets resnet50 20k-small

Spawns N processes (gloo over loopback, a file store in a temporary directory, one thread each
unless --threads says otherwise) that train a model made of one fp32 parameter per shape of a
shape set (fused_testing.shapes.SHAPE_SETS; the loss touches every parameter once) with
FusedSGD, four ways, in interleaved rounds:

* ``local``: no gradient averaging at all (the floor);
* ``all_reduce_grads``: ``backward(); all_reduce_grads(optimizer); step()``, one all-reduce per bucket;
* ``ddp``: DistributedDataParallel (default settings: 25 MiB buckets, all-reduce overlapped with backward);
* ``ddp+torch``: DDP with torch.optim.SGD(foreach=True), the usual torch set-up.

A step is zero_grad, forward, backward, averaging and the optimizer step; its time is the
slowest rank's, and the table shows the median over rounds and steps. The averaging cost is
the step time minus ``local``'s (for all_reduce_grads, its own call is timed too).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fused_core.distributed import all_reduce_grads
from fused_sgd import FusedSGD
from fused_testing.shapes import make_params

HYPERPARAMETERS: dict[str, Any] = dict(lr=1e-4, momentum=0.9, weight_decay=1e-4)
SCENARIOS = ("local", "all_reduce_grads", "ddp", "ddp+torch")
STEPS = 4
"""Timed steps per scenario and round."""
LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"

Measured = dict[str, dict[str, float]]
"""Per scenario: ``step_ms``, ``sync_ms`` and ``overhead_ms`` (medians, slowest rank)."""


class ShapeModel(nn.Module):
    """One parameter per shape; the loss is sum_i scale * sum(p_i), so backward writes every gradient."""

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(make_params(shapes))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return torch.stack([weight.sum() for weight in self.weights]).sum() * scale


Step = Callable[[torch.Tensor], float]
"""One training step on this rank; returns the seconds spent averaging gradients (0 if not separable)."""


def make_step(scenario: str, shapes: Sequence[torch.Size]) -> Step:
    model = ShapeModel(shapes)
    if scenario == "ddp+torch":
        wrapped: nn.Module = DDP(model)
        optimizer: torch.optim.Optimizer = torch.optim.SGD(wrapped.parameters(), foreach=True, **HYPERPARAMETERS)
    else:
        fused = FusedSGD(model.parameters(), **HYPERPARAMETERS)
        fused.get_combined_params()  # lay out the flat buffers before DDP registers its hooks
        wrapped, optimizer = (DDP(model) if scenario == "ddp" else model), fused

    def step(scale: torch.Tensor) -> float:
        optimizer.zero_grad()
        wrapped(scale).backward()
        sync = 0.0
        if scenario == "all_reduce_grads":
            start = time.perf_counter()
            all_reduce_grads(fused)
            sync = time.perf_counter() - start
        optimizer.step()
        return sync

    return step


def slowest(values: list[float]) -> list[float]:
    """Each entry's maximum over the ranks."""
    gathered = [torch.zeros(len(values), dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor(values, dtype=torch.float64))
    return torch.stack(gathered).max(dim=0).values.tolist()


def measure(shapes: Sequence[torch.Size], rounds: int, steps: int = STEPS) -> Measured:
    """On every rank: median step and averaging time (ms, slowest rank) per scenario."""
    step_of = {scenario: make_step(scenario, shapes) for scenario in SCENARIOS}
    scale = torch.tensor(1.0 + dist.get_rank())
    for step in step_of.values():  # warm-up: layouts, DDP's bucket rebuild
        step(scale)
        step(scale)
    times: dict[str, list[float]] = {scenario: [] for scenario in SCENARIOS}
    syncs: dict[str, list[float]] = {scenario: [] for scenario in SCENARIOS}
    for round_index in range(rounds):
        order = SCENARIOS[round_index % len(SCENARIOS) :] + SCENARIOS[: round_index % len(SCENARIOS)]
        for scenario in order:
            for _ in range(steps):
                dist.barrier()
                start = time.perf_counter()
                syncs[scenario].append(step_of[scenario](scale))
                times[scenario].append(time.perf_counter() - start)
    result = {}
    for scenario in SCENARIOS:
        result[scenario] = {
            "step_ms": 1e3 * statistics.median(slowest(times[scenario])),
            "sync_ms": 1e3 * statistics.median(slowest(syncs[scenario])),
        }
    local = result["local"]["step_ms"]
    for scenario in SCENARIOS:
        result[scenario]["overhead_ms"] = result[scenario]["step_ms"] - local
    return result


def _rank(
    rank: int,
    world_size: int,
    store: str,
    job: Callable[[Any, int], Any],
    items: dict[str, Any],
    rounds: int,
    threads: int,
    results: Any,
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        for name, item in items.items():
            measured = job(item, rounds)
            if rank == 0:
                results.put((name, measured))
        # No rank tears its process group down while another still uses it: without this, a
        # rank leaving early made another abort ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(
    job: Callable[[Any, int], Any], items: dict[str, Any], ranks: int, rounds: int, threads: int = 1
) -> dict[str, Any]:
    """Spawn ``ranks`` gloo ranks that each run ``job(item, rounds)`` for every item, in order;
    rank 0's results by item name. ``job`` must be a module-level function (it is pickled)."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(
            _rank,
            args=(ranks, os.path.join(directory, "store"), job, items, rounds, threads, results),
            nprocs=ranks,
            join=True,
            start_method="spawn",
        )
    measured = {}
    while not results.empty():
        name, result = results.get()
        measured[name] = result
    return measured


def run(
    sets: dict[str, list[torch.Size]], ranks: int, rounds: int, steps: int = STEPS, threads: int = 1
) -> dict[str, Measured]:
    """Spawn the ranks; the measurements by shape set. ``sets`` maps names to shapes (resolved here,
    in the parent, so sets registered at run time reach the spawned ranks too)."""
    return run_ranks(functools.partial(measure, steps=steps), sets, ranks, rounds, threads)


def table(measured: dict[str, Measured], ranks: int) -> str:
    lines = [
        f"| shape set ({ranks} ranks) | " + " | ".join(SCENARIOS) + " | all_reduce_grads call |",
        "|---|" + "---|" * (len(SCENARIOS) + 1),
    ]
    for name, result in measured.items():
        cells = [
            f"{result[s]['step_ms']:.1f} ms" + (f" ({result[s]['overhead_ms']:+.1f})" if s != "local" else "")
            for s in SCENARIOS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['all_reduce_grads']['sync_ms']:.1f} ms |")
    return "\n".join(lines)
