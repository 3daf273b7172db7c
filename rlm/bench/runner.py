"""Run methods over tasks: a bounded number at once, every trajectory kept, resumable.

An output directory holds:

    run.json                 the models and settings the results were made with
    results.jsonl            one line per (task, method) run, appended as each run ends
    trajectories/<method>/   the JSONL trajectory of every run
    summary.md / .json, plot.png    written by `rlm.bench.report`

Run the same command again after an interruption: runs already in `results.jsonl` are not
run again, except those that ended in an error (endpoint down, sandbox failure), which are
retried; the report keeps the last line of each run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from rlm.bench.methods import Models, RunSettings, run_method, unavailable_reason
from rlm.bench.scoring import score
from rlm.bench.suite import TaskSpec, build_task
from rlm.batch.cluster import TaskResources, connected, run_tasks
from rlm.errors import ConfigError

__all__ = ["RESULTS_FILE", "RUN_FILE", "result_key", "load_results", "run_bench"]

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
_RESULT_VERSION = 1


def result_key(task_id: str, method: str) -> str:
    """The identity of one run in `results.jsonl`."""
    return f"{task_id}::{method}"


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of `results.jsonl`, in order (a line cut by an interruption is skipped)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return []
    results = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                results.append(json.loads(line))
            except ValueError:
                continue  # the last line of a run that was killed mid-write
    return results


def run_bench(
    specs: list[TaskSpec],
    methods: list[str],
    models: Models,
    settings: RunSettings,
    out_dir: Path,
    *,
    concurrency: int = 2,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    ray: str | None = None,
    resources: TaskResources | None = None,
    on_lost: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every method on every task not already done in `out_dir`; return the new results.

    `on_plan(to_run, already_done)` is called once before the first run; `on_result(result)`
    after each run, from worker threads. With `ray` (an address, or "local"), each run is a Ray
    task as in `rlm.batch` (`resources` declared; `models` must come from `Models.from_endpoint`);
    a run whose Ray worker died is reported to `on_lost(key, reason)` and done by the next run.
    """
    for method in methods:
        reason = unavailable_reason(method)
        if reason:
            raise ConfigError(reason)
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    if "base" in methods:
        _check_window(models, settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_file(out_dir, _run_config(models, settings))
    _drop_partial_line(out_dir / RESULTS_FILE)
    done = {r["key"] for r in load_results(out_dir) if r.get("status") != "error"}
    jobs = [(spec, method) for spec in specs for method in methods if result_key(spec.id, method) not in done]
    if on_plan is not None:
        on_plan(len(jobs), len(specs) * len(methods) - len(jobs))
    writer = _ResultWriter(out_dir / RESULTS_FILE, on_result)
    if ray is not None:
        resources = resources or TaskResources()
        with connected(ray, resources) as module:
            where = out_dir.resolve()  # a Ray worker does not run in this folder
            tasks = ((result_key(spec.id, method), (spec, method, models, settings, where)) for spec, method in jobs)
            run_tasks(module, _result_of, tasks, window=concurrency, resources=resources,
                      name="rlm-bench", on_done=lambda key, result: writer.write(result),
                      on_lost=on_lost or (lambda key, reason: None))
        return writer.written
    context = (models, settings, out_dir, writer)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rlm-bench") as pool:
        futures = [pool.submit(_run_one, spec, method, *context) for spec, method in jobs]
        _wait_all(futures)
    return writer.written


def _drop_partial_line(path: Path) -> None:
    """Cut a last line left half-written by an interruption, so that new lines start clean."""
    if not path.exists():
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def _check_window(models: Models, settings: RunSettings) -> None:
    """`base` cuts the context to the root model's window: fail before any run if it is unknown."""
    if settings.context_window:
        return
    with models.make() as (root, _):
        if not root.context_window():
            raise ConfigError(
                "the base method needs the root model's context window, and the server does not report it; "
                "pass it with --context-window (tokens)"
            )


def _wait_all(futures: list[Future]) -> None:
    """Wait for every run; on Ctrl-C, drop the runs not started (those running still finish and are saved)."""
    try:
        wait(futures)
    except KeyboardInterrupt:
        for future in futures:
            future.cancel()
        raise
    for future in futures:
        future.result()  # re-raise a bug in a run, if any


def _run_one(
    spec: TaskSpec, method: str, models: Models, settings: RunSettings, out_dir: Path, writer: "_ResultWriter"
) -> None:
    writer.write(_result_of(spec, method, models, settings, out_dir))


def _result_of(spec: TaskSpec, method: str, models: Models, settings: RunSettings, out_dir: Path) -> dict[str, Any]:
    """Run `method` on the task of `spec` (generated here, so a Ray task builds its own); its result line."""
    task = build_task(spec)
    log_dir = out_dir / "trajectories" / method
    outcome = run_method(method, task, models, settings, log_dir)
    usage = outcome.usage
    described = task.describe()
    return {
        "v": _RESULT_VERSION,
        "key": result_key(task.id, method),
        **described,
        "method": method,
        "status": outcome.status,
        "answer": outcome.answer,
        "score": score(task.kind, outcome.answer, task.answer),
        "cost": usage["total_cost"] if usage["cost_complete"] else None,
        "input_tokens": usage["total_input_tokens"],
        "output_tokens": usage["total_output_tokens"],
        "cached_tokens": usage["root"]["cached_tokens"] + usage["sub"]["cached_tokens"],
        "root_calls": usage["root"]["calls"],
        "sub_calls": usage["sub"]["calls"],
        "usage_estimated": usage["usage_estimated"],
        "turns": outcome.turns,
        "wall_time": round(outcome.wall_time, 4),
        "truncated": outcome.truncated,
        "kept_chars": outcome.kept_chars,
        "error": outcome.error,
        "trajectory": outcome.trajectory,
        "root_model": models.root_name,
        "sub_model": models.sub_name if method not in ("base", "rlm-depth0") else None,
        "finished_at": time.time(),
    }


class _ResultWriter:
    """Appends results as whole lines, one thread at a time, flushed to disk as each run ends."""

    def __init__(self, path: Path, on_result: Callable[[dict[str, Any]], None] | None) -> None:
        self.path = path
        self.written: list[dict[str, Any]] = []
        self._on_result = on_result
        self._lock = threading.Lock()

    def write(self, result: dict[str, Any]) -> None:
        line = json.dumps(result, ensure_ascii=False) + "\n"
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self.written.append(result)
        if self._on_result is not None:
            self._on_result(result)


def _run_config(models: Models, settings: RunSettings) -> dict[str, Any]:
    return {"root_model": models.root_name, "sub_model": models.sub_name, **asdict(settings)}


def _check_run_file(out_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to mix results made with other models or settings into one directory."""
    path = out_dir / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != config:
            changed = sorted(k for k in {**previous, **config} if previous.get(k) != config.get(k))
            raise ConfigError(
                f"{out_dir} holds results made with other {', '.join(changed)} ({path}); "
                "use another --out directory, or delete this one to start over"
            )
        return
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
