"""The measurements behind ``fused-optim bench``: competitors, interleaved rounds, the bandwidth limit.

Every competitor of one (shape set, dtype) holds its own copy of the same parameters
(``make_params``) and starts each timed call from the same gradients (``make_grads``,
drawn once and copied into its ``.grad`` before the call, outside the timing). A round
times every competitor once per op, in an order rotated by one each round; medians are
taken over rounds, and ratios are computed within a round, then medianed.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from fused_sgd import FusedSGD
from fused_testing.shapes import make_grads, make_params

HYPERPARAMETERS: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
"""With momentum and weight decay each element reads param, grad, momentum and writes param, momentum."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

OPS = ("step", "zero_grad", "clip")
ACCESSES = {"step": 5, "zero_grad": 1, "clip": 3}
"""Bytes moved per op, in units of ``numel * itemsize``: step 3 reads + 2 writes, zero_grad
1 write, clipping 2 reads (norm, then scale) + 1 write."""

WARMUP = ("step", "step", "zero_grad", "clip", "step")
"""Calls before the rounds: the first step builds FusedSGD's flat buffers (reported as "first step
(build)"); the step after the first clip shows any one-off re-adoption that clipping triggers."""

REFERENCE = "fused_sgd"
COMPETITORS = {
    "fused_sgd": "FusedSGD",
    "torch_forloop": "torch SGD for-loop",
    "torch_foreach": "torch SGD foreach",
    "torch_fused": "torch SGD fused",
}
CLIP_LABELS = {
    "fused_sgd": "FusedSGD.clip_grad_norm_fused_",
    "torch_foreach": "clip_grad_norm_(foreach=True)",
    "torch_forloop": "clip_grad_norm_(foreach=False)",
}
OP_COMPETITORS = {"step": tuple(COMPETITORS), "zero_grad": tuple(COMPETITORS), "clip": tuple(CLIP_LABELS)}


def label(op: str, key: str) -> str:
    return CLIP_LABELS[key] if op == "clip" else COMPETITORS[key]


# ----- devices ---------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: nothing on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "npu":
        return lambda: torch.npu.synchronize()  # type: ignore[attr-defined]  # torch_npu patches torch
    return lambda: None


@contextmanager
def _no_gc() -> Iterator[None]:
    # As timeit does: a collection triggered by one competitor's allocations must not land in its time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timed(call: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds one call takes, with the device drained before and after."""
    sync()
    with _no_gc():
        start = time.perf_counter()
        call()
        sync()
        return time.perf_counter() - start


def median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


# ----- the bandwidth limit -----------------------------------------------------
def bandwidth_probe(device: torch.device, mib: int, repeats: int) -> dict[str, Any]:
    """``repeats`` timings of ``a.add_(b)`` over two fp32 buffers of ``mib`` MiB each (3 accesses
    per element, buffers meant to be larger than the last-level cache), and the best of them."""
    sync = synchronizer(device)
    numel = mib * (1 << 20) // 4
    a = torch.ones(numel, device=device)
    b = torch.ones(numel, device=device)
    a.add_(b)  # first touch of every page, outside the timing
    times = [timed(lambda: a.add_(b), sync) for _ in range(repeats)]
    best = min(times)
    return {"bytes": 3 * numel * 4, "times_s": times, "best_s": best, "gbps": 3 * numel * 4 / best / 1e9}


def bandwidth_limit(probes: list[dict[str, Any]], mib: int) -> dict[str, Any]:
    """The limit: the best repetition of every probe of the run (a machine's bandwidth drifts when
    its neighbours' load does, so one probe at the start can under-state it)."""
    best = max(probes, key=lambda probe: probe["gbps"])
    return {
        "op": "a.add_(b)",
        "dtype": "fp32",
        "mib_per_buffer": mib,
        "probes": probes,
        "bytes": best["bytes"],
        "best_s": best["best_s"],
        "gbps": best["gbps"],
    }


# ----- competitors -------------------------------------------------------------
@dataclass(eq=False)
class Competitor:
    key: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    steps: int = 0
    warmup: list[tuple[str, float]] = field(default_factory=list)
    """(op, seconds) of each warm-up call."""

    def warmup_s(self, op: str, nth: int = -1) -> float:
        """Seconds of the ``nth`` warm-up call of ``op``."""
        return [seconds for name, seconds in self.warmup if name == op][nth]

    def grads(self) -> list[torch.Tensor]:
        # Fetched afresh each time: a re-adopting FusedSGD may re-bind its gradients.
        return [p.grad for p in self.params if p.grad is not None]


