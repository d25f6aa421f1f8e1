"""What ``fused-optim train`` reports: the summary table, the JSON record and the plot."""

from __future__ import annotations

import json
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunReport", "TrainReport", "check_plotting", "format_summary", "write_json", "write_plot"]

DIVERGED = 1e-5
"""Relative parameter difference above which two fp32 runs no longer agree to rounding. In bf16 the two
optimizers round differently by design (FusedSGD computes the update in fp32 and rounds once), so no
threshold applies there."""

MAX_EPOCH_ROWS = 10


@dataclass
class RunReport:
    """One optimizer's run."""

    name: str
    test_accuracy: float
    train_loss: float
    losses: list[float]
    step_seconds: list[float]

    @property
    def step_median(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def step_mean(self) -> float:
        return statistics.fmean(self.step_seconds)

    def as_json(self) -> dict[str, Any]:
        return {
            "optimizer": self.name,
            "test_accuracy": self.test_accuracy,
            "train_loss": self.train_loss,
            "step_seconds_median": self.step_median,
            "step_seconds_mean": self.step_mean,
            "step_seconds_first": self.step_seconds[0],
            "losses": self.losses,
            "step_seconds": self.step_seconds,
        }


@dataclass
class TrainReport:
    """Both runs and how they compare; ``torch`` is the reference."""

    config: dict[str, Any]
    data: dict[str, int]
    model: dict[str, Any]
    steps_per_epoch: int
    torch: RunReport
    fused: RunReport
    max_abs_diff: float
    max_rel_diff: float
    rel_diff_per_step: list[float] = field(default_factory=list)

    @property
    def speedup_median(self) -> float:
        return self.torch.step_median / self.fused.step_median

    @property
    def speedup_mean(self) -> float:
        return self.torch.step_mean / self.fused.step_mean

    @property
    def agreeing_steps(self) -> int | None:
        """fp32: steps before the relative parameter difference first exceeded :data:`DIVERGED`."""
        if self.config["dtype"] != "fp32":
            return None
        steps = enumerate(self.rel_diff_per_step)
        return next((i for i, diff in steps if diff > DIVERGED), len(self.rel_diff_per_step))

    def epoch_losses(self, run: RunReport) -> list[float]:
        """Mean training loss of each epoch."""
        n = self.steps_per_epoch
        return [statistics.fmean(run.losses[i : i + n]) for i in range(0, len(run.losses), n)]

    def as_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "data": self.data,
            "model": self.model,
            "steps": len(self.torch.losses),
            "steps_per_epoch": self.steps_per_epoch,
            "runs": {"torch": self.torch.as_json(), "fused": self.fused.as_json()},
            "comparison": {
                "max_abs_param_diff": self.max_abs_diff,
                "max_rel_param_diff": self.max_rel_diff,
                "steps_agreeing_to_rounding": self.agreeing_steps,
                "rel_param_diff_per_step": self.rel_diff_per_step,
                "step_speedup_median": self.speedup_median,
                "step_speedup_mean": self.speedup_mean,
            },
        }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others; an empty row is a blank line."""
    widths = [max(len(row[i]) for row in rows if row) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _epoch_rows(report: TrainReport) -> list[list[str]]:
    """The mean loss of at most :data:`MAX_EPOCH_ROWS` epochs, evenly spaced, first and last included."""
    torch_losses, fused_losses = report.epoch_losses(report.torch), report.epoch_losses(report.fused)
    epochs = len(torch_losses)
    stride = -(-epochs // MAX_EPOCH_ROWS)
    shown = sorted({*range(0, epochs, stride), epochs - 1})
    return [[f"  epoch {i + 1}", f"{torch_losses[i]:.4f}", f"{fused_losses[i]:.4f}"] for i in shown]


def format_summary(report: TrainReport) -> str:
    """The table printed at the end of ``fused-optim train``."""
    c, d, m = report.config, report.data, report.model
    t, f = report.torch, report.fused
    steps = len(t.losses)
    threads = f"{c['threads']} CPU thread" + ("" if c["threads"] == 1 else "s")
    header = [
        f"data:      scikit-learn digits, {d['train']} train / {d['test']} test images ({d['features']} pixels),"
        f" {d['classes']} classes",
        f"model:     MLP {d['features']} -> {c['depth']} x {c['width']} -> {d['classes']}, {m['tensors']} tensors,"
        f" {m['parameters']:,} parameters, {c['dtype']} on {c['device']} ({threads})",
        f"training:  lr={c['lr']} momentum={c['momentum']} weight_decay={c['weight_decay']} nesterov={c['nesterov']},",
        f"           {c['epochs']} epochs x {report.steps_per_epoch} batches of <= {c['batch_size']}"
        f" = {steps} steps, seed {c['seed']}",
    ]
    table = _table(
        [
            ["", t.name, f.name],
            ["test accuracy", f"{t.test_accuracy:.2%}", f"{f.test_accuracy:.2%}"],
            ["train loss (end)", f"{t.train_loss:.4f}", f"{f.train_loss:.4f}"],
            ["optimizer.step() median", _ms(t.step_median), _ms(f.step_median)],
            ["optimizer.step() mean", _ms(t.step_mean), _ms(f.step_mean)],
            ["  first step (in the mean)", _ms(t.step_seconds[0]), _ms(f.step_seconds[0])],
            [],
            ["mean training loss", "", ""],
            *_epoch_rows(report),
        ]
    )
    comparison = [
        f"step speed-up of {f.name}: {report.speedup_median:.2f}x (median), {report.speedup_mean:.2f}x (mean)",
        f"largest parameter difference after {steps} steps: {report.max_abs_diff:.2e} absolute,"
        f" {report.max_rel_diff:.2e} relative",
        "  (relative: max |fused - torch| / max |torch| of the worst tensor)",
    ]
    agreeing = report.agreeing_steps
    note = ""
    if agreeing is None:
        note = (
            f"in {c['dtype']}, FusedSGD computes each update in fp32 and rounds once, while torch.optim.SGD rounds"
            f" every operation to {c['dtype']}: the runs differ from the first step on"
        )
    elif report.max_abs_diff == 0.0:
        note = f"bit for bit the same as {t.name}: FusedSGD performs its operations, in its order"
    elif agreeing < steps:
        note = (
            f"the runs agreed to float32 rounding (relative difference <= {DIVERGED:.0e}) for {agreeing} steps;"
            " FusedSGD performs torch.optim.SGD(foreach=False)'s operations in its order (bit for bit on the"
            " CPU in fp32), other kernels round differently, and training amplifies rounding differences"
        )
    comparison += textwrap.wrap(note, width=100, initial_indent="  ", subsequent_indent="  ")
    return "\n".join([*header, "", *table, "", *comparison])


def write_json(report: TrainReport, path: Path) -> None:
    path.write_text(json.dumps(report.as_json(), indent=2) + "\n")


def check_plotting() -> None:
    """Raise ``ImportError`` with the fix if matplotlib is missing (checked before training, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib, which is not installed: pip install 'fused-optim[plot]'") from None


def _quartiles_ms(run: RunReport) -> tuple[float, float]:
    """First and third quartile of the step times, in milliseconds."""
    if len(run.step_seconds) < 2:
        return run.step_median * 1e3, run.step_median * 1e3
    q1, _, q3 = statistics.quantiles(run.step_seconds, n=4)
    return q1 * 1e3, q3 * 1e3


def write_plot(report: TrainReport, path: Path) -> None:
    """Loss curves (overlaid), the parameter difference per step, and step-time bars, in one PNG (or any format
    matplotlib knows from the suffix)."""
    check_plotting()
    from matplotlib.figure import Figure

    t, f = report.torch, report.fused
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    losses, diffs, times = figure.subplots(1, 3)

    steps = range(1, len(t.losses) + 1)
    epoch_ends = [min((i + 1) * report.steps_per_epoch, len(t.losses)) for i in range(len(report.epoch_losses(t)))]
    for run, color, style in ((t, "tab:blue", "-"), (f, "tab:orange", "--")):
        losses.plot(steps, run.losses, color=color, linewidth=0.6, alpha=0.3)
        losses.plot(epoch_ends, report.epoch_losses(run), color=color, linestyle=style, marker=".", label=run.name)
    every_loss = [*t.losses, *f.losses]
    wide = min(every_loss) > 0 and max(every_loss) / min(every_loss) > 10
    losses.set(
        title="training loss (per step; per epoch mean)",
        xlabel="step",
        ylabel="cross-entropy",
        yscale="log" if wide else "linear",
    )
    losses.legend()

    diffs.plot(steps, [max(d, 1e-12) for d in report.rel_diff_per_step], color="tab:red")
    if report.agreeing_steps is not None:
        diffs.axhline(DIVERGED, color="grey", linestyle=":", label=f"{DIVERGED:.0e}")
        diffs.legend()
    diffs.set(title="largest relative parameter difference", xlabel="step", ylabel="0 drawn at 1e-12", yscale="log")

    medians = [t.step_median * 1e3, f.step_median * 1e3]
    quartiles = [_quartiles_ms(run) for run in (t, f)]
    spread = [[m - q[0] for m, q in zip(medians, quartiles)], [q[1] - m for m, q in zip(medians, quartiles)]]
    bars = times.bar([t.name, f.name], medians, yerr=spread, capsize=6, color=["tab:blue", "tab:orange"])
    times.bar_label(bars, fmt="%.3f ms", padding=3)
    times.margins(y=0.15)
    times.set(
        title=f"optimizer.step(): {report.speedup_median:.2f}x faster (median, IQR bars)",
        ylabel="ms per step",
    )
    figure.savefig(path, dpi=110)
