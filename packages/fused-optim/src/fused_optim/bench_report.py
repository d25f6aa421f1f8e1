"""``fused-optim bench``'s tables: markdown, so a run pastes straight into docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

from .bench_measure import ACCESSES, OPS, REFERENCE

OP_TITLES = {
    "step": "step()",
    "zero_grad": "zero_grad() (set_to_none=False)",
    "clip": "gradient clipping (max_norm={max_norm})",
}


def duration(seconds: float | None) -> str:
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


def markdown(result: dict[str, Any]) -> str:
    machine, settings, limit = result["machine"], result["settings"], result["bandwidth_limit"]
    probes = limit["probes"]
    bests = [probe["gbps"] for probe in probes]
    hp = ", ".join(f"{key}={value}" for key, value in settings["hyperparameters"].items())
    lines = [
        f"fused-optim bench: {machine['device']} ({machine['device_name']}, {machine['cpus']} CPUs, "
        f"{machine['torch_threads']} torch threads), torch {machine['torch']}, {settings['rounds']} rounds, "
        f"SGD {hp}",
        f"bandwidth limit: {limit['gbps']:.1f} GB/s, the best of {len(probes)} probes of {limit['op']} over "
        f"2 x {limit['mib_per_buffer']} MiB {limit['dtype']} ({len(probes[0]['times_s'])} repetitions each, "
        f"one at the start and one after each set; the probes' best ranged {min(bests):.1f}-{max(bests):.1f} GB/s)",
    ]
    if machine.get("others_cpu_percent") is not None:
        load = machine.get("loadavg_start")
        lines.append(
            f"other processes took {machine['others_cpu_percent']:.0f}% of the machine's CPU time during the run"
            + (f" (load average {load[0]} at the start)" if load else "")
        )
    lines.append("")
    rows = []
    for run in result["runs"]:
        fused = run["competitors"][REFERENCE]
        check = run["staleness_check"]
        rows.append(
            [
                run["set"],
                run["dtype"],
                f"{run['tensors']:,}",
                f"{run['numel']:,}",
                f"`{run['fused_kernels']['step']}`",
                duration(fused["first_step_s"]),
                duration(fused["second_step_s"]),
                duration(run["ops"]["step"]["competitors"][REFERENCE]["median_s"]),
                duration(check["median_s"]),
                _number(check["percent_of_step"], ".3f", "%"),
            ]
        )
    header = ["set", "dtype", "tensors", "elements", "step kernel", "first step (build)", "second step"]
    lines += _table(header + ["step (median)", "staleness check", "% of step"], rows)
    clip = sorted({f"{run['dtype']}: {run['fused_kernels']['clip']}" for run in result["runs"]})
    lines.append(
        "\nFusedSGD: the launcher of its step, first and second step (warm-up, not in the medians), and the "
        f"staleness check alone. Clipping runs on {'; '.join(clip)}."
    )

    for op in OPS:
        title = OP_TITLES[op].format(max_norm=settings["max_norm"])
        lines += ["", f"{title}: {ACCESSES[op]} x elements x itemsize bytes", ""]
        rows = []
        for run in result["runs"]:
            competitors = run["ops"][op]["competitors"]
            for key, entry in competitors.items():
                name = entry["label"]
                if entry["rounds"] < settings["rounds"]:
                    name += f" ({entry['rounds']} rounds)"
                ratio = entry["vs_fused"]["median"] if key != REFERENCE else 1.0
                rows.append(
                    [
                        run["set"],
                        run["dtype"],
                        name,
                        duration(entry["median_s"]),
                        _number(ratio, ".2f", "x"),
                        _number(entry["gbps"], ".1f"),
                        _number(entry["percent_of_limit"], ".0f", "%"),
                        _number(entry["x_of_floor"], ".1f", "x"),
                    ]
                )
        header = ["set", "dtype", "competitor", "median", "vs FusedSGD", "GB/s", "% of limit", "of floor"]
        lines += _table(header, rows)
    lines += [
        "",
        "vs FusedSGD: competitor time / FusedSGD time in the same round, median over rounds (> 1: FusedSGD faster).",
        "% of limit: achieved bandwidth / the limit above; of floor: median time / (bytes / limit).",
    ]
    for run in result["runs"]:
        where = f"{run['set']} {run['dtype']}"
        for key, reason in run["unavailable"].items():
            lines.append(f"note: {where}: {key} unavailable ({reason})")
        for phase, count in run["stale_fused_steps"].items():
            if count:
                steps = "step" if count == 1 else "steps"
                lines.append(
                    f"note: {where}: {count} FusedSGD {steps} in the {phase} found a stale layout (re-adopted)"
                )
    return "\n".join(lines)
