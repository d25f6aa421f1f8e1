"""The measurements behind ``fused-optim bench``: competitors, training-loop cycles, interleaved
rounds, the bandwidth limit.

The competitors of one run are a fused optimizer (FusedSGD, FusedAdamW: ``--optimizer``, see
:mod:`fused_optim.optimizers`) and its torch class with ``foreach=False``, ``foreach=True`` and
``fused=True``; "the fused optimizer" below is the first.

Every competitor of one (shape set, dtype) holds its own copy of the same parameters
(``make_params``) and runs the same cycle with the same gradients (``make_grads``, drawn once):
``zero_grad()`` [timed], the gradients arrive [not in the timings], ``step()`` [timed]. The
gradients arrive in one of two modes (:data:`GRAD_MODES`):

* ``fresh``, torch's default loop: ``zero_grad(set_to_none=True)`` drops every ``.grad``, then
  each parameter is handed a new tensor as backward hands it over after ``set_to_none``:
  ``torch.autograd.backward(params, grads)``, whose ``AccumulateGrad`` copies the shared gradient
  into a new C++ tensor. That hand-over is timed on its own, once per round, and reported as the
  gradient arrival.
* ``bound``: ``zero_grad(set_to_none=False)`` zeroes the gradients in place, and the shared
  gradients are copied into those same tensors (the fused optimizer's stay bound to its flat buffers).

A round runs one cycle per (mode, competitor) and, right after the bound cycles, one clipping
per competitor; the order of the modes and of the competitors rotates by one each round. A real
loop never switches modes, so a competitor whose previous cycle ran in the other mode first
runs one settling cycle, kept out of the timings: every timed cycle follows a cycle of its own
mode. Medians are taken over rounds, and ratios are computed within a round, then medianed.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fused_testing.shapes import make_grads, make_params

from .bench_check import check_results
from .optimizers import DEFAULT, SPECS, OptimizerSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

GRAD_MODES = ("fresh", "bound")
"""How gradients reach each step: new tensor objects after ``zero_grad(set_to_none=True)``
(torch's default loop), or copied in place into the gradients ``zero_grad(set_to_none=False)`` kept."""
SET_TO_NONE = {"fresh": True, "bound": False}
"""The ``set_to_none`` each mode's ``zero_grad`` passes, explicitly, to every competitor."""

MODE_OPS = {"fresh": ("step", "zero_grad", "cycle"), "bound": ("step", "zero_grad", "cycle", "clip")}
"""The ops reported per mode; clipping is timed with bound gradients only."""
TIMED_OPS = ("zero_grad", "step")
"""The two timed calls of a cycle; ``cycle`` is their sum, per round."""

TORCH_FLAVOURS: dict[str, tuple[str, dict[str, bool]]] = {
    "torch_forloop": ("for-loop", {"foreach": False}),
    "torch_foreach": ("foreach", {"foreach": True}),
    "torch_fused": ("fused", {"fused": True}),
}
"""The torch competitors: key -> (label suffix, constructor flag)."""
TORCH_CLIP_LABELS = {
    "torch_foreach": "clip_grad_norm_(foreach=True)",
    "torch_forloop": "clip_grad_norm_(foreach=False)",
}


def accesses(spec: OptimizerSpec) -> dict[str, dict[str, int]]:
    """Bytes each op must move, in units of ``numel * itemsize``, per gradient mode: the step's
    (:attr:`~fused_optim.optimizers.OptimizerSpec.step_accesses`, SGD with momentum 5, AdamW 7);
    zero_grad 1 write in place, nothing when it sets the gradients to None; cycle = zero_grad +
    step; clipping 2 reads (norm, then scale) + 1 write."""
    step = spec.step_accesses
    return {
        "fresh": {"step": step, "zero_grad": 0, "cycle": step},
        "bound": {"step": step, "zero_grad": 1, "cycle": step + 1, "clip": 3},
    }


def competitors(spec: OptimizerSpec) -> dict[str, str]:
    """Every competitor's key and label, the fused optimizer first: ``fused_sgd: FusedSGD``,
    ``torch_fused: torch SGD fused``, ..."""
    torch_ones = {key: f"{spec.competitor} {word}" for key, (word, _) in TORCH_FLAVOURS.items()}
    return {spec.reference: spec.fused_name, **torch_ones}


def missing_flavours(spec: OptimizerSpec) -> dict[str, str]:
    """The torch competitors the compared class does not offer (torch.optim.RMSprop has no ``fused``), with why."""
    return {
        key: f"{spec.torch_path} has no {word} implementation"
        for key, (word, flags) in TORCH_FLAVOURS.items()
        if any(flag not in spec.flags for flag, value in flags.items() if value)
    }


def clip_labels(spec: OptimizerSpec) -> dict[str, str]:
    """The clipping competitors' keys and labels: the fused optimizer's method, torch's function."""
    return {spec.reference: f"{spec.fused_name}.clip_grad_norm_fused_", **TORCH_CLIP_LABELS}


def op_competitors(spec: OptimizerSpec) -> dict[str, tuple[str, ...]]:
    """Which competitors each op is timed for."""
    every = tuple(competitors(spec))
    return {"step": every, "zero_grad": every, "cycle": every, "clip": tuple(clip_labels(spec))}


def label(op: str, key: str, spec: OptimizerSpec) -> str:
    """A competitor's name in the tables: clipping names the clipping function."""
    return clip_labels(spec)[key] if op == "clip" else competitors(spec)[key]


T = TypeVar("T")


def warmup_plan(modes: Sequence[str]) -> list[tuple[str, str]]:
    """The (what, mode) calls before the rounds, ``what`` a ``"cycle"`` or ``"clip"``: two cycles
    (a fused optimizer's first step builds its flat buffers: reported as "first step (build)", beside the
    second), a clip when bound gradients are timed, then one cycle per mode, so that every mode's
    first call of each op is kept out of the medians; the last in the first round's first mode."""
    build = "bound" if "bound" in modes else modes[0]
    plan = [("cycle", build), ("cycle", build)]
    if "bound" in modes:
        plan.append(("clip", "bound"))
    return plan + [("cycle", mode) for mode in reversed(modes)]


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """``items`` rotated left by ``shift`` (modulo their number)."""
    if not items:
        return []
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


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
    warmup: list[dict[str, Any]] = field(default_factory=list)
    """``{"op", "grads", "seconds"}`` of each timed warm-up call (``grads``: the gradient mode)."""
    mode: str | None = None
    """The gradient mode of its last cycle."""
    settling_cycles: int = 0
    """Cycles run, untimed, in the rounds because the previous cycle ran in the other mode."""

    def warmup_s(self, op: str, nth: int = -1, grads: str | None = None) -> float:
        """Seconds of the ``nth`` warm-up call of ``op`` (in gradient mode ``grads``, if given)."""
        return [call["seconds"] for call in self.warmup if call["op"] == op and grads in (None, call["grads"])][nth]

    def last_warmup_s(self, what: str) -> float:
        """Seconds of the last warm-up clip (``what == "clip"``) or cycle of mode ``what``."""
        if what == "clip":
            return self.warmup_s("clip")
        return sum(self.warmup_s(op, grads=what) for op in TIMED_OPS)

    def grads(self) -> list[torch.Tensor]:
        """The parameters' current gradients, fetched afresh: a fused optimizer may re-bind them."""
        return [p.grad for p in self.params if p.grad is not None]


def backward_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor]) -> None:
    """The gradients arrive as from ``loss.backward()`` after ``set_to_none``: the autograd engine
    runs each parameter's ``AccumulateGrad``, which installs a new tensor made in C++ (a copy of
    ``grads[i]``: it steals a gradient only when nothing else references it, and these stay shared),
    without a Python object, as backward's gradients are; ``p.grad = g`` would attach one."""
    torch.autograd.backward(list(params), list(grads))


