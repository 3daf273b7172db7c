"""`run()`: a batch of RLM runs, on this machine or on Ray, each result kept as soon as it ends.

The order of work: check every input line and option; lock the answers file, compare its
manifest, cut a torn last line, read what is already answered; check the endpoint and the
sandbox once (on this machine); then run what is left, appending each result as it ends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from rlm.batch.cluster import LOCAL, TaskResources, connected, run_tasks
from rlm.batch.execute import Payload, run_item, run_local
from rlm.batch.items import BatchInput, read_input
from rlm.batch.options import check_options, recorded, rlm_arguments
from rlm.batch.results import Existing, ResultsFile, sibling
from rlm.errors import ConfigError

__all__ = ["BatchSummary", "run", "default_log_dir"]

_MAX_CONCURRENCY = 4096
_FAILURES_KEPT = 20  # failures listed in a summary; all of them are in the answers file


@dataclass(frozen=True)
class BatchSummary:
    """How a batch stands after a run (`run()` returns it).

    Over the whole batch (this run and earlier ones): `answered` (status "final"), `no_answer`
    (a run that ended without one: "max_iterations", "no_progress", "budget"), `failed` ("error"; run again with `retry_failed=True`),
    `pending` (no result yet: run again), `cost` (USD over every result line, failed attempts
    included; `cost_complete` is False when a model's price is unknown). This run: `ran`
    (results written), `skipped` (finished before, not run again), `lost` (in flight when their
    Ray worker died: no result, the next run does them), `run_cost`, `wall_time`.
    `repaired_bytes`: a torn last line of the answers file, cut before starting.
    `failures`: id and error of the first failed items.
    """

    out: str
    items: int
    answered: int
    no_answer: int
    failed: int
    pending: int
    ran: int
    skipped: int
    lost: int
    cost: float
    cost_complete: bool
    run_cost: float
    wall_time: float
    repaired_bytes: int = 0
    failures: list[tuple[str | int, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every item has a result and none failed."""
        return self.pending == 0 and self.failed == 0


def default_log_dir(out: str | os.PathLike) -> Path:
    """Where a batch writes its trajectories unless told: a folder beside the answers file."""
    return sibling(Path(out), ".runs")


def run(
    items: str | os.PathLike | Iterable[Mapping[str, Any]] | BatchInput,
    *,
    out: str | os.PathLike,
    ray: str | None = None,
    concurrency: int = 4,
    retry_failed: bool = False,
    options: Mapping[str, Any] | None = None,
    log_dir: str | os.PathLike | None = None,
    resources: TaskResources | None = None,
    on_plan: Callable[[int, int, int], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_lost: Callable[[str | int, str], None] | None = None,
) -> BatchSummary:
    """Answer every item of `items` (a JSONL file's path, dicts of the same form, or what
    `read_input` made of either), appending each result to `out` as it ends; items already
    answered there are not run again.

    ray: None runs `concurrency` items at once in this process; "local" starts Ray on this
        machine for the batch; any other address joins that Ray cluster (see `rlm.batch.cluster`).
    concurrency: items in flight at once (on Ray too, which also needs the resources declared).
    retry_failed: run again the items whose last result is a failure (status "error").
    options: `RLM_REPL` options for every item (`rlm.batch.options.OPTIONS`); an input line
        may override the per-item ones.
    log_dir: where trajectories go (default: `<out stem>.runs/` beside `out`); "" for none.
    resources: what each Ray task declares (`TaskResources`).
    on_plan(to_run, finished_before, failed_not_retried), on_result(line), on_lost(id, reason):
        progress callbacks, called in this thread.

    Raises ConfigError for a bad input line, option or answers file (nothing is run then);
    `ClientError` / `SandboxError` when the endpoint or the sandbox cannot be used at all.
    """
    started = time.monotonic()
    _check_arguments(concurrency, retry_failed, ray, resources)
    settings = check_options(dict(options or {}), where="options")
    source = items if isinstance(items, BatchInput) else read_input(items)
    out = Path(out)
    if source.path is not None and out.exists() and out.resolve() == source.path.resolve():
        raise ConfigError(f"--out {out} is the questions file itself; give the answers another file")
    with ResultsFile(out) as results:
        results.check_manifest(_manifest(source, settings), has_results=results.path.stat().st_size > 0)
        existing = results.read(source)
        finished_before = len(existing.finished)
        to_run = [key for key in source.keys()
                  if key not in existing.finished and (retry_failed or key not in existing.latest)]
        if on_plan is not None:
            on_plan(len(to_run), finished_before, 0 if retry_failed else len(existing.latest) - finished_before)
        tally = _Tally(existing, source, on_result, on_lost)
        if to_run:
            _preflight(settings, ray)
            jobs = _jobs(source, to_run, settings, _trajectory_dir(out, log_dir), tally.ids)
            _execute(jobs, results, tally, ray=ray, concurrency=concurrency, resources=resources or TaskResources())
    return tally.summary(str(out), finished_before, time.monotonic() - started)


def _execute(
    jobs: Iterator[tuple[str, Payload]], results: ResultsFile, tally: "_Tally", *, ray: str | None,
    concurrency: int, resources: TaskResources,
) -> None:
    """Run the jobs here or on Ray, appending each result as it comes."""

    def record(key: str, result: dict[str, Any]) -> None:
        line = {"id": tally.ids[key], **result}
        results.append(line)
        tally.written(key, line)

    if ray is None:
        run_local(jobs, concurrency, record)
        return
    with connected(ray, resources) as module:
        run_tasks(module, run_item, ((key, (payload,)) for key, payload in jobs), window=concurrency,
                  resources=resources, name="rlm-batch", on_done=record, on_lost=tally.lost_one)


def _check_arguments(concurrency: Any, retry_failed: Any, ray: Any, resources: Any) -> None:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= _MAX_CONCURRENCY:
        raise ConfigError(f"concurrency must be a whole number from 1 to {_MAX_CONCURRENCY}, got {concurrency!r}")
    if not isinstance(retry_failed, bool):
        raise ConfigError(f"retry_failed must be True or False, got {retry_failed!r}")
    if ray is not None and (not isinstance(ray, str) or not ray.strip()):
        raise ConfigError(f"ray must be None, 'local', or a Ray cluster's address, got {ray!r}")
    if resources is not None and not isinstance(resources, TaskResources):
        raise ConfigError(f"resources must be a rlm.batch.TaskResources, got {resources!r}")


def _manifest(source: BatchInput, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "input": {"source": source.source, "items": len(source), "fingerprint": source.fingerprint},
        "options": recorded(settings),
    }


def _trajectory_dir(out: Path, log_dir: str | os.PathLike | None) -> str:
    if log_dir is None:
        return str(default_log_dir(out).resolve())
    return str(Path(log_dir).expanduser().resolve()) if str(log_dir) else ""  # "": RLM_REPL writes none


def _preflight(settings: dict[str, Any], ray: str | None) -> None:
    """On this machine, fail once and early when the sandbox or the endpoint cannot be used,
    rather than once per item. (On a cluster the nodes are checked by the items themselves.)"""
    if ray not in (None, LOCAL):
        return
    from rlm.sandbox import AUTO, check_available, resolve_level

    check_available(resolve_level(settings.get("sandbox", AUTO)))
    if "auto" in (settings.get("model", "auto"), settings.get("sub_model", "auto")):
        from rlm.providers import resolve_client

        client = resolve_client("auto", api_url=settings.get("api_url"), max_retries=settings.get("max_retries", 3))
        try:
            client.model  # asks the endpoint for its models: an unreachable one fails here
        finally:
            client.close()


def _jobs(
    source: BatchInput, keys: list[str], settings: dict[str, Any], trajectories: str, ids: dict[str, Any]
) -> Iterator[tuple[str, Payload]]:
    """(key, payload) of each item to run, made only when the item starts."""
    for key in keys:
        item = source.load(key)
        ids[key] = item.id
        payload: Payload = {"query": item.query, "arguments": rlm_arguments(settings, item.options),
                            "log_dir": trajectories}
        if item.context_path is not None:
            payload["context_path"] = item.context_path
        else:
            payload["context"] = item.context
        yield key, payload


class _Tally:
    """The batch's state as results come in, for the callbacks and the summary."""

    def __init__(
        self, existing: Existing, source: BatchInput, on_result: Callable[[dict[str, Any]], None] | None,
        on_lost: Callable[[str | int, str], None] | None,
    ) -> None:
        self.existing = existing
        self.keys = source.keys()
        self.ids: dict[str, Any] = {}
        self.ran, self.lost = 0, 0
        self._before = existing.cost
        self._on_result = on_result
        self._on_lost = on_lost

    def written(self, key: str, line: dict[str, Any]) -> None:
        self.existing.add(key, line)
        self.ran += 1
        if self._on_result is not None:
            self._on_result(line)

    def lost_one(self, key: str, reason: str) -> None:
        self.lost += 1
        if self._on_lost is not None:
            self._on_lost(self.ids.get(key, key), reason)

    def summary(self, out: str, skipped: int, wall_time: float) -> BatchSummary:
        existing = self.existing
        statuses = [existing.latest.get(key) for key in self.keys]
        failures = [(self.ids.get(key, key), existing.errors[key]) for key in self.keys if key in existing.errors]
        return BatchSummary(
            out=out, items=len(self.keys), answered=statuses.count("final"),
            no_answer=sum(status not in ("final", "error", None) for status in statuses), failed=statuses.count("error"),
            pending=statuses.count(None), ran=self.ran, skipped=skipped, lost=self.lost, cost=existing.cost,
            cost_complete=existing.cost_complete, run_cost=existing.cost - self._before, wall_time=wall_time,
            repaired_bytes=existing.repaired_bytes, failures=failures[:_FAILURES_KEPT],
        )
