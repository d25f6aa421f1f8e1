"""``fused-optim bench --plot``: the comparison drawn with matplotlib (the ``plot`` extra).

matplotlib is imported only here, and only when a plot is asked for.
"""

from __future__ import annotations

from typing import Any

from .bench_measure import COMPETITORS, OPS
from .bench_report import OP_TITLES

COLOURS = {"fused_sgd": "#d62728", "torch_forloop": "#7f7f7f", "torch_foreach": "#1f77b4", "torch_fused": "#2ca02c"}


def require_matplotlib() -> None:
    """Fail before the benchmark runs, not after, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "--plot needs matplotlib: pip install 'fused-optim[plot]' (or pip install matplotlib)"
        ) from None


def plot(result: dict[str, Any], path: str) -> None:
    """One row per op: median time (log scale) and share of the bandwidth limit, per (set, dtype)."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    runs = result["runs"]
    groups = [f"{run['set']}\n{run['dtype']}" for run in runs]
    figure = Figure(figsize=(max(8.0, 1.6 * len(runs) + 3), 3.2 * len(OPS)), layout="constrained")
    axes = figure.subplots(len(OPS), 2, squeeze=False)
    width = 0.8 / len(COMPETITORS)
    for row, op in enumerate(OPS):
        for column, (field, scale, ylabel) in enumerate(
            (("median_s", 1e3, "median time (ms, log)"), ("percent_of_limit", 1.0, "% of bandwidth limit"))
        ):
            ax = axes[row][column]
            for index, key in enumerate(COMPETITORS):
                xs, ys, label = [], [], None
                for position, run in enumerate(runs):
                    entry = run["ops"][op]["competitors"].get(key)
                    if entry is None or entry[field] is None:
                        continue
                    label = entry["label"]
                    xs.append(position + (index - (len(COMPETITORS) - 1) / 2) * width)
                    ys.append(entry[field] * scale)
                if xs:
                    ax.bar(xs, ys, width, label=label, color=COLOURS[key])
            if field == "median_s":
                ax.set_yscale("log")
            else:
                ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
            ax.set_xticks(range(len(runs)), groups, fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_title(OP_TITLES[op].format(max_norm=result["settings"]["max_norm"]), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes[row][0].legend(fontsize=7)
    machine = result["machine"]
    figure.suptitle(
        f"fused-optim bench: {machine['device']} ({machine['device_name']}, {machine['torch_threads']} threads), "
        f"torch {machine['torch']}, {result['settings']['rounds']} rounds; "
        f"limit {result['bandwidth_limit']['gbps']:.1f} GB/s",
        fontsize=10,
    )
    figure.savefig(path, dpi=110)
