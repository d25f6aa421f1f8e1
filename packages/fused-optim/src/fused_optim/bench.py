"""Time step(), zero_grad() and gradient clipping of FusedSGD against torch.optim.SGD's for-loop,
foreach and fused implementations, side by side in one process, on the parameter shapes of real
architectures (fused_testing.shapes.SHAPE_SETS).

Rounds are interleaved: each round runs every competitor once per op, in an order rotated by one
each round; medians are over rounds and ratios (competitor / FusedSGD) are computed per round, then
medianed. Bandwidth is compared with the limit measured in the same run: a.add_(b) over fp32 buffers
larger than the last-level cache, probed at the start and after each (set, dtype), best repetition.

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

from . import bench_report
from .bench_measure import (
    ACCESSES,
    COMPETITORS,
    DTYPES,
    HYPERPARAMETERS,
    OP_COMPETITORS,
    OPS,
    REFERENCE,
    Contest,
    bandwidth_limit,
    bandwidth_probe,
    label,
    median,
)

NAME = "bench"
HELP = "time FusedSGD's step, zero_grad and clipping against torch.optim.SGD (for-loop, foreach, fused)"

QUICK_SETS = ("resnet50", "20k-small")
DEFAULT_ROUNDS, QUICK_ROUNDS = 10, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = list(SHAPE_SETS)
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
    parser.add_argument("--device", choices=["cpu", "cuda", "npu"], default="cpu", help="device (default: cpu)")
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


def _device(name: str) -> torch.device:
    """The device, or a ValueError that says what is missing."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
    if name == "npu":
        try:
            import torch_npu  # type: ignore[import-not-found]  # noqa: F401  (registers the npu device)
        except ImportError:
            raise ValueError("--device npu needs torch_npu (Ascend's PyTorch adapter); it is not installed") from None
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise ValueError("--device npu: torch.npu.is_available() is False on this machine")
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return str(torch.npu.get_device_name())  # type: ignore[attr-defined]
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        "device_name": _device_name(device),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": load,
    }


