"""``fused-optim bench --plot``: the comparison drawn with matplotlib (the ``plot`` extra).

matplotlib is imported only here, and only when a plot is asked for.
"""

from __future__ import annotations

from typing import Any

from .bench_report import MODE_TITLES, OP_TITLES
from .plotting import require_matplotlib

COLOURS = {"torch_forloop": "#7f7f7f", "torch_foreach": "#1f77b4", "torch_fused": "#2ca02c"}
FUSED_COLOUR = "#d62728"
"""The fused optimizer's bars (FusedSGD, FusedAdamW)."""
ROWS = ("cycle", "step", "zero_grad", "clip")
"""One row of panels per op, one column per gradient mode; clipping is timed with bound gradients only."""
FLOOR = "bandwidth floor"
MIN_SPAN = 20.0
"""The narrowest y range of a panel, as high / low (log scale)."""
BELOW_SHORTEST = 4.0
"""The bottom of a row's log axis lies this factor below its shortest bar, so that every bar, the
fastest competitor's included, rises at least log10(4) = 0.6 decades above the axis."""
HEADROOM = 2.5
"""The top lies this factor above the tallest bar: room for the value printed above each bar."""


def _competitors(runs: list[dict[str, Any]]) -> dict[str, str]:
    """Every competitor's key and label, in the bench's order (the fused optimizer first)."""
    found: dict[str, str] = {}
    for run in runs:
        for key, entry in run["competitors"].items():
            found.setdefault(key, entry["label"])
    return found


def _bars(ax: Any, runs: list[dict[str, Any]], mode: str, op: str) -> None:
    """Median time per competitor (bars, log scale) and the bandwidth floor (a black tick) per (set, dtype)."""
    competitors = _competitors(runs)
    width = 0.8 / len(competitors)
    for index, (key, label) in enumerate(competitors.items()):
        xs, ys = [], []
        for position, run in enumerate(runs):
            entry = run["modes"][mode]["ops"][op]["competitors"].get(key)
            if entry is None or entry["median_s"] is None:
                continue
            xs.append(position + (index - (len(competitors) - 1) / 2) * width)
            ys.append(entry["median_s"] * 1e3)
        bars = ax.bar(xs, ys, width, label=label, color=COLOURS.get(key, FUSED_COLOUR))
        ax.bar_label(bars, fmt="%.3g", fontsize=6, rotation=90, padding=2)
    floors = [(position, run["modes"][mode]["ops"][op].get("floor_s")) for position, run in enumerate(runs)]
    floors = [(position, floor) for position, floor in floors if floor]
    if floors:
        ax.hlines(
            [floor * 1e3 for _, floor in floors],
            [position - 0.45 for position, _ in floors],
            [position + 0.45 for position, _ in floors],
            colors="black",
            linewidth=1.2,
            label=FLOOR,
        )


def _panel(ax: Any, result: dict[str, Any], mode: str, op: str) -> None:
    """One (op, mode) panel, or a note where the op is not timed in that mode."""
    runs = result["runs"]
    if op not in runs[0]["modes"][mode]["ops"]:
        ax.axis("off")
        ax.text(0.5, 0.5, f"{OP_TITLES[op].split(' (')[0]}:\ntimed with bound gradients", ha="center", va="center")
        return
    _bars(ax, runs, mode, op)
    ax.set_yscale("log")
    ax.set_xticks(range(len(runs)), [f"{run['set']}\n{run['dtype']}" for run in runs], fontsize=8)
    ax.set_ylabel("median time (ms, log)", fontsize=8)
    ax.set_title(f"{OP_TITLES[op].format(max_norm=result['settings']['max_norm'])}: {mode}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _same_scale(row: list[Any]) -> None:
    """One y range for a row's panels, so that the modes compare at a glance: from
    :data:`BELOW_SHORTEST` below the shortest bar to :data:`HEADROOM` above the tallest, at least
    :data:`MIN_SPAN` wide, labelled at powers of ten only (no crowded minor-tick labels)."""
    from matplotlib.ticker import NullFormatter

    heights = [patch.get_height() for ax in row for patch in ax.patches if patch.get_height() > 0]
    if not heights:
        return
    low, high = min(heights) / BELOW_SHORTEST, max(heights) * HEADROOM
    if high < low * MIN_SPAN:
        middle = (low * high) ** 0.5
        low, high = middle / MIN_SPAN**0.5, middle * MIN_SPAN**0.5
    for ax in row:
        ax.set_ylim(low, high)
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot(result: dict[str, Any], path: str) -> None:
    """One column per gradient mode, one row per op (cycle, step, zero_grad, clipping): median
    time per competitor and (set, dtype), log scale, with the bandwidth floor; the rows share a
    y range, and the legend sits below the panels, clear of the bars."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    runs = result["runs"]
    modes = result["settings"]["grads"]
    rows = [op for op in ROWS if any(op in run["modes"][mode]["ops"] for run in runs for mode in modes)]
    width = max(8.0, len(modes) * (1.3 * len(runs) + 2.5))
    figure = Figure(figsize=(width, 2.8 * len(rows) + 1.2), layout="constrained")
    axes = figure.subplots(len(rows), len(modes), squeeze=False)
    for row, op in enumerate(rows):
        for column, mode in enumerate(modes):
            _panel(axes[row][column], result, mode, op)
        _same_scale([ax for ax in axes[row] if ax.axison])
    found: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            found.setdefault(label, handle)
    legend = {label: found[label] for label in [*_competitors(runs).values(), FLOOR] if label in found}
    columns = len(legend) if width >= 9 else 3
    figure.legend(
        list(legend.values()), list(legend), loc="outside lower center", ncols=columns, fontsize=8, frameon=False
    )
    machine = result["machine"]
    figure.suptitle(
        f"fused-optim bench: {machine['device']} ({machine['device_name']}, {machine['torch_threads']} threads), "
        f"torch {machine['torch']}, {result['settings']['rounds']} rounds; "
        f"limit {result['bandwidth_limit']['gbps']:.1f} GB/s\n" + "\n".join(MODE_TITLES[mode] for mode in modes),
        fontsize=9,
    )
    figure.savefig(path, dpi=110)
