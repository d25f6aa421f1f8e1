"""``fused-optim bench``'s tables: markdown, so a run pastes straight into docs/benchmarks.md."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

OP_TITLES = {
    "step": "step()",
    "zero_grad": "zero_grad()",
    "cycle": "cycle: zero_grad() + step()",
    "clip": "gradient clipping (max_norm={max_norm})",
}
PHASES = {"warmup": "warm-up", "settling": "settling cycles (after a mode switch)", "rounds": "rounds"}
MODE_TITLES = {
    "fresh": "fresh gradients: zero_grad(set_to_none=True), then new tensors from torch.autograd.backward",
    "bound": "bound gradients: zero_grad(set_to_none=False), then copied in place",
}


def duration(seconds: float | None) -> str:
    """Seconds in the largest unit that keeps the value at least 1: s, ms or µs."""
    if seconds is None:
        return "-"
    unit, scale = next(((unit, scale) for unit, scale in (("s", 1.0), ("ms", 1e-3)) if seconds >= scale), ("µs", 1e-6))
    value = seconds / scale
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _reference(result: dict[str, Any]) -> str:
    """The fused competitor's key (``fused_sgd`` in a run from before ``--optimizer``)."""
    return str(result["settings"].get("reference", "fused_sgd"))


def _fused(result: dict[str, Any]) -> str:
    """The fused optimizer's class name: FusedSGD, FusedAdamW."""
    return str(result["settings"].get("fused_optimizer", "FusedSGD"))


def _accesses(result: dict[str, Any]) -> dict[str, dict[str, int]]:
    accesses: dict[str, dict[str, int]] = result["settings"]["accesses_per_element"]
    return accesses


