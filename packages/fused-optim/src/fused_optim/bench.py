"""Time step(), zero_grad() and gradient clipping of a fused optimizer against its torch class's
for-loop, foreach and fused implementations, side by side in one process, on the parameter shapes
of real architectures (fused_testing.shapes.SHAPE_SETS): FusedSGD against torch.optim.SGD (the
default), or with --optimizer adamw FusedAdamW against torch.optim.AdamW.

Every competitor runs the training loop's cycle, ``zero_grad()`` [timed], gradients arrive,
``step()`` [timed], in two gradient modes (``--grads``): "fresh", torch's default loop
(``zero_grad(set_to_none=True)``, then new gradient tensors from the autograd engine), and "bound"
(``zero_grad(set_to_none=False)``, then gradients copied in place). The cycle's time is
zero_grad + step, per round; the fresh mode's assignment loop is timed apart, once per round, as
the "gradient arrival". A competitor switching modes first runs one untimed settling cycle in
the new mode. Clipping is timed with bound gradients.

Rounds are interleaved: each round runs every mode and every competitor once, in an order rotated
by one each round; medians are over rounds and ratios (competitor / the fused optimizer) are
computed per round, then medianed. Bandwidth is compared with the limit measured in the same run:
a.add_(b) over fp32 buffers larger than the last-level cache, probed at the start and after each
(set, dtype), best repetition.

With --distributed N it times gradient averaging instead: fused_core.distributed.all_reduce_grads
against DDP, N gloo ranks over loopback (see fused_optim.bench_distributed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from fused_core import grad_norm, registry
from fused_testing.shapes import SHAPE_SETS

from . import bench_report, devices
from .bench_measure import (
    DTYPES,
    GRAD_MODES,
    MODE_OPS,
    SET_TO_NONE,
    TIMED_OPS,
    Contest,
    RoundTimes,
    accesses,
    bandwidth_limit,
    bandwidth_probe,
    label,
    median,
)
from .optimizers import DEFAULT, SPECS, OptimizerSpec

NAME = "bench"
HELP = (
    "time FusedSGD's (or FusedAdamW's) step, zero_grad and clipping against torch.optim.SGD's (AdamW's) "
    "for-loop, foreach and fused"
)
SCHEMA = 2
"""Version of the --json layout; 2: step, zero_grad and cycle per gradient mode (``runs[].modes``)."""

GRADS_CHOICES = {"fresh": ("fresh",), "bound": ("bound",), "both": GRAD_MODES}
MODE_DESCRIPTIONS = {
    "fresh": "zero_grad(set_to_none=True), then new gradient tensors from autograd (torch's default loop)",
    "bound": "zero_grad(set_to_none=False), then gradients copied in place into the existing .grad tensors",
}

QUICK_SETS = ("resnet50", "20k-small")
DEFAULT_ROUNDS, QUICK_ROUNDS = 10, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = list(SHAPE_SETS)
    parser.add_argument(
        "--optimizer",
        choices=list(SPECS),
        default=DEFAULT,
        help="what to time: sgd (FusedSGD against torch.optim.SGD, "
        f"{_hyperparameters(SPECS['sgd'])}) or adamw (FusedAdamW against torch.optim.AdamW, "
        f"{_hyperparameters(SPECS['adamw'])}) (default: {DEFAULT})",
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=names,
        metavar="SET",
        help=f"shape sets to run, from: {', '.join(names)} (default: all; with --quick: {' '.join(QUICK_SETS)})",
    )
    parser.add_argument(
        "--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"], help="dtypes (default: fp32 bf16)"
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        help=f"interleaved rounds per (set, dtype) (default: {DEFAULT_ROUNDS}; with --quick: {QUICK_ROUNDS})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sets and few rounds, for CI (explicit --sets/--rounds win)"
    )
    parser.add_argument(
        "--grads",
        choices=list(GRADS_CHOICES),
        default="both",
        help="how gradients reach each step: fresh (torch's default loop: zero_grad(set_to_none=True), then "
        "new tensors from torch.autograd.backward), bound (zero_grad(set_to_none=False), then copied in "
        "place; clipping is timed in this mode), or both, interleaved (default: both)",
    )
    parser.add_argument("--device", default="cpu", help=devices.HELP)
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON to PATH ('-': stdout)")
    parser.add_argument("--plot", metavar="PNG", help="draw the comparison with matplotlib into PNG")
    parser.add_argument("--max-norm", type=float, default=1.0, help="clipping's max_norm (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of make_params (make_grads uses seed + 1)")
    parser.add_argument(
        "--bandwidth-mib",
        type=_positive_int,
        default=256,
        help="size of each fp32 buffer of the bandwidth-limit probe; keep it above the last-level cache (default: 256)",
    )
    parser.add_argument(
        "--max-op-seconds",
        type=float,
        default=2.0,
        help="a competitor whose warm-up call of an op takes longer runs that op in at most --slow-rounds rounds "
        "(default: 2.0)",
    )
    parser.add_argument("--slow-rounds", type=_positive_int, default=3, help="see --max-op-seconds (default: 3)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="torch.set_num_threads (default: torch's own choice; with --distributed: 1 per rank)",
    )
    parser.add_argument(
        "--distributed",
        type=_ranks,
        metavar="N",
        help="instead: time a training step's gradient averaging, fused_core.distributed.all_reduce_grads "
        "against DDP, with N >= 2 gloo ranks over loopback on the CPU (fp32; uses --sets, --rounds, --json)",
    )
    parser.add_argument(
        "--fsdp",
        nargs="*",
        metavar="MODEL",
        help="with --distributed N: time the optimizer step under FSDP2 (fully_shard) instead, FusedSGD against "
        "torch.optim.SGD's for-loop, foreach and fused over the DTensors, on the models named (1000-small, "
        "large; default: both) (fp32; uses --rounds, --json)",
    )


def _hyperparameters(spec: OptimizerSpec) -> str:
    return ", ".join(f"{key}={value}" for key, value in spec.hyperparameters.items())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ranks(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 ranks, got {value}")
    return value


def _loadavg() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(CPU seconds of this process, busy and total CPU seconds of the machine), Linux only."""
    try:
        import resource

        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]  # user .. steal
        usage = resource.getrusage(resource.RUSAGE_SELF)
        hz = os.sysconf("SC_CLK_TCK")
    except (ImportError, OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait
    return usage.ru_utime + usage.ru_stime, (sum(ticks) - idle) / hz, sum(ticks) / hz


def _others_percent(start: tuple[float, float, float] | None) -> float | None:
    """Share of the machine's CPU time that other processes (or the hypervisor) took since ``start``."""
    end = _cpu_seconds()
    if start is None or end is None or end[2] <= start[2]:
        return None
    own, busy, total = (after - before for after, before in zip(end, start))
    return round(max(0.0, 100 * (busy - own) / total), 1)


def _machine(device: torch.device, load: list[float] | None) -> dict[str, Any]:
    return {
        "device": str(device),
        "device_name": devices.device_name(device),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": load,
    }


def run(args: argparse.Namespace) -> int:
    spec = SPECS[args.optimizer]
    if args.fsdp is not None and not args.distributed:
        print("fused-optim bench: --fsdp needs --distributed N", file=sys.stderr)
        return 2
    if args.distributed:
        return _run_distributed(args)
    try:
        spec.fused_class()  # its package may be missing: say so before measuring anything
        device = devices.resolve_device(args.device)
        if args.plot:
            from . import bench_plot

            bench_plot.require_matplotlib()
    except (ValueError, ImportError) as error:
        print(f"fused-optim bench: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = args.sets or (list(QUICK_SETS) if args.quick else list(SHAPE_SETS))
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    dtypes = list(dict.fromkeys(args.dtype))
    sets = list(dict.fromkeys(sets))
    modes = GRADS_CHOICES[args.grads]
    cpus = os.cpu_count() or 1
    load = _loadavg()
    cpu_start = _cpu_seconds()
    if device.type == "cpu" and load is not None and load[0] > cpus / 2:
        print(
            f"fused-optim bench: load average {load[0]} on {cpus} CPUs before starting: "
            "other processes compete for the cores, so timings will be noisy",
            file=sys.stderr,
        )
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": _machine(device, load),
        "settings": {
            "sets": sets,
            "dtypes": dtypes,
            "grads": list(modes),
            "rounds": rounds,
            "quick": args.quick,
            "optimizer": spec.name,
            "fused_optimizer": spec.fused_name,
            "torch_optimizer": spec.torch_path,
            "reference": spec.reference,
            "hyperparameters": dict(spec.hyperparameters),
            "max_norm": args.max_norm,
            "seed": args.seed,
            "max_op_seconds": args.max_op_seconds,
            "slow_rounds": args.slow_rounds,
            "accesses_per_element": accesses(spec),
        },
        "runs": [],
    }
    repeats = 3 if args.quick else 10
    probes = []
    total = 1 + len(sets) * len(dtypes) * (rounds + 2)
    with tqdm(total=total, desc="bench", unit="round", file=sys.stderr) as bar:

        def probe(when: str) -> None:
            bar.set_description(f"bandwidth limit ({when})")
            probes.append({"when": when, **bandwidth_probe(device, args.bandwidth_mib, repeats)})
            bar.update()

        probe("start")
        for name in sets:
            shapes = SHAPE_SETS[name]()
            for dtype in dtypes:
                bar.set_description(f"{name} {dtype}")
                result["runs"].append(_bench_one(name, shapes, dtype, device, rounds, modes, args, bar, spec))
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                probe(f"after {name} {dtype}")
    result["machine"]["loadavg_end"] = _loadavg()
    result["machine"]["others_cpu_percent"] = _others_percent(cpu_start)
    result["bandwidth_limit"] = bandwidth_limit(probes, args.bandwidth_mib)
    _against_limit(result)

    _report(bench_report.markdown(result), result, args.json)
    if args.plot:
        from . import bench_plot

        bench_plot.plot(result, args.plot)
        print(f"fused-optim bench: wrote {args.plot}", file=sys.stderr)
    return 0


def _report(table: str, result: dict[str, Any], json_path: str | None) -> None:
    """Print the table (to stderr when the JSON goes to stdout) and write the JSON if asked."""
    print(table, file=sys.stderr if json_path == "-" else sys.stdout)
    if json_path:
        text = json.dumps(result, indent=1)
        if json_path == "-":
            print(text)
        else:
            with open(json_path, "w") as out:
                out.write(text + "\n")
            print(f"fused-optim bench: wrote {json_path}", file=sys.stderr)


def _run_distributed(args: argparse.Namespace) -> int:
    """``--distributed N``: all_reduce_grads against DDP, N gloo ranks on the CPU (bench_distributed)."""
    if args.device != "cpu" or args.plot:
        option = "--plot" if args.plot else f"--device {args.device}"
        print(f"fused-optim bench: --distributed runs gloo on the CPU, without {option}", file=sys.stderr)
        return 2
    if args.optimizer != DEFAULT:
        print(f"fused-optim bench: --distributed times FusedSGD, not --optimizer {args.optimizer}", file=sys.stderr)
        return 2
    if args.fsdp is not None:
        return _run_fsdp(args)
    from . import bench_distributed

    sets = list(dict.fromkeys(args.sets or (list(QUICK_SETS) if args.quick else list(SHAPE_SETS))))
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    threads = args.threads or 1
    load = _loadavg()
    shapes = {name: list(SHAPE_SETS[name]()) for name in sets}  # resolved here: spawned ranks see only these
    print(f"fused-optim bench: {args.distributed} ranks, {rounds} rounds, {', '.join(sets)}", file=sys.stderr)
    measured = bench_distributed.run(shapes, args.distributed, rounds, threads=threads)
    settings = {
        "sets": sets,
        "steps_per_round": bench_distributed.STEPS,
        "quick": args.quick,
        "hyperparameters": bench_distributed.HYPERPARAMETERS,
    }
    result = _gloo_result("distributed", args, load, rounds, settings, measured)
    result["scenarios"] = list(bench_distributed.SCENARIOS)
    _report(bench_distributed.table(measured, args.distributed), result, args.json)
    return 0


def _gloo_result(
    kind: str, args: argparse.Namespace, load: Any, rounds: int, settings: dict[str, Any], measured: Any
) -> dict[str, Any]:
    """The JSON record of a run over ``--distributed N`` gloo ranks on the CPU (fp32)."""
    threads = args.threads or 1
    return {
        "schema": 1,
        "kind": kind,
        "machine": {**_machine(torch.device("cpu"), load), "torch_threads": threads, "loadavg_end": _loadavg()},
        "settings": {"ranks": args.distributed, "dtype": "fp32", "rounds": rounds, "backend": "gloo", **settings},
        "results": measured,
    }


def _run_fsdp(args: argparse.Namespace) -> int:
    """``--distributed N --fsdp``: the optimizer step over FSDP2's DTensors (bench_fsdp)."""
    from . import bench_fsdp

    models = list(dict.fromkeys(args.fsdp)) or list(bench_fsdp.MODELS)
    unknown = [name for name in models if name not in bench_fsdp.MODELS]
    if unknown:
        print(
            f"fused-optim bench: no FSDP2 model {unknown[0]!r}; choose from {', '.join(bench_fsdp.MODELS)}",
            file=sys.stderr,
        )
        return 2
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    threads = args.threads or 1
    load = _loadavg()
    print(f"fused-optim bench: FSDP2, {args.distributed} ranks, {rounds} rounds, {', '.join(models)}", file=sys.stderr)
    measured = bench_fsdp.run(args.distributed, rounds, tuple(models), threads=threads)
    settings = {
        "models": models,
        "steps_per_round": bench_fsdp.STEPS,
        "hyperparameters": bench_fsdp.HYPERPARAMETERS,
    }
    result = _gloo_result("fsdp", args, load, rounds, settings, measured)
    result["competitors"] = list(bench_fsdp.COMPETITORS)
    _report(bench_fsdp.table(measured, args.distributed), result, args.json)
    return 0


def _bench_one(
    name: str,
    shapes: Sequence[torch.Size],
    dtype: str,
    device: torch.device,
    rounds: int,
    modes: Sequence[str],
    args: argparse.Namespace,
    bar: tqdm,
    spec: OptimizerSpec,
) -> dict[str, Any]:
    """Every measurement of one (set, dtype); the competitors are freed on return."""
    contest = Contest(shapes, DTYPES[dtype], device, seed=args.seed, max_norm=args.max_norm, modes=modes, spec=spec)
    result_check = contest.check_results()
    contest.warm_up()
    bar.update()

    def rounds_for(what: str, key: str) -> int:
        slow = contest.competitors[key].last_warmup_s(what) > args.max_op_seconds
        return min(rounds, args.slow_rounds) if slow else rounds

    per_round = []
    for index in range(rounds):
        bar.set_postfix_str(f"round {index + 1}/{rounds}")
        per_round.append(contest.run_round(index, rounds_for))
        bar.update()
    bar.set_postfix_str("")

    measured = {mode: _mode_summary(contest, per_round, mode) for mode in contest.modes}
    staleness = contest.staleness_check(calls=200 if args.quick else 2000, repeats=3 if args.quick else 7)
    staleness["percent_of_step"] = {
        mode: _percent(staleness["median_s"], entry["ops"]["step"]["competitors"][contest.reference]["median_s"])
        for mode, entry in measured.items()
    }
    return {
        "set": name,
        "dtype": dtype,
        "fused_kernels": _fused_kernels(contest.competitors[contest.reference].optimizer, device, DTYPES[dtype]),
        "tensors": contest.tensors,
        "numel": contest.numel,
        "itemsize": contest.itemsize,
        "competitors": {
            key: {
                "label": contest.labels[key],
                "first_step_s": competitor.warmup_s("step", 0),
                "second_step_s": competitor.warmup_s("step", 1),
                "warmup": competitor.warmup,
                "steps": competitor.steps,
                "settling_cycles": competitor.settling_cycles,
                "max_abs_diff_vs_forloop": contest.max_abs_diff(key),
            }
            for key, competitor in contest.competitors.items()
        },
        "unavailable": contest.unavailable,
        "result_check": result_check,
        "staleness_check": staleness,
        "modes": measured,
    }


def _percent(part: float | None, whole: float | None) -> float | None:
    return 100 * part / whole if part is not None and whole else None


def _times(per_round: list[RoundTimes], mode: str, op: str, key: str) -> list[float | None]:
    """``key``'s seconds of ``op`` in ``mode``, one per round (None where it sat out); a cycle is
    the zero_grad and the step of the same round, added."""
    if op != "cycle":
        return [times.ops[mode][op].get(key) for times in per_round]
    cycles: list[float | None] = []
    for times in per_round:
        parts = [times.ops[mode][part].get(key) for part in TIMED_OPS]
        cycles.append(sum(part for part in parts if part is not None) if None not in parts else None)
    return cycles


def _mode_summary(contest: Contest, per_round: list[RoundTimes], mode: str) -> dict[str, Any]:
    """One gradient mode of one (set, dtype): each op's times, ratios and bytes, the gradient
    arrival (fresh), and how many of the fused optimizer's steps found their layout stale."""
    ops: dict[str, Any] = {}
    for op in MODE_OPS[mode]:
        moved = accesses(contest.spec)[mode][op] * contest.numel * contest.itemsize
        keys = [key for key in contest.op_competitors[op] if key in contest.competitors]
        times = {key: _times(per_round, mode, op, key) for key in keys}
        ops[op] = {"bytes": moved, "competitors": {key: _entry(op, key, times, moved, contest.spec) for key in keys}}
    summary: dict[str, Any] = {
        "gradients": MODE_DESCRIPTIONS[mode],
        "zero_grad_set_to_none": SET_TO_NONE[mode],
        "ops": ops,
        "stale_fused_steps": contest.stale_steps[mode],
    }
    if mode == "fresh":
        arrivals = [times.arrival for times in per_round]
        what = f"torch.autograd.backward over {contest.spec.fused_name}'s parameters, once per round"
        summary["arrival"] = {"what": what, **_summary(arrivals, None)}
    return summary


def _entry(op: str, key: str, times: dict[str, list[float | None]], moved: int, spec: OptimizerSpec) -> dict[str, Any]:
    """One competitor's row of one op: its times and summary, and (except the fused optimizer's) its ratios."""
    mine = times[key]
    entry = {"label": label(op, key, spec), "rounds": sum(t is not None for t in mine), **_summary(mine, moved)}
    if key != spec.reference:
        ours_per_round = times[spec.reference]
        ratios = [theirs / ours if theirs is not None and ours else None for theirs, ours in zip(mine, ours_per_round)]
        entry["vs_fused"] = {"per_round": ratios, "median": median(ratios)}
    return entry


def _fused_kernels(optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """What did the fused optimizer's work for this (device, dtype): the step's launcher and clipping's kernels."""
    launchers = optimizer.launchers()  # type: ignore[attr-defined]
    step = launchers.get((device, dtype))
    if step is None:  # no bucket of this (device, dtype): the launcher its registry would pick
        step = registry.kernels.entry(type(optimizer).kernel, device, dtype).launcher.__name__  # type: ignore[attr-defined]
    return {
        "step": step,
        "clip": "C kernels (fused_core.grad_norm)" if grad_norm.serves(device, dtype) else "torch ops",
    }


def _summary(times: list[float | None], moved: int | None) -> dict[str, Any]:
    """Median and best over rounds and, for an op that moves ``moved`` bytes, the bandwidth the
    median achieves (None when it moves none: zero_grad(set_to_none=True))."""
    middle = median(times)
    summary: dict[str, Any] = {
        "times_s": times,
        "median_s": middle,
        "min_s": min((t for t in times if t is not None), default=None),
    }
    if moved is not None:
        summary["gbps"] = moved / middle / 1e9 if moved and middle else None
    return summary


def _against_limit(result: dict[str, Any]) -> None:
    """Each median against the run's bandwidth limit: its share of it, and its time over the floor
    (floor = bytes / limit; both None for an op that moves no bytes)."""
    limit = result["bandwidth_limit"]["gbps"]
    for run in result["runs"]:
        for mode in run["modes"].values():
            for op in mode["ops"].values():
                floor = op["bytes"] / (limit * 1e9)
                op["floor_s"] = floor or None
                for entry in op["competitors"].values():
                    gbps, middle = entry["gbps"], entry["median_s"]
                    entry["percent_of_limit"] = 100 * gbps / limit if gbps is not None else None
                    entry["x_of_floor"] = middle / floor if middle is not None and floor else None
