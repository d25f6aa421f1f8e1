"""What ``fused-optim train`` reports: the summary table, the JSON record and the plot."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .optimizers import DEFAULT, SPECS
from .plotting import require_matplotlib

__all__ = [
    "EpochReport",
    "RunReport",
    "TrainReport",
    "format_epoch",
    "format_epoch_header",
    "format_header",
    "format_summary",
    "write_json",
    "write_plot",
]

ROUNDING = 1e-5
"""Relative parameter difference above which two fp32 runs no longer agree to rounding. In bf16 the two
optimizers round differently by design (the fused optimizer computes the update in fp32 and rounds once), so no
threshold applies there."""
FUSED_DEFAULT = SPECS[DEFAULT].fused_name
"""The fused optimizer's name where none is given: FusedSGD."""
REFERENCE_SHORT = "torch"
"""The reference's name in the per-epoch table."""


@dataclass
class EpochReport:
    """Both models after one epoch: loss over the whole training set, test accuracy, parameter difference."""

    epoch: int
    train_loss: tuple[float, float]
    test_accuracy: tuple[float, float]
    rel_diff: float

    def as_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "train_loss": {"torch": self.train_loss[0], "fused": self.train_loss[1]},
            "test_accuracy": {"torch": self.test_accuracy[0], "fused": self.test_accuracy[1]},
            "max_rel_param_diff": self.rel_diff,
        }


