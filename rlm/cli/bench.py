"""`rlm bench`: run the benchmarks (`run`), summarize a results folder (`report`), list the
methods (`methods`) and show one generated task (`task`).

The summary table goes to stdout, progress and file paths to stderr; exit codes come from
`rlm.cli.exits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from rlm.cli.bar import ItemsBar
from rlm.cli.cluster import RAY_OPTION, TASK_CPUS, TASK_MEMORY, TASK_RETRIES, OptionalRayValue, resources
from rlm.cli.exits import Failure, failure_for
from rlm.cli.local import local_endpoint
from rlm.cli.output import (
    SANDBOX_HELP,
    SANDBOX_METAVAR,
    command_app,
    echo,
    isolation_warning_held,
    json_text,
    sandbox_line,
    say,
    warn_if_unisolated,
)
from rlm.sandbox import AUTO, check_available, resolve_level

__all__ = ["app", "register"]

app = command_app(name="bench", no_args_is_help=True,
                  help="Benchmarks like the paper's: accuracy and cost per method and context length.")


def register(parent: typer.Typer) -> None:
    """Add the `bench` command group to the `rlm` app."""
    parent.add_typer(app, name="bench")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command(cls=OptionalRayValue)
def run(
    benchmark: Annotated[str, typer.Option("--benchmark", "-b", help="sniah, oolong, oolong-pairs (comma-separated).")] = "sniah",
    lengths: Annotated[str, typer.Option("--lengths", "-l", help="Context lengths in tokens, e.g. 8k,32k,128k,1m.")] = "8k,16k,32k",
    tasks: Annotated[int, typer.Option("--tasks", "-n", min=1, help="Tasks per benchmark and length.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the generated tasks.")] = 0,
    methods: Annotated[str, typer.Option("--methods", "-m", help="base, rlm-depth0, rlm, rlm-depth2 (comma-separated).")] = "base,rlm-depth0,rlm",
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder; run again with the same one to resume.")] = Path("bench-results"),
    concurrency: Annotated[int, typer.Option("--concurrency", "-j", min=1, help="Runs at once.")] = 2,
    ray: Annotated[str | None, RAY_OPTION] = None,
    task_cpus: TASK_CPUS = 0.5,
    task_memory: TASK_MEMORY = "1G",
    task_retries: TASK_RETRIES = 2,
    model: Annotated[str, typer.Option(help="Root model, 'auto', 'provider:name', or 'local' (bundled model).")] = "auto",
    sub_model: Annotated[str, typer.Option(help="Sub-model, in the same forms.")] = "auto",
    api_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint (default: $RLM_API_URL, else http://localhost:8080/v1).")] = None,
    max_retries: Annotated[int, typer.Option(min=0, help="Retries of a failed request.")] = 3,
    max_iterations: Annotated[int, typer.Option(min=1, help="Root turns per run before giving up.")] = 20,
    max_reply_tokens: Annotated[int | None, typer.Option(min=1, help="Cap on each root reply.")] = None,
    context_window: Annotated[int | None, typer.Option(min=256, help="Root model's window in tokens (default: what the server reports).")] = None,
    sandbox: Annotated[str, typer.Option(metavar=SANDBOX_METAVAR, help=SANDBOX_HELP)] = AUTO,
    exec_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds one code cell may run.")] = 120.0,
    prompt: Annotated[str, typer.Option(help="System prompt: default, cautious or small.")] = "default",
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Draw plot.png (needs rlm[bench]).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> None:
    """Run methods over generated tasks; write results.jsonl, summary.md/.json and plot.png to --out."""
    from rlm.bench import Models, RunSettings, run_bench, task_specs, unavailable_reason, write_report

    settings = RunSettings(
        max_iterations=max_iterations, max_reply_tokens=max_reply_tokens, sandbox=sandbox,
        exec_timeout=exec_timeout, system_prompt=prompt, context_window=context_window,
    )
    try:
        specs = task_specs(_split(benchmark), _split(lengths), tasks, seed)
        chosen = _split(methods)
        reasons = [reason for reason in map(unavailable_reason, chosen) if reason]
        if reasons:
            raise _bad(reasons[0])
        if plot:
            _require_plot()
        with isolation_warning_held():
            check_available(sandbox)  # "auto" is chosen here, once for all the runs
        warn_if_unisolated(sandbox)
        if not quiet:
            say(sandbox_line(resolve_level(sandbox), sandbox))
        with local_endpoint(model, sub_model, api_url, quiet=quiet) as (model, sub_model, api_url):
            models = Models.from_endpoint(model, sub_model, api_url=api_url, max_retries=max_retries)
            display = _Display(quiet)
            with display:
                run_bench(specs, chosen, models, settings, out, concurrency=concurrency,
                          on_plan=display.plan, on_result=display.result, ray=ray,
                          resources=resources(task_cpus, task_memory, task_retries), on_lost=display.lost)
        paths = write_report(out, plot=plot)
    except (Exception, KeyboardInterrupt) as exc:  # one line and an exit code, never a traceback
        _fail(failure_for(exc), out)
    echo(paths["markdown"].read_text(encoding="utf-8"))
    _paths(paths, out, quiet)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="A results folder written by `rlm bench run`.")] = Path("bench-results"),
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Draw plot.png (needs rlm[bench]).")] = True,
) -> None:
    """Write summary.md, summary.json and plot.png from a results folder; print the table."""
    from rlm.bench import write_report
    from rlm.bench.runner import RESULTS_FILE

    try:
        if not (out / RESULTS_FILE).exists():
            raise _bad(f"{out / RESULTS_FILE} does not exist; give the folder `rlm bench run --out` wrote")
        paths = write_report(out, plot=plot)
    except Exception as exc:  # one line and an exit code, never a traceback
        _fail(failure_for(exc), None)
    echo(paths["markdown"].read_text(encoding="utf-8"))
    _paths(paths, out, quiet=False)


@app.command()
def methods() -> None:
    """List the methods and whether this version of rlm can run each."""
    from rlm.bench import METHODS, unavailable_reason

    for name, what in METHODS.items():
        reason = unavailable_reason(name)
        echo(f"{name:<11} {what}" + (f"  [unavailable: {reason}]" if reason else ""))


@app.command()
def task(
    benchmark: Annotated[str, typer.Argument(help="sniah, oolong or oolong-pairs.")],
    length: Annotated[str, typer.Option(help="Context length in tokens.")] = "8k",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    index: Annotated[int, typer.Option(min=0, help="Task index.")] = 0,
    context_out: Annotated[Path | None, typer.Option(help="Also write the context to this file.")] = None,
) -> None:
    """Print one generated task (question, gold answer, details) as JSON."""
    from rlm.bench import TaskSpec, build_task, parse_length

    try:
        made = build_task(TaskSpec(benchmark, parse_length(length), seed, index))
    except Exception as exc:  # one line and an exit code, never a traceback
        _fail(failure_for(exc), None)
    if context_out is not None:
        context_out.write_text(made.context, encoding="utf-8")
    typer.echo(json_text(made.describe(), indent=2))


def _require_plot() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise _bad("the plot needs matplotlib: pip install 'rlm[bench]', or pass --no-plot") from None


def _bad(message: str) -> Exception:
    from rlm.cli.exits import BadInput

    return BadInput(message)


class _Display(ItemsBar):
    """The bench's plan, each run's end and each run lost, on stderr."""

    def plan(self, to_run: int, done: int) -> None:
        if done:
            self.say(f"resuming: {done} run(s) already done, {to_run} to go")
        self.begin(to_run)

    def result(self, result: dict[str, Any]) -> None:
        self.advance(_result_line(result))

    def lost(self, key: str, reason: str) -> None:
        self.say(f"{key}: lost, its Ray worker died ({reason}); run the same command again to do it")


def _result_line(result: dict[str, Any]) -> str:
    outcome = f"score {result['score']:.2f}" if result["status"] != "error" else "failed"
    return f"{result['task_id']} {result['method']}: {outcome}, {result['wall_time']:.1f} s"


def _paths(paths: dict[str, Path], out: Path, quiet: bool) -> None:
    if not quiet:
        written = ", ".join(str(path) for path in paths.values())
        say(f"wrote {written} (results: {out / 'results.jsonl'})")


def _fail(failure: Failure, out: Path | None) -> NoReturn:
    if out is not None and (out / "results.jsonl").exists():
        say(f"finished runs are saved in {out}; run the same command again to resume")
    say(failure.message)
    raise typer.Exit(int(failure.code))