def _modes(run: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(mode, its measurements) of one run, in the order the run was asked for."""
    yield from run["modes"].items()


def _ratio(entry: dict[str, Any] | None, key: str, reference: str) -> float | None:
    """An entry's median ratio against the fused optimizer (1.0 for the fused optimizer itself)."""
    if entry is None:
        return None
    return 1.0 if key == reference else entry["vs_fused"]["median"]


def _header(result: dict[str, Any]) -> list[str]:
    machine, settings, limit = result["machine"], result["settings"], result["bandwidth_limit"]
    probes = limit["probes"]
    bests = [probe["gbps"] for probe in probes]
    hp = ", ".join(f"{key}={value}" for key, value in settings["hyperparameters"].items())
    optimizer = str(settings.get("torch_optimizer", "torch.optim.SGD")).rsplit(".", 1)[-1]
    lines = [
        f"fused-optim bench: {machine['device']} ({machine['device_name']}, {machine['cpus']} CPUs, "
        f"{machine['torch_threads']} torch threads), torch {machine['torch']}, {settings['rounds']} rounds, "
        f"{optimizer} {hp}",
        f"bandwidth limit: {limit['gbps']:.1f} GB/s, the best of {len(probes)} probes of {limit['op']} over "
        f"2 x {limit['mib_per_buffer']} MiB {limit['dtype']} ({len(probes[0]['times_s'])} repetitions each, "
        f"one at the start and one after each set; the probes' best ranged {min(bests):.1f}-{max(bests):.1f} GB/s)",
        "gradients: " + "; ".join(f"{MODE_TITLES[mode]}" for mode in settings["grads"]),
    ]
    if machine.get("others_cpu_percent") is not None:
        load = machine.get("loadavg_start")
        lines.append(
            f"other processes took {machine['others_cpu_percent']:.0f}% of the machine's CPU time during the run"
            + (f" (load average {load[0]} at the start)" if load else "")
        )
    return lines


def _fused_table(result: dict[str, Any]) -> list[str]:
    """Per (set, dtype): the fused optimizer's step kernel, its warm-up steps and its staleness check."""
    modes = result["settings"]["grads"]
    rows = []
    for run in result["runs"]:
        fused = run["competitors"][_reference(result)]
        check = run["staleness_check"]
        shares = [_number(check["percent_of_step"].get(mode), ".3f", "%") for mode in modes]
        rows.append(
            [
                run["set"],
                run["dtype"],
                f"{run['tensors']:,}",
                f"{run['numel']:,}",
                f"`{run['fused_kernels']['step']}`",
                duration(fused["first_step_s"]),
                duration(fused["second_step_s"]),
                duration(check["median_s"]),
                " / ".join(shares),
            ]
        )
    header = ["set", "dtype", "tensors", "elements", "step kernel", "first step (build)", "second step"]
    lines = _table(header + ["staleness check", f"% of step ({' / '.join(modes)})"], rows)
    clip = sorted({f"{run['dtype']}: {run['fused_kernels']['clip']}" for run in result["runs"]})
    return lines + [
        f"\n{_fused(result)}: the launcher of its step, first and second step (warm-up, not in the medians), and the "
        f"staleness check alone, as a share of the step in each mode. Clipping runs on {'; '.join(clip)}."
    ]


RIVALS = ("torch_fused", "torch_foreach", "torch_forloop")
"""The competitor the cycle summary compares with: the first of these the run has whose results
are right (torch's fused implementation where the compared class has one and it does the work,
else its foreach one)."""
WRONG = "wrong results"


def _wrong(run: dict[str, Any]) -> set[str]:
    """The competitors whose results the run's check found wrong (:mod:`fused_optim.bench_check`)."""
    check = run.get("result_check") or {"competitors": {}}
    return {key for key, entry in check["competitors"].items() if entry["wrong"]}


def _cycle_summary(result: dict[str, Any]) -> list[str]:
    """Per (set, dtype, mode): the fused optimizer's cycle, the gradient arrival, the floor, and the
    ratio of the best implementation of the compared class (:data:`RIVALS`)."""
    reference, name = _reference(result), _fused(result)
    rows, rival_labels = [], []
    for run in result["runs"]:
        for mode, measured in _modes(run):
            ops = measured["ops"]
            fused = {op: ops[op]["competitors"][reference] for op in ("zero_grad", "step", "cycle")}
            arrival = measured.get("arrival")
            wrong = _wrong(run)
            rival = next((key for key in RIVALS if key in ops["cycle"]["competitors"] and key not in wrong), None)
            torch_fused = _ratio(ops["cycle"]["competitors"].get(rival), rival, reference) if rival else None
            if rival:
                rival_labels.append(ops["cycle"]["competitors"][rival]["label"])
            rows.append(
                [
                    run["set"],
                    run["dtype"],
                    mode,
                    duration(fused["zero_grad"]["median_s"]),
                    duration(fused["step"]["median_s"]),
                    duration(fused["cycle"]["median_s"]),
                    duration(arrival["median_s"]) if arrival else "in place",
                    _number(fused["step"]["x_of_floor"], ".1f", "x"),
                    _number(fused["cycle"]["x_of_floor"], ".1f", "x"),
                    _number(torch_fused, ".2f", "x"),
                ]
            )
    header = ["set", "dtype", "grads", "zero_grad", "step", "cycle", "gradient arrival"]
    lines = ["", f"{name} per training-loop cycle", ""]
    rival_label = " or ".join(dict.fromkeys(rival_labels)) or "torch fused"
    lines += _table(header + ["step of floor", "cycle of floor", f"{rival_label} / {name} (cycle)"], rows)
    accesses = _accesses(result)
    floors = "; ".join(f"{mode}: step {ops['step']}, cycle {ops['cycle']}" for mode, ops in accesses.items())
    return lines + [
        "",
        "cycle: zero_grad + step of the same round, median over rounds. gradient arrival: the autograd "
        "hand-over (torch.autograd.backward) alone (fresh mode, outside the cycle's time; add it for the "
        "whole cycle). of floor: median time / "
        f"(bytes / limit), bytes = accesses x elements x itemsize ({floors}).",
    ]


def _competitor_name(entry: dict[str, Any], rounds: int, wrong: bool = False) -> str:
    name = entry["label"] + (f" ({WRONG})" if wrong else "")
    return name + f" ({entry['rounds']} rounds)" if entry["rounds"] < rounds else name


def _cycle_table(result: dict[str, Any]) -> list[str]:
    """Per (set, dtype, mode, competitor): zero_grad, step and cycle, their ratios, the floor."""
    rounds = result["settings"]["rounds"]
    reference, name = _reference(result), _fused(result)
    rows = []
    for run in result["runs"]:
        wrong = _wrong(run)
        for mode, measured in _modes(run):
            ops = measured["ops"]
            for key, step in ops["step"]["competitors"].items():
                entries = {op: ops[op]["competitors"][key] for op in ("zero_grad", "step", "cycle")}
                rows.append(
                    [run["set"], run["dtype"], mode, _competitor_name(step, rounds, key in wrong)]
                    + [duration(entries[op]["median_s"]) for op in entries]
                    + [_number(_ratio(entries[op], key, reference), ".2f", "x") for op in entries]
                    + [_number(entries[op]["x_of_floor"], ".1f", "x") for op in ("step", "cycle")]
                )
    header = ["set", "dtype", "grads", "competitor", "zero_grad", "step", "cycle"]
    header += [f"{op} vs {name}" for op in ("zero_grad", "step", "cycle")] + ["step of floor", "cycle of floor"]
    return ["", "step() and zero_grad(), one cycle each, every competitor", ""] + _table(header, rows)


def _clip_table(result: dict[str, Any]) -> list[str]:
    """Per (set, dtype, competitor): clipping with bound gradients."""
    settings = result["settings"]
    reference = _reference(result)
    rows = []
    for run in result["runs"]:
        clip = run["modes"].get("bound", {}).get("ops", {}).get("clip")
        for key, entry in (clip or {"competitors": {}})["competitors"].items():
            rows.append(
                [
                    run["set"],
                    run["dtype"],
                    _competitor_name(entry, settings["rounds"]),
                    duration(entry["median_s"]),
                    _number(_ratio(entry, key, reference), ".2f", "x"),
                    _number(entry["gbps"], ".1f"),
                    _number(entry["percent_of_limit"], ".0f", "%"),
                    _number(entry["x_of_floor"], ".1f", "x"),
                ]
            )
    if not rows:
        return ["", "gradient clipping: not timed (it is timed with bound gradients: --grads bound or both)"]
    title = OP_TITLES["clip"].format(max_norm=settings["max_norm"])
    lines = ["", f"{title}, bound gradients: {_accesses(result)['bound']['clip']} x elements x itemsize bytes", ""]
    header = ["set", "dtype", "competitor", "median", f"vs {_fused(result)}", "GB/s", "% of limit", "of floor"]
    return lines + _table(header, rows)


def _notes(result: dict[str, Any]) -> list[str]:
    """Unavailable competitors, and bound-mode steps of the fused optimizer that found a stale layout."""
    lines = []
    for run in result["runs"]:
        where = f"{run['set']} {run['dtype']}"
        for key, reason in run["unavailable"].items():
            lines.append(f"note: {where}: {key} unavailable ({reason})")
        check = run.get("result_check")
        for key in sorted(_wrong(run)):
            entry, baseline = check["competitors"][key], check["baseline_mean_abs_error"]
            error = entry["mean_abs_error"]
            whose = "the for-loop's" if check["baseline"] == "torch_forloop" else "the smallest finite one"
            against = (
                f"{error / baseline:.0f}x {whose} ({baseline:.3g})"
                if math.isfinite(error) and baseline
                else f"not finite ({whose}: {baseline:.3g})"
            )
            lines.append(
                f"note: {where}: {key} gives {WRONG}: after {check['steps']} steps over {check['numel']:,} "
                f"elements its mean error against float64 is {error:.3g}: {against}; it moved "
                f"{100 * entry['moved_fraction']:.0f}% of the elements; its times are not those of the work, and "
                f"the cycle summary compares with {_fused(result)}'s next rival"
            )
        stale = run["modes"].get("bound", {}).get("stale_fused_steps", {})
        for phase, count in stale.items():
            if count:
                steps = "step" if count == 1 else "steps"
                lines.append(
                    f"note: {where}: {count} {_fused(result)} {steps} with bound gradients in the {PHASES[phase]} "
                    "found a stale layout (re-adopted)"
                )
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The whole report: header, the fused optimizer's overview, the cycles of every competitor, clipping."""
    lines = _header(result) + [""] + _fused_table(result) + _cycle_summary(result)
    lines += _cycle_table(result) + _clip_table(result)
    name = _fused(result)
    lines += [
        "",
        f"vs {name}: competitor time / {name} time in the same round, median over rounds (> 1: {name} faster).",
        "% of limit: achieved bandwidth / the limit above; of floor: median time / (bytes / limit).",
    ]
    return "\n".join(lines + _notes(result))