def run(args: argparse.Namespace) -> int:
    if args.distributed:
        return _run_distributed(args)
    try:
        device = _device(args.device)
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
        "schema": 1,
        "machine": _machine(device, load),
        "settings": {
            "sets": sets,
            "dtypes": dtypes,
            "rounds": rounds,
            "quick": args.quick,
            "hyperparameters": HYPERPARAMETERS,
            "max_norm": args.max_norm,
            "seed": args.seed,
            "max_op_seconds": args.max_op_seconds,
            "slow_rounds": args.slow_rounds,
            "accesses_per_element": ACCESSES,
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
                result["runs"].append(_bench_one(name, shapes, dtype, device, rounds, args, bar))
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
    from . import bench_distributed

    sets = list(dict.fromkeys(args.sets or (list(QUICK_SETS) if args.quick else list(SHAPE_SETS))))
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    threads = args.threads or 1
    load = _loadavg()
    shapes = {name: list(SHAPE_SETS[name]()) for name in sets}  # resolved here: spawned ranks see only these
    print(f"fused-optim bench: {args.distributed} ranks, {rounds} rounds, {', '.join(sets)}", file=sys.stderr)
    measured = bench_distributed.run(shapes, args.distributed, rounds, threads=threads)
    result: dict[str, Any] = {
        "schema": 1,
        "kind": "distributed",
        "machine": {**_machine(torch.device("cpu"), load), "torch_threads": threads, "loadavg_end": _loadavg()},
        "settings": {
            "ranks": args.distributed,
            "sets": sets,
            "dtype": "fp32",
            "rounds": rounds,
            "steps_per_round": bench_distributed.STEPS,
            "quick": args.quick,
            "backend": "gloo",
            "hyperparameters": bench_distributed.HYPERPARAMETERS,
        },
        "scenarios": list(bench_distributed.SCENARIOS),
        "results": measured,
    }
    _report(bench_distributed.table(measured, args.distributed), result, args.json)
    return 0


def _bench_one(
    name: str,
    shapes: Sequence[torch.Size],
    dtype: str,
    device: torch.device,
    rounds: int,
    args: argparse.Namespace,
    bar: tqdm,
) -> dict[str, Any]:
    """Every measurement of one (set, dtype); the competitors are freed on return."""
    contest = Contest(shapes, DTYPES[dtype], device, seed=args.seed, max_norm=args.max_norm)
    contest.warm_up()
    bar.update()

    def rounds_for(op: str, key: str) -> int:
        slow = contest.competitors[key].warmup_s(op) > args.max_op_seconds
        return min(rounds, args.slow_rounds) if slow else rounds

    per_round = []
    for index in range(rounds):
        bar.set_postfix_str(f"round {index + 1}/{rounds}")
        per_round.append(contest.run_round(index, rounds_for))
        bar.update()
    bar.set_postfix_str("")

    ops: dict[str, Any] = {}
    for op in OPS:
        moved = ACCESSES[op] * contest.numel * contest.itemsize
        keys = [key for key in OP_COMPETITORS[op] if key in contest.competitors]
        times = {key: [round_times[op].get(key) for round_times in per_round] for key in keys}
        competitors = {}
        for key in keys:
            entry = _summary(times[key], moved)
            entry = {"label": label(op, key), "rounds": sum(t is not None for t in times[key]), **entry}
            if key != REFERENCE:
                ratios = [
                    theirs / ours if theirs is not None and ours is not None else None
                    for theirs, ours in zip(times[key], times[REFERENCE])
                ]
                entry["vs_fused"] = {"per_round": ratios, "median": median(ratios)}
            competitors[key] = entry
        ops[op] = {"bytes": moved, "competitors": competitors}

    fused_step = ops["step"]["competitors"][REFERENCE]["median_s"]
    staleness = contest.staleness_check(calls=200 if args.quick else 2000, repeats=3 if args.quick else 7)
    staleness["percent_of_step"] = 100 * staleness["median_s"] / fused_step if fused_step else None
    return {
        "set": name,
        "dtype": dtype,
        "fused_kernels": _fused_kernels(device, DTYPES[dtype]),
        "tensors": contest.tensors,
        "numel": contest.numel,
        "itemsize": contest.itemsize,
        "competitors": {
            key: {
                "label": COMPETITORS[key],
                "first_step_s": competitor.warmup_s("step", 0),
                "second_step_s": competitor.warmup_s("step", 1),
                "warmup": [{"op": op, "seconds": seconds} for op, seconds in competitor.warmup],
                "steps": competitor.steps,
                "max_abs_diff_vs_forloop": contest.max_abs_diff(key),
            }
            for key, competitor in contest.competitors.items()
        },
        "unavailable": contest.unavailable,
        "stale_fused_steps": contest.stale_steps,
        "staleness_check": staleness,
        "ops": ops,
    }


def _fused_kernels(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """What does FusedSGD's work for this (device, dtype): the step's launcher and clipping's kernels."""
    return {
        "step": registry.kernels.entry("sgd", device, dtype).launcher.__name__,
        "clip": "C kernels (fused_core.grad_norm)" if grad_norm.serves(device, dtype) else "torch ops",
    }


def _summary(times: list[float | None], moved: int) -> dict[str, Any]:
    """Median and best over rounds, and the bandwidth the median achieves."""
    middle = median(times)
    return {
        "times_s": times,
        "median_s": middle,
        "min_s": min((t for t in times if t is not None), default=None),
        "gbps": moved / middle / 1e9 if middle else None,
    }


def _against_limit(result: dict[str, Any]) -> None:
    """Each median against the run's bandwidth limit: its share of it, and its time over the floor
    (floor = bytes / limit)."""
    limit = result["bandwidth_limit"]["gbps"]
    for run in result["runs"]:
        for op in run["ops"].values():
            floor = op["bytes"] / (limit * 1e9)
            for entry in op["competitors"].values():
                gbps, middle = entry["gbps"], entry["median_s"]
                entry["percent_of_limit"] = 100 * gbps / limit if gbps is not None else None
                entry["x_of_floor"] = middle / floor if middle is not None and floor else None
