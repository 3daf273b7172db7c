"""A PNG of accuracy and cost against context length, one column per benchmark (needs `rlm[bench]`).

Top row: accuracy per method; bottom row: mean cost per run. When no cost is known (a model
without a known price) or every cost is zero (a local server), the bottom row shows mean
tokens per run instead, and its axis says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlm.bench.tasks import length_label
from rlm.errors import ConfigError

__all__ = ["PlotUnavailable", "plot_summary"]

_MARKERS = ("o", "s", "^", "D", "v")
_DASHES = ("-", "--", "-.", ":")


class PlotUnavailable(ConfigError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "the plot needs matplotlib: pip install 'rlm[bench]' (the summary tables were written without it)"
        ) from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as pyplot

    return pyplot


def _second_metric(rows: list[dict[str, Any]]) -> tuple[str, str]:
    costs = [row["cost_mean"] for row in rows]
    if costs and all(cost is not None for cost in costs) and any(cost > 0 for cost in costs):
        return "cost_mean", "mean cost per run (USD)"
    return "tokens_mean", "mean tokens per run (cost unknown or zero)"


def plot_summary(rows: list[dict[str, Any]], path: Path) -> Path:
    """Draw the summary rows (from `rlm.bench.report.summarize`) into a PNG at `path`."""
    pyplot = _pyplot()
    benchmarks = list(dict.fromkeys(row["benchmark"] for row in rows))
    figure, axes = pyplot.subplots(2, len(benchmarks), figsize=(5 * len(benchmarks), 7), squeeze=False)
    for column, bench in enumerate(benchmarks):
        mine = [row for row in rows if row["benchmark"] == bench]
        metric, label = _second_metric(mine)
        for number, method in enumerate(dict.fromkeys(row["method"] for row in mine)):
            points = sorted((row["length"], row["accuracy"], row[metric]) for row in mine if row["method"] == method)
            lengths = [point[0] for point in points]
            # Distinct markers and dashes keep methods with equal values visible on top of each other.
            style = {"marker": _MARKERS[number % len(_MARKERS)], "linestyle": _DASHES[number % len(_DASHES)],
                     "label": method, "alpha": 0.85}
            axes[0][column].plot(lengths, [point[1] for point in points], **style)
            axes[1][column].plot(lengths, [point[2] or 0 for point in points], **style)
        _style(axes[0][column], bench, "accuracy", mine)
        _style(axes[1][column], None, label, mine)
        axes[0][column].set_ylim(-0.02, 1.02)
    axes[0][0].legend(loc="best", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def _style(axis: Any, title: str | None, ylabel: str, rows: list[dict[str, Any]]) -> None:
    lengths = sorted({row["length"] for row in rows})
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [length_label(length) for length in lengths])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    if title:
        axis.set_title(title)