@dataclass
class RunReport:
    """One optimizer's run."""

    name: str
    test_accuracy: float
    train_loss: float
    losses: list[float]
    step_seconds: list[float]
    initial_loss: float = math.nan
    """Cross-entropy over the whole training set before the first step."""

    @property
    def step_median(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def step_mean(self) -> float:
        return statistics.fmean(self.step_seconds)

    @property
    def divergence(self) -> str | None:
        """Why this run diverged (a loss that is not finite, or a final loss above the start), or None."""
        bad = next((i for i, loss in enumerate(self.losses) if not math.isfinite(loss)), None)
        if bad is not None:
            return f"its loss became {self.losses[bad]} at step {bad + 1}"
        if not math.isfinite(self.train_loss):
            return f"its final training loss is {self.train_loss}"
        if math.isfinite(self.initial_loss) and self.train_loss > self.initial_loss:
            return f"its final training loss {self.train_loss:.4f} is above its start, {self.initial_loss:.4f}"
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "optimizer": self.name,
            "test_accuracy": self.test_accuracy,
            "train_loss": self.train_loss,
            "initial_train_loss": self.initial_loss,
            "diverged": self.divergence,
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
    epochs: list[EpochReport] = field(default_factory=list)

    @property
    def speedup_median(self) -> float:
        return self.torch.step_median / self.fused.step_median

    @property
    def speedup_mean(self) -> float:
        return self.torch.step_mean / self.fused.step_mean

    @property
    def agreeing_steps(self) -> int | None:
        """fp32: steps before the relative parameter difference first exceeded :data:`ROUNDING`."""
        if self.config["dtype"] != "fp32":
            return None
        steps = enumerate(self.rel_diff_per_step)
        return next((i for i, diff in steps if not diff <= ROUNDING), len(self.rel_diff_per_step))

    @property
    def bit_identical(self) -> bool:
        """Every loss and every final parameter the same, bit for bit."""
        return self.max_abs_diff == 0.0 and self.torch.losses == self.fused.losses

    @property
    def diverged(self) -> list[tuple[RunReport, str]]:
        """The runs that diverged, with why."""
        return [(run, why) for run in (self.torch, self.fused) if (why := run.divergence) is not None]

    def epoch_losses(self, run: RunReport) -> list[float]:
        """Mean minibatch loss of each epoch."""
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
            "epochs": [epoch.as_json() for epoch in self.epochs],
            "comparison": {
                "bit_identical": self.bit_identical,
                "max_abs_param_diff": self.max_abs_diff,
                "max_rel_param_diff": self.max_rel_diff,
                "steps_agreeing_to_rounding": self.agreeing_steps,
                "rel_param_diff_per_step": self.rel_diff_per_step,
                "step_speedup_median": self.speedup_median,
                "step_speedup_mean": self.speedup_mean,
            },
            "diverged": bool(self.diverged),
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


def _hyperparameters(config: dict[str, Any]) -> str:
    """``lr=0.05 momentum=0.9 ...``: the optimizer's hyperparameters, in its order."""
    spec = SPECS[config.get("optimizer", DEFAULT)]
    return " ".join(f"{key}={config[key]}" for key in spec.train_defaults)


def format_header(
    config: dict[str, Any],
    data: dict[str, int],
    model: dict[str, Any],
    steps_per_epoch: int,
    reference: str,
    fused: str = FUSED_DEFAULT,
) -> str:
    """What is trained, printed before training starts."""
    c, d, m = config, data, model
    threads = f"{c['threads']} CPU thread" + ("" if c["threads"] == 1 else "s")
    steps = c["epochs"] * steps_per_epoch
    return "\n".join(
        [
            f"data:      handwritten digits (UCI, as in scikit-learn): {d['train']} train / {d['test']} test images"
            f" of {d['features']} pixels, {d['classes']} classes",
            f"model:     MLP {d['features']} -> {c['depth']} x {c['width']} -> {d['classes']}, {m['tensors']} tensors,"
            f" {m['parameters']:,} parameters, {c['dtype']} on {c['device']} ({threads})",
            f"training:  {_hyperparameters(c)},",
            f"           {c['epochs']} epochs x {steps_per_epoch} batches of <= {c['batch_size']} = {steps} steps,"
            f" seed {c['seed']}",
            f"compared:  {fused} against {reference} ({REFERENCE_SHORT!r} below),",
            "           from the same initial weights, on the same minibatches",
        ]
    )


def _epoch_columns(fused: str) -> tuple[str, ...]:
    """The per-epoch table's cell formats: epoch, two losses, two accuracies, the difference; the
    loss and accuracy columns at least 9 wide, or as wide as the fused optimizer's name."""
    width = max(9, len(fused))
    return ("{:>7}", *(f"{{:>{width}}}",) * 4, "{:>11}")


def format_epoch_header(epochs: int, fused: str = FUSED_DEFAULT) -> str:
    """The two header lines of the per-epoch table."""
    columns = _epoch_columns(fused)
    pair = 2 * max(9, len(fused)) + 2
    first = "".ljust(7) + "  " + "train loss".center(pair) + "  " + "test accuracy".center(pair) + "  " + "parameter"
    second = "  ".join(
        fmt.format(cell) for fmt, cell in zip(columns, ("epoch", REFERENCE_SHORT, fused, REFERENCE_SHORT, fused))
    )
    return f"{first.rstrip()}\n{second}  difference"


def format_epoch(epoch: EpochReport, epochs: int, fused: str = FUSED_DEFAULT) -> str:
    """One line of the per-epoch table, printed as the epoch ends."""
    cells = (
        f"{epoch.epoch}/{epochs}",
        f"{epoch.train_loss[0]:.4f}",
        f"{epoch.train_loss[1]:.4f}",
        f"{epoch.test_accuracy[0]:.2%}",
        f"{epoch.test_accuracy[1]:.2%}",
        f"{epoch.rel_diff:.1e}",
    )
    return "  ".join(fmt.format(cell) for fmt, cell in zip(_epoch_columns(fused), cells))


def _comparison(report: TrainReport) -> list[str]:
    """The comparison that matters first; then the drift, if any, and its cause, in one line (never wrapped;
    the difference is relative, max |fused - torch| / max |torch| of the worst tensor)."""
    t, f, c = report.torch, report.fused, report.config
    steps = len(t.losses)
    if report.bit_identical:
        return [
            f"result:    {f.name} is bit for bit {t.name}: the same loss at each of the {steps} steps and the same"
            " parameters at the end (difference 0.00e+00)"
        ]
    lines = [
        f"result:    test accuracy {f.test_accuracy:.2%} with {f.name}, {t.test_accuracy:.2%} with {t.name};"
        f" final training loss {f.train_loss:.4f} and {t.train_loss:.4f}"
    ]
    if report.diverged:  # non-finite parameters: no distance to report, the DIVERGED line says why
        return lines
    drift = f"drift:     parameters {report.max_rel_diff:.1e} apart after {steps} steps"
    agreeing = report.agreeing_steps
    if agreeing is None:
        cause = f": {f.name} rounds a {c['dtype']} update once, torch after every operation"
    else:
        cause = f" ({agreeing} within float32 rounding): {t.name} rounds differently, training amplifies it"
    return [*lines, drift + cause]


WIDTH = 100
INDENT = " " * len("result:    ")


def _wrap(line: str, wrap: bool = True) -> list[str]:
    """A labelled line (``label:    text``) wrapped to :data:`WIDTH`, continued under its text."""
    if not wrap:
        return [line]
    return textwrap.wrap(line, width=WIDTH, subsequent_indent=INDENT, break_on_hyphens=False)


def format_summary(report: TrainReport) -> str:
    """The results printed at the end of ``fused-optim train``: the comparison first, then the table."""
    t, f = report.torch, report.fused
    table = _table(
        [
            ["", t.name, f.name],
            ["test accuracy", f"{t.test_accuracy:.2%}", f"{f.test_accuracy:.2%}"],
            [
                "train loss (start -> end)",
                f"{t.initial_loss:.4f} -> {t.train_loss:.4f}",
                f"{f.initial_loss:.4f} -> {f.train_loss:.4f}",
            ],
            ["optimizer.step() median", _ms(t.step_median), _ms(f.step_median)],
            ["optimizer.step() mean", _ms(t.step_mean), _ms(f.step_mean)],
            ["  first step (in the mean)", _ms(t.step_seconds[0]), _ms(f.step_seconds[0])],
        ]
    )
    speed = f"speed:     {f.name}'s optimizer.step() is {report.speedup_median:.2f}x faster than {t.name}'s (median;"
    speed += f" {report.speedup_mean:.2f}x in the mean)"
    lines = [
        *(wrapped for line in (*_comparison(report), speed) for wrapped in _wrap(line, "drift:" not in line)),
        "",
        *table,
    ]
    if report.diverged:
        names = " and ".join(run.name for run, _ in report.diverged)
        whys = "; ".join(f"{run.name}: {why}" for run, why in report.diverged)
        momentum = " or --momentum" if "momentum" in report.config else ""
        lines += [
            "",
            *_wrap(f"DIVERGED:  {names} did not train ({whys}); lower --lr (now {report.config['lr']}){momentum}"),
        ]
    return "\n".join(lines)


def write_json(report: TrainReport, path: Path) -> None:
    path.write_text(json.dumps(report.as_json(), indent=2) + "\n")


def _quartiles_ms(run: RunReport) -> tuple[float, float]:
    """First and third quartile of the step times, in milliseconds."""
    if len(run.step_seconds) < 2:
        return run.step_median * 1e3, run.step_median * 1e3
    q1, _, q3 = statistics.quantiles(run.step_seconds, n=4)
    return q1 * 1e3, q3 * 1e3


def write_plot(report: TrainReport, path: Path) -> None:
    """Loss curves (overlaid), the parameter difference per step, and step-time bars, in one PNG (or any format
    matplotlib knows from the suffix)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    t, f = report.torch, report.fused
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    losses, diffs, times = figure.subplots(1, 3)

    steps = range(1, len(t.losses) + 1)
    epoch_ends = [min((i + 1) * report.steps_per_epoch, len(t.losses)) for i in range(len(report.epoch_losses(t)))]
    for run, color, style in ((t, "tab:blue", "-"), (f, "tab:orange", "--")):
        losses.plot(steps, run.losses, color=color, linewidth=0.6, alpha=0.3)
        losses.plot(epoch_ends, report.epoch_losses(run), color=color, linestyle=style, marker=".", label=run.name)
    every_loss = [loss for loss in (*t.losses, *f.losses) if math.isfinite(loss)] or [1.0]
    wide = min(every_loss) > 0 and max(every_loss) / min(every_loss) > 10
    losses.set(
        title="training loss (per step; per epoch mean)",
        xlabel="step",
        ylabel="cross-entropy",
        yscale="log" if wide else "linear",
    )
    losses.legend()

    diffs.set(title="largest relative parameter difference", xlabel="step")
    diffs.set_ylabel("max |fused - torch| / max |torch|, worst tensor")
    nonzero = [d if d > 0 else math.nan for d in report.rel_diff_per_step]
    if all(math.isnan(d) for d in nonzero):
        diffs.plot(steps, report.rel_diff_per_step, color="tab:red")
        diffs.set_ylim(-1, 1)
        diffs.text(0.5, 0.6, "0 at every step:\nbit for bit the same", transform=diffs.transAxes, ha="center")
    else:
        diffs.plot(steps, nonzero, color="tab:red")
        diffs.set_yscale("log")
        if any(d == 0 for d in report.rel_diff_per_step):
            diffs.text(0.02, 0.97, "gaps: steps with no difference at all", transform=diffs.transAxes, va="top")
        if report.agreeing_steps is not None:
            diffs.axhline(ROUNDING, color="grey", linestyle=":", label=f"{ROUNDING:.0e}: float32 rounding")
            diffs.legend(loc="lower right")

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