def _optimizer(key: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if key == "fused_sgd":
        return FusedSGD(params, **HYPERPARAMETERS)
    flavour: dict[str, dict[str, Any]] = {
        "torch_forloop": {"foreach": False},
        "torch_foreach": {"foreach": True},
        "torch_fused": {"fused": True},
    }
    return torch.optim.SGD(params, **HYPERPARAMETERS, **flavour[key])


def _op_call(op: str, competitor: Competitor, max_norm: float) -> Callable[[], Any]:
    optimizer = competitor.optimizer
    if op == "step":
        return optimizer.step
    if op == "zero_grad":
        if isinstance(optimizer, FusedSGD):
            return optimizer.zero_grad  # its default, set_to_none=False: one fill per flat buffer
        return lambda: optimizer.zero_grad(set_to_none=False)
    if isinstance(optimizer, FusedSGD):
        return lambda: optimizer.clip_grad_norm_fused_(max_norm)
    foreach = competitor.key == "torch_foreach"
    return lambda: torch.nn.utils.clip_grad_norm_(competitor.params, max_norm, foreach=foreach)


class Contest:
    """The competitors of one (shape set, dtype), their shared gradients, and the rounds."""

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        *,
        seed: int,
        max_norm: float,
    ) -> None:
        self.dtype, self.device, self.max_norm = dtype, device, max_norm
        self.sync = synchronizer(device)
        base = make_params(shapes, dtype=dtype, device=device, seed=seed)
        self.numel = sum(p.numel() for p in base)
        self.tensors = len(base)
        self.itemsize = base[0].element_size() if base else torch.tensor([], dtype=dtype).element_size()
        self.source_grads = make_grads(base, seed=seed + 1)
        self.competitors: dict[str, Competitor] = {}
        self.unavailable: dict[str, str] = {}
        self.stale_steps = {"warmup": 0, "rounds": 0}
        """FusedSGD steps after the first that found their layout stale (and so re-adopted in the step)."""
        self._phase = "warmup"
        keys = list(COMPETITORS)
        for index, key in enumerate(keys):
            # The last competitor takes the drawn tensors themselves: one copy of the model fewer.
            params = base if index == len(keys) - 1 else [torch.nn.Parameter(p.detach().clone()) for p in base]
            for param, grad in zip(params, self.source_grads):
                param.grad = grad.clone()
            try:
                self.competitors[key] = Competitor(key, params, _optimizer(key, params))
            except (RuntimeError, NotImplementedError, ValueError) as error:
                if key == REFERENCE:
                    raise
                self.unavailable[key] = f"{type(error).__name__}: {error}"
        del base

    def restore_grads(self, competitor: Competitor) -> None:
        """The shared gradients, copied into the competitor's own (in place: FusedSGD's stay bound)."""
        torch._foreach_copy_(competitor.grads(), self.source_grads)

    def call(self, op: str, competitor: Competitor) -> float:
        """Seconds of one ``op`` call, after restoring the shared gradients (outside the timing)."""
        self.restore_grads(competitor)
        if op == "step" and competitor.key == REFERENCE and competitor.steps and not self.fused_layout_current():
            self.stale_steps[self._phase] += 1
        seconds = timed(_op_call(op, competitor, self.max_norm), self.sync)
        competitor.steps += op == "step"
        return seconds

    def warm_up(self) -> None:
        """:data:`WARMUP` for every competitor, timed but kept out of the medians: FusedSGD builds
        its flat buffers in the first step, and every first call of an op may set something up."""
        for key, competitor in list(self.competitors.items()):
            for index, op in enumerate(WARMUP):
                if key not in OP_COMPETITORS[op]:
                    continue
                try:
                    competitor.warmup.append((op, self.call(op, competitor)))
                except (RuntimeError, NotImplementedError) as error:
                    if key == REFERENCE or index > 0:
                        raise
                    del self.competitors[key]
                    self.unavailable[key] = f"{type(error).__name__}: {error}"
                    break
        self._phase = "rounds"

    def fused_layout_current(self) -> bool:
        layout = self.competitors[REFERENCE].optimizer._layout  # type: ignore[attr-defined]
        return layout is not None and layout.is_current()

    def run_round(self, round_index: int, rounds_for: Callable[[str, str], int]) -> dict[str, dict[str, float]]:
        """One round: every op, every competitor once, in an order rotated by ``round_index``.
        ``rounds_for(op, key)`` caps how many rounds a slow competitor takes part in."""
        times: dict[str, dict[str, float]] = {}
        for op in OPS:
            keys = [key for key in OP_COMPETITORS[op] if key in self.competitors]
            shift = round_index % len(keys)
            times[op] = {}
            for key in keys[shift:] + keys[:shift]:
                if round_index >= rounds_for(op, key):
                    continue
                times[op][key] = self.call(op, self.competitors[key])
        return times

    def staleness_check(self, calls: int, repeats: int) -> dict[str, Any]:
        """Seconds per ``FusedSGD._layout.is_current()`` call: the check inside every step."""
        layout = self.competitors[REFERENCE].optimizer._layout  # type: ignore[attr-defined]
        per_call = []
        for _ in range(repeats):
            with _no_gc():
                start = time.perf_counter()
                for _ in range(calls):
                    layout.is_current()
                per_call.append((time.perf_counter() - start) / calls)
        median_s = statistics.median(per_call)
        return {"calls": calls, "times_s": per_call, "median_s": median_s, "current": layout.is_current()}

    @torch.no_grad()
    def max_abs_diff(self, key: str, against: str = "torch_forloop") -> float | None:
        """Largest |param - reference param| after the bench: did each competitor do the same work?"""
        if against not in self.competitors or self.competitors[key].steps != self.competitors[against].steps:
            return None
        pairs = zip(self.competitors[key].params, self.competitors[against].params)
        return max((float((a.float() - b.float()).abs().max()) for a, b in pairs if a.numel()), default=0.0)