@dataclass
class RoundTimes:
    """One round's seconds: ``ops[mode][op][key]`` (op: zero_grad, step; clip under bound) and
    the gradient arrival of the fresh mode (the hand-over to the fused optimizer's parameters; None when not timed)."""

    ops: dict[str, dict[str, dict[str, float]]]
    arrival: float | None = None


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
        modes: Sequence[str] = GRAD_MODES,
        spec: OptimizerSpec = SPECS[DEFAULT],
    ) -> None:
        unknown = set(modes) - set(GRAD_MODES)
        if unknown or not modes:
            raise ValueError(f"gradient modes must be a non-empty subset of {GRAD_MODES}, got {tuple(modes)}")
        self.dtype, self.device, self.max_norm = dtype, device, max_norm
        self.modes = tuple(dict.fromkeys(modes))
        self.sync = synchronizer(device)
        self.spec = spec
        self.reference = spec.reference
        """The fused optimizer's key: the competitor every ratio is taken against."""
        self.labels = competitors(spec)
        self.op_competitors = op_competitors(spec)
        self.fused_class = spec.fused_class()
        base = make_params(shapes, dtype=dtype, device=device, seed=seed)
        self.numel = sum(p.numel() for p in base)
        self.tensors = len(base)
        self.itemsize = base[0].element_size() if base else torch.tensor([], dtype=dtype).element_size()
        self.source_grads = make_grads(base, seed=seed + 1)
        self.competitors: dict[str, Competitor] = {}
        self.unavailable: dict[str, str] = {}
        self.stale_steps = {mode: {"warmup": 0, "settling": 0, "rounds": 0} for mode in self.modes}
        """Per mode and phase, the fused optimizer's steps after the first that found their layout stale (and
        so re-adopted in the step): expected with fresh gradients, a slow path with bound ones."""
        self.unavailable.update(missing_flavours(spec))
        keys = [key for key in self.labels if key not in self.unavailable]
        for index, key in enumerate(keys):
            # The last competitor takes the drawn tensors themselves: one copy of the model fewer.
            params = base if index == len(keys) - 1 else [torch.nn.Parameter(p.detach().clone()) for p in base]
            for param, grad in zip(params, self.source_grads):
                param.grad = grad.clone()
            try:
                self.competitors[key] = Competitor(key, params, self.make_optimizer(key, params))
            except (RuntimeError, NotImplementedError, ValueError) as error:
                if key == self.reference:
                    raise
                self.unavailable[key] = f"{type(error).__name__}: {error}"
        del base

    def make_optimizer(self, key: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Competitor ``key``'s optimizer over ``params``."""
        if key == self.reference:
            return self.fused_class(params, **self.spec.hyperparameters)
        return self.spec.torch_optimizer(params, self.spec.hyperparameters, TORCH_FLAVOURS[key][1])

    def _clip_call(self, competitor: Competitor) -> Callable[[], Any]:
        optimizer, max_norm = competitor.optimizer, self.max_norm
        if competitor.key == self.reference:
            return lambda: optimizer.clip_grad_norm_fused_(max_norm)  # type: ignore[attr-defined]
        foreach = competitor.key == "torch_foreach"
        return lambda: torch.nn.utils.clip_grad_norm_(competitor.params, max_norm, foreach=foreach)

    # ----- one cycle -------------------------------------------------------
    def restore_grads(self, competitor: Competitor) -> None:
        """The shared gradients, copied into the competitor's own (in place: a fused optimizer's stay bound)."""
        torch._foreach_copy_(competitor.grads(), self.source_grads)

    def hand_over(self, mode: str, competitor: Competitor) -> float | None:
        """The gradients arrive, outside the cycle's timings. Fresh: autograd hands each parameter
        a new copy of its shared gradient (:func:`backward_grads`); returns the seconds of that
        hand-over, copies included. Bound: copied in place; None."""
        if mode == "bound":
            self.restore_grads(competitor)
            return None
        return timed(lambda: backward_grads(competitor.params, self.source_grads), self.sync)

    def cycle(self, mode: str, competitor: Competitor, phase: str = "rounds") -> dict[str, float]:
        """One training-loop cycle: ``zero_grad(set_to_none=...)`` [timed], the gradients arrive
        (:meth:`hand_over`), ``step()`` [timed]. Returns the seconds of ``zero_grad``, ``step``
        and, in the fresh mode, ``arrival``; ``phase`` (warmup, settling, rounds) only labels
        the fused optimizer's stale steps."""
        optimizer = competitor.optimizer
        set_to_none = SET_TO_NONE[mode]
        seconds = {"zero_grad": timed(lambda: optimizer.zero_grad(set_to_none=set_to_none), self.sync)}
        arrival = self.hand_over(mode, competitor)
        if arrival is not None:
            seconds["arrival"] = arrival
        if competitor.key == self.reference and competitor.steps and not self.fused_layout_current():
            self.stale_steps[mode][phase] += 1
        seconds["step"] = timed(lambda: optimizer.step(), self.sync)
        competitor.steps += 1
        competitor.mode = mode
        return seconds

    def timed_cycle(self, mode: str, competitor: Competitor) -> dict[str, float]:
        """A cycle of the rounds, after one settling cycle if the competitor's previous cycle ran
        in the other mode: the switch's one-off costs (re-binding, re-adoption) stay out of it."""
        if competitor.mode != mode:
            self.cycle(mode, competitor, phase="settling")
            competitor.settling_cycles += 1
        return self.cycle(mode, competitor)

    def clip(self, competitor: Competitor) -> float:
        """Seconds of one clipping, after restoring the shared gradients in place (outside the timing)."""
        self.restore_grads(competitor)
        return timed(self._clip_call(competitor), self.sync)

    # ----- warm-up and rounds -----------------------------------------------
    def check_results(self) -> dict[str, Any]:
        """:func:`fused_optim.bench_check.check_results` over the competitors, from the parameters they
        all start from: call it before their first step."""
        spec = self.spec

        def reference_float64(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            return spec.torch_optimizer(params, spec.hyperparameters, TORCH_FLAVOURS["torch_forloop"][1])

        start = self.competitors[self.reference].params
        return check_results(list(self.competitors), self.make_optimizer, reference_float64, start, self.source_grads)

    def warm_up(self) -> None:
        """:func:`warmup_plan` for every competitor, timed but kept out of the medians: the fused
        optimizer builds its flat buffers in the first step, and every first call of an op may set something up."""
        plan = warmup_plan(self.modes)
        for key, competitor in list(self.competitors.items()):
            for index, (what, mode) in enumerate(plan):
                if key not in self.op_competitors[what]:
                    continue
                try:
                    self._warmup_call(what, mode, competitor)
                except (RuntimeError, NotImplementedError) as error:
                    if key == self.reference or index > 0:
                        raise
                    del self.competitors[key]
                    self.unavailable[key] = f"{type(error).__name__}: {error}"
                    break

    def _warmup_call(self, what: str, mode: str, competitor: Competitor) -> None:
        if what == "clip":
            competitor.warmup.append({"op": "clip", "grads": mode, "seconds": self.clip(competitor)})
            return
        seconds = self.cycle(mode, competitor, phase="warmup")
        competitor.warmup += [{"op": op, "grads": mode, "seconds": seconds[op]} for op in TIMED_OPS]

    def fused_layout_current(self) -> bool:
        """The fused optimizer's own staleness check, ``_layout.is_current()``; False before its first step."""
        layout = getattr(self.competitors[self.reference].optimizer, "_layout", None)
        return layout is not None and layout.is_current()

    def run_round(self, round_index: int, rounds_for: Callable[[str, str], int]) -> RoundTimes:
        """One round: per mode, a cycle of every competitor (:meth:`timed_cycle`), and right after
        the bound cycles a clip of every clipping competitor, so that clipping always meets bound
        gradients; modes and competitors in an order rotated by ``round_index``.
        ``rounds_for(what, key)`` (``what``: a mode or ``"clip"``) caps how many rounds a slow
        competitor takes part in."""
        result = RoundTimes(ops={mode: {op: {} for op in TIMED_OPS} for mode in self.modes})
        keys = rotated(list(self.competitors), round_index)
        for mode in rotated(self.modes, round_index):
            for key in keys:
                if round_index >= rounds_for(mode, key):
                    continue
                seconds = self.timed_cycle(mode, self.competitors[key])
                for op in TIMED_OPS:
                    result.ops[mode][op][key] = seconds[op]
                if key == self.reference and "arrival" in seconds:
                    result.arrival = seconds["arrival"]
            if mode == "bound":
                clipping = [key for key in keys if key in self.op_competitors["clip"]]
                result.ops[mode]["clip"] = {
                    key: self.clip(self.competitors[key]) for key in clipping if round_index < rounds_for("clip", key)
                }
        return result

    def staleness_check(self, calls: int, repeats: int) -> dict[str, Any]:
        """Seconds per ``_layout.is_current()`` call of the fused optimizer: the check inside every step."""
        layout = self.competitors[self.reference].optimizer._layout  # type: ignore[attr-defined]
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
