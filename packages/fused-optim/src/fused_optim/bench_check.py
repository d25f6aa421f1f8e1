"""Did each competitor of ``fused-optim bench`` do the step's work? Timing a kernel that skips part
of it would credit it with speed it does not have: torch 2.13's ``SGD(fused=True)`` on the CPU,
for one, leaves fp16 and bf16 parameters where they were (its vectorised loop never stores them,
pytorch/pytorch#191763), and runs faster for it.

Before the timings, every competitor takes :data:`STEPS` steps from the same parameters and
gradients, a fresh optimizer over copies of the set's first tensors that fit in :data:`NUMEL`
elements (of its first :data:`TENSORS`), and the compared class's for-loop takes the same steps in
float64 (the reference). Each competitor's error is the mean of ``|p - p_float64|`` over those
elements; the for-loop in the run's dtype has an error of its own, from rounding. A competitor
whose error exceeds :data:`WRONG_FACTOR` times the for-loop's (plus :data:`ABS_SLACK`) is reported
as giving wrong results, with the share of the elements it moved at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

STEPS = 3
"""Steps of each competitor: the first step and later ones (momentum, bias correction)."""
NUMEL = 1 << 20
"""At most this many elements take part: the set's first tensors."""
TENSORS = 1000
"""And at most this many tensors."""
WRONG_FACTOR = 4.0
"""Error against float64 beyond this many times the for-loop's own: wrong results."""
ABS_SLACK = 1e-12
"""Added to the for-loop's error, for a dtype (float64) where it is zero."""

MakeOptimizer = Callable[[str, list[torch.nn.Parameter]], torch.optim.Optimizer]


def first_tensors(params: Sequence[torch.Tensor]) -> list[int]:
    """The indices of the tensors that take part: of the first :data:`TENSORS`, in order, each that
    still fits in :data:`NUMEL` elements (an embedding larger than that is left out); the smallest
    one where none fits."""
    chosen, total = [], 0
    for index, param in enumerate(params[:TENSORS]):
        if total + param.numel() <= NUMEL:
            chosen.append(index)
            total += param.numel()
    if not chosen and len(params):
        chosen = [min(range(min(len(params), TENSORS)), key=lambda index: params[index].numel())]
    return chosen


@torch.no_grad()
def _run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: Sequence[torch.Tensor]) -> None:
    for _ in range(STEPS):
        for param, grad in zip(params, grads):
            param.grad = grad.to(param.dtype, copy=True)
        optimizer.step()


def _copies(params: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True)) for p in params]


@torch.no_grad()
def check_results(
    keys: Sequence[str],
    make: MakeOptimizer,
    reference_float64: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    forloop: str = "torch_forloop",
) -> dict[str, Any]:
    """Each competitor's error against float64 after :data:`STEPS` steps (see the module's docstring).

    ``make(key, params)`` builds competitor ``key``'s optimizer, ``reference_float64(params)`` the
    compared class's for-loop over float64 parameters; ``params`` and ``grads`` are the run's
    initial parameters and its gradients (copied here, never modified). Returns per key
    ``mean_abs_error``, ``moved_fraction`` (elements no longer equal to their initial value) and
    ``wrong``, with the for-loop's error as the baseline; where the for-loop has none or its error
    is not finite (AdamW's fp16 for-loop: ``eps=1e-8`` rounds to 0, and its parameters to inf), the
    smallest finite error of any competitor. A competitor whose error is not finite is wrong."""
    chosen = first_tensors(params)
    initial, grads = [params[index] for index in chosen], [grads[index] for index in chosen]
    numel = sum(p.numel() for p in initial)
    exact = _copies(initial, torch.float64)
    _run(reference_float64(exact), exact, grads)

    checked: dict[str, dict[str, Any]] = {}
    for key in keys:
        mine = _copies(initial)
        _run(make(key, mine), mine, grads)
        error = sum(float((m.double() - e).abs().sum()) for m, e in zip(mine, exact)) / max(numel, 1)
        moved = sum(int((m != p).sum()) for m, p in zip(mine, initial)) / max(numel, 1)
        checked[key] = {"mean_abs_error": error, "moved_fraction": moved}
    errors = [entry["mean_abs_error"] for entry in checked.values() if math.isfinite(entry["mean_abs_error"])]
    own = checked[forloop]["mean_abs_error"] if forloop in checked else math.inf
    baseline = own if math.isfinite(own) else min(errors, default=math.inf)
    for entry in checked.values():
        error = entry["mean_abs_error"]
        entry["wrong"] = not math.isfinite(error) or error > WRONG_FACTOR * baseline + ABS_SLACK
    return {
        "steps": STEPS,
        "tensors": len(chosen),
        "numel": numel,
        "baseline": forloop if math.isfinite(own) else "smallest finite error",
        "baseline_mean_abs_error": baseline,
        "wrong_factor": WRONG_FACTOR,
        "competitors": checked,
    }
