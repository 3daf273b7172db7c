"""`rlm batch QUESTIONS.jsonl --out ANSWERS.jsonl`: one RLM run per line, on this machine or on
Ray; the same command again goes on where the last one stopped.

Progress goes to stderr (a bar on a terminal, one line per item otherwise), the summary to
stdout (one JSON object with --json). Exit codes come from `rlm.cli.exits`: 0 when every item
has a result and none failed; `BATCH_INCOMPLETE` when some failed or have no result yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from rlm.cli.bar import ItemsBar
from rlm.cli.cluster import RAY_OPTION, TASK_CPUS, TASK_MEMORY, TASK_RETRIES, OptionalRayValue, resources
from rlm.cli.exits import BadInput, ExitCode, failure_for
from rlm.cli.local import LOCAL, local_endpoint
from rlm.cli.output import (
    SANDBOX_HELP,
    SANDBOX_METAVAR,
    echo,
    isolation_warning_held,
    json_text,
    sandbox_line,
    say,
    warn_if_unisolated,
)
from rlm.errors import ConfigError
from rlm.sandbox import AUTO, parse_size
from rlm.utils.prompts import PROMPTS

__all__ = ["register", "batch"]

_FAILURES_SHOWN = 5


def register(app: typer.Typer) -> None:
    """Add `batch` to the `rlm` app."""
    app.command(cls=OptionalRayValue)(batch)


def batch(
    questions: Annotated[
        Path, typer.Argument(metavar="QUESTIONS.jsonl", help='One JSON object a line: {"id", "query", and "context" '
                             'or "context_path"}, with options of its own if wanted.')
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="ANSWERS.jsonl", help="Where results go, a line per item as it "
                           "ends; the same --out again resumes.")
    ],
    ray: Annotated[str | None, RAY_OPTION] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-j", min=1, max=4096, metavar="N",
                                             help="Items run at once.")] = 4,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run again the items whose result is a "
                                               "failure.")] = False,
    model: Annotated[str, typer.Option(metavar="NAME", help="Root model, 'auto', 'provider:name' or 'local'.")] = "auto",
    sub_model: Annotated[str, typer.Option(metavar="NAME", help="Sub-model, in the same forms.")] = "auto",
    api_url: Annotated[str | None, typer.Option(metavar="URL", help="OpenAI-compatible endpoint (default: "
                                                "$RLM_API_URL where the item runs, else http://localhost:8080/v1).")] = None,
    max_iterations: Annotated[int, typer.Option(min=1, max=10_000, metavar="N", help="Root turns per item.")] = 20,
    max_depth: Annotated[int, typer.Option(min=0, max=16, metavar="N", help="Sub-call depth (see rlm ask).")] = 1,
    max_cost: Annotated[float | None, typer.Option(min=0, metavar="USD", help="Budget of each item.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, metavar="N", help="Token budget of each item.")] = None,
    max_sub_calls: Annotated[int | None, typer.Option(min=1, metavar="N", help="Sub-call budget of each item.")] = None,
    max_time: Annotated[float | None, typer.Option(min=0, metavar="SECONDS", help="Time budget of each item.")] = None,
    max_reply_tokens: Annotated[int | None, typer.Option(min=1, metavar="N", help="Cap on each root reply.")] = None,
    sandbox: Annotated[str, typer.Option(metavar=SANDBOX_METAVAR, help=SANDBOX_HELP)] = AUTO,
    exec_timeout: Annotated[float, typer.Option(min=0.1, metavar="SECONDS", help="Seconds one code cell may run.")] = 120,
    memory_limit: Annotated[str, typer.Option(metavar="SIZE", help="Memory of each REPL worker, e.g. 8G, or none.")] = "4G",
    cpu_time_limit: Annotated[float | None, typer.Option(min=1, metavar="SECONDS", help="CPU seconds of a REPL "
                                                         "worker.")] = None,
    prompt: Annotated[str, typer.Option(metavar="|".join(PROMPTS), help="System prompt.")] = "default",
    max_retries: Annotated[int, typer.Option(min=0, max=20, metavar="N", help="Retries of a failed request.")] = 3,
    log_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Trajectories (default: a folder beside --out, "
                                                 "ANSWERS.runs).")] = None,
    no_logs: Annotated[bool, typer.Option("--no-logs", help="Write no trajectories.")] = False,
    task_cpus: TASK_CPUS = 0.5,
    task_memory: TASK_MEMORY = "1G",
    task_retries: TASK_RETRIES = 2,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> None:
    """Answer every question of a JSONL file, several at once, here or on Ray; run it again to resume."""
    from rlm.batch import read_input
    from rlm.batch import run as run_batch

    try:
        if no_logs and log_dir is not None:
            raise BadInput("--no-logs and --log-dir say opposite things; give one of them")
        try:
            source = read_input(questions)
        except ConfigError as exc:  # about a line of the file: its fields keep their names
            raise BadInput(str(exc)) from None
        options: dict[str, Any] = {
            "sub_model": sub_model, "max_iterations": max_iterations, "max_depth": max_depth, "max_cost": max_cost,
            "max_tokens": max_tokens, "max_sub_calls": max_sub_calls, "max_time": max_time, "sandbox": sandbox,
            "max_reply_tokens": max_reply_tokens, "exec_timeout": exec_timeout,
            "memory_limit": parse_size(memory_limit), "cpu_time_limit": cpu_time_limit, "system_prompt": prompt,
            "max_retries": max_retries,
        }
        if model == LOCAL and max_reply_tokens is None:
            from rlm.local import REPLY_TOKENS

            options["max_reply_tokens"] = REPLY_TOKENS
        task = resources(task_cpus, task_memory, task_retries)
        with local_endpoint(model, sub_model, api_url, quiet=quiet) as (model, sub_model, url):
            options.update(model=model, sub_model=sub_model, **({"api_url": url} if url is not None else {}))
            with isolation_warning_held(), _Display(quiet, sandbox if ray is None else None) as display:
                summary = run_batch(
                    source, out=out, ray=ray, concurrency=concurrency, retry_failed=retry_failed,
                    options=options, log_dir="" if no_logs else log_dir, resources=task,
                    on_plan=display.plan, on_result=display.result, on_lost=display.lost,
                )
    except KeyboardInterrupt:
        _fail(ExitCode.INTERRUPTED, f"interrupted; the results so far are in {out}: run the same command again to "
                                    "go on")
    except Exception as exc:  # one line and an exit code, never a traceback
        failure = failure_for(exc, api_url=api_url)
        _fail(failure.code, failure.message)
    _report(summary, json_output)


def _report(summary: Any, json_output: bool) -> None:
    if json_output:
        typer.echo(json_text({**dataclasses.asdict(summary), "complete": summary.complete}))
    else:
        for line in _summary_lines(summary):
            echo(line)
    left = []
    if summary.failed:
        left.append(f"{summary.failed} item(s) failed (their errors are in {summary.out}): fix the cause, then run "
                    "again with --retry-failed")
    if summary.pending:
        left.append(f"{summary.pending} item(s) have no result yet: run the same command again")
    if left:
        _fail(ExitCode.BATCH_INCOMPLETE, "; ".join(left))


def _summary_lines(summary: Any) -> list[str]:
    cost = f"${summary.cost:.4f}" + ("" if summary.cost_complete else " (models of unknown price not counted)")
    rate = f", {summary.ran / summary.wall_time:.2f} items/s" if summary.ran and summary.wall_time > 0 else ""
    lines = [
        f"{summary.out}: {summary.items} items: {summary.answered} answered, {summary.no_answer} without an answer, "
        f"{summary.failed} failed, {summary.pending} not done yet",
        f"this run: {summary.ran} run in {summary.wall_time:.1f} s{rate}; {summary.skipped} done before; "
        f"cost ${summary.run_cost:.4f} (all runs {cost})",
    ]
    if summary.lost:
        lines.append(f"lost: {summary.lost} item(s) whose Ray worker died; the next run does them")
    if summary.repaired_bytes:
        lines.append(f"repaired: a torn last line ({summary.repaired_bytes} bytes) was cut from {summary.out}")
    for item_id, error in summary.failures[:_FAILURES_SHOWN]:
        lines.append(f"failed: {item_id}: {error}")
    return lines


def _fail(code: ExitCode, message: str) -> NoReturn:
    say(message)
    raise typer.Exit(int(code))


class _Display(ItemsBar):
    """The batch's plan (with the sandbox level, for a batch run here), each item's end and each
    item lost, on stderr."""

    def __init__(self, quiet: bool, sandbox: str | None) -> None:
        super().__init__(quiet)
        self._sandbox = sandbox

    def plan(self, to_run: int, finished_before: int, failed_before: int) -> None:
        if self._sandbox is not None and to_run:
            from rlm.sandbox import resolve_level

            warn_if_unisolated(self._sandbox)  # said even with --quiet: it is not progress
            self.say(sandbox_line(resolve_level(self._sandbox), self._sandbox))
        if finished_before or failed_before:
            failed = f", {failed_before} failed (not run again without --retry-failed)" if failed_before else ""
            self.say(f"resuming: {finished_before} item(s) done before{failed}; {to_run} to run")
        self.begin(to_run)

    def result(self, line: dict[str, Any]) -> None:
        text = f"{line['id']}: {line['status']}, {line['wall_time']:.1f} s"
        self.advance(text + (f" ({line['error']})" if line["status"] == "error" else ""))

    def lost(self, item_id: Any, reason: str) -> None:
        self.say(f"{item_id}: lost, its Ray worker died ({reason}); the next run does it")
