"""Summaries of a bench run: per benchmark, method and context length.

For each group: runs, accuracy (mean score; a run that failed or gave no answer scores 0),
cost (mean, median, p95; "unknown" when any run used a model without a known price),
tokens, wall time, sub-calls and turns, and how many runs failed, gave no answer, or (for
`base`) saw a truncated context. Written as `summary.md` and `summary.json`, plus `plot.png`
(`rlm.bench.plot`) when matplotlib is installed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from rlm.bench.methods import METHODS
from rlm.bench.runner import RUN_FILE, load_results
from rlm.bench.suite import BENCHMARKS
from rlm.bench.tasks import length_label

__all__ = ["latest", "summarize", "percentile", "to_markdown", "write_report"]


def latest(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last result of each run (a retried run replaces its earlier error)."""
    by_key: dict[str, dict[str, Any]] = {}
    for result in results:
        by_key[result["key"]] = result
    return list(by_key.values())


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method: a value that occurred."""
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def _order(row: dict[str, Any]) -> tuple:
    bench, method = row["benchmark"], row["method"]
    return (
        list(BENCHMARKS).index(bench) if bench in BENCHMARKS else len(BENCHMARKS), bench,
        list(METHODS).index(method) if method in METHODS else len(METHODS), method,
        row["length"],
    )


def _spread(values: list[float], name: str) -> dict[str, float]:
    return {
        f"{name}_mean": statistics.fmean(values),
        f"{name}_median": statistics.median(values),
        f"{name}_p95": percentile(values, 95),
    }


def _group_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    costs = [r["cost"] for r in runs]
    row: dict[str, Any] = {
        "benchmark": first["benchmark"], "method": first["method"], "length": first["length"],
        "length_label": length_label(first["length"]), "runs": len(runs),
        "answered": sum(r["status"] == "answered" for r in runs),
        "no_answer": sum(r["status"] == "no_answer" for r in runs),
        "errors": sum(r["status"] == "error" for r in runs),
        "truncated": sum(bool(r.get("truncated")) for r in runs),
        "accuracy": statistics.fmean(r["score"] for r in runs),
    }
    if any(cost is None for cost in costs):
        row.update(cost_mean=None, cost_median=None, cost_p95=None)
    else:
        row.update(_spread(costs, "cost"))
    row.update(_spread([r["input_tokens"] + r["output_tokens"] for r in runs], "tokens"))
    row["input_tokens_mean"] = statistics.fmean(r["input_tokens"] for r in runs)
    row["output_tokens_mean"] = statistics.fmean(r["output_tokens"] for r in runs)
    row.update(_spread([r["wall_time"] for r in runs], "wall_time"))
    row["sub_calls_mean"] = statistics.fmean(r["sub_calls"] for r in runs)
    row["turns_mean"] = statistics.fmean(r["turns"] for r in runs)
    return row


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, method, length), from the latest result of each run."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for result in latest(results):
        groups.setdefault((result["benchmark"], result["method"], result["length"]), []).append(result)
    return sorted((_group_row(runs) for runs in groups.values()), key=_order)


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.4f}"


def _notes(row: dict[str, Any]) -> str:
    notes = []
    for key, word in (("errors", "failed"), ("no_answer", "no answer"), ("truncated", "truncated")):
        if row[key]:
            notes.append(f"{row[key]} {word}")
    return ", ".join(notes)


def to_markdown(rows: list[dict[str, Any]], run: dict[str, Any] | None = None) -> str:
    """The summary as markdown: one table per benchmark."""
    lines = ["# Benchmark summary", ""]
    if run:
        lines += [f"Root model `{run.get('root_model')}`, sub-model `{run.get('sub_model')}`, "
                  f"max {run.get('max_iterations')} turns, prompt `{run.get('system_prompt')}`.", ""]
    lines += ["Accuracy is the mean score (0-1); failed runs and runs with no answer score 0. "
              "Costs are per run; tokens are input + output of all calls; wall time in seconds.", ""]
    header = ("| method | length | runs | accuracy | cost mean | cost median | cost p95 | tokens mean "
              "| wall mean | wall median | sub-calls mean | turns mean | notes |")
    for bench in dict.fromkeys(row["benchmark"] for row in rows):
        lines += [f"## {bench}", "", header, "|" + "---|" * 13]
        for row in (r for r in rows if r["benchmark"] == bench):
            lines.append(
                f"| {row['method']} | {row['length_label']} | {row['runs']} | {row['accuracy']:.3f} "
                f"| {_money(row['cost_mean'])} | {_money(row['cost_median'])} | {_money(row['cost_p95'])} "
                f"| {row['tokens_mean']:,.0f} | {row['wall_time_mean']:.1f} | {row['wall_time_median']:.1f} "
                f"| {row['sub_calls_mean']:.1f} | {row['turns_mean']:.1f} | {_notes(row)} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_report(out_dir: Path, *, plot: bool = True) -> dict[str, Path]:
    """Write summary.md, summary.json and (if `plot`) plot.png into `out_dir`; return their paths.

    Raises `rlm.bench.plot.PlotUnavailable` when a plot is asked for and matplotlib is missing
    (after the summaries are written).
    """
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    rows = summarize(results)
    run_path = out_dir / RUN_FILE
    run = json.loads(run_path.read_text(encoding="utf-8")) if run_path.exists() else None
    paths = {"markdown": out_dir / "summary.md", "json": out_dir / "summary.json"}
    paths["markdown"].write_text(to_markdown(rows, run), encoding="utf-8")
    paths["json"].write_text(json.dumps({"run": run, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    if plot and rows:
        from rlm.bench.plot import plot_summary

        paths["plot"] = plot_summary(rows, out_dir / "plot.png")
    return paths
