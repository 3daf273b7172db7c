"""`rlm view`, `rlm runs` and `rlm replay`: looking at recorded runs, and running them again.

The log directory is `--log-dir`, else `RLM_LOG_DIR`, else the per-user data directory
where `rlm ask --keep-logs` writes (on Linux ~/.local/share/rlm/runs).
"""

from __future__ import annotations

import time
import webbrowser
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from rlm._text import terminal_safe
from rlm.cli.exits import BadInput, ExitCode, Failure, failure_for
from rlm.cli.output import echo, json_text, say

__all__ = ["register", "view", "runs", "replay", "ask_log_dir"]

_LOG_DIR_HELP = "Directory of run files (default: $RLM_LOG_DIR, else the per-user data directory)."


def register(app: typer.Typer) -> None:
    """Add `view`, `runs` and `replay` to the `rlm` app."""
    app.command()(view)
    app.command()(runs)
    app.command()(replay)


def view(
    path: Annotated[Path | None, typer.Argument(metavar="RUN.jsonl", help="A run's file (default: the latest run).")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="HTML file to write (default: next to the run file).")
    ] = None,
    log_dir: Annotated[Path | None, typer.Option(help=_LOG_DIR_HELP)] = None,
    open_page: Annotated[bool, typer.Option("--open", help="Open the page in a web browser.")] = False,
) -> None:
    """Render a run as one self-contained HTML page (tree, totals, timeline, search); prints its path."""
    from rlm.viewer import write_html

    try:
        source = path if path is not None and not path.is_dir() else _latest(path or _log_dir(log_dir))
        written = write_html(source, output)
    except (Exception, KeyboardInterrupt) as exc:  # one line and an exit code, never a traceback
        _fail(_failure(exc))
    echo(str(written))
    if open_page:
        webbrowser.open(written.resolve().as_uri())


def runs(
    log_dir: Annotated[Path | None, typer.Option(help=_LOG_DIR_HELP)] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many recent runs to list.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List recent runs: when, status, turns, sub-calls, cost, question and answer."""
    from rlm.trajectory import TrajectoryError, find_runs, summarize

    directory = _log_dir(log_dir)
    files = find_runs(directory)[:limit]
    if not files:
        say(f"no runs in {directory}; keep some with rlm ask --keep-logs (or --log-dir DIR)")
        return
    rows = []
    for file in files:
        try:
            rows.append(_row(summarize(file)))
        except TrajectoryError as exc:
            rows.append({"file": str(file), "status": "unreadable", "error": str(exc)})
    if json_output:
        for row in rows:
            typer.echo(json_text(row))
        return
    _print_table(rows)


def replay(
    path: Annotated[Path, typer.Argument(metavar="RUN.jsonl", help="The run's trajectory file.")],
    context: Annotated[
        str, typer.Option("--context", "-c", help="The context the run was given: a text file, or - for stdin.")
    ],
    sandbox: Annotated[str | None, typer.Option(help="Sandbox to use (default: the recorded one).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Re-run a recorded run, model replies served from its file; report the first divergence.

    Exit code 0 when the new run matches the recording, 6 when it diverged.
    """
    from rlm.cli.inputs import read_context
    from rlm.replay import replay_run

    try:
        result = replay_run(path, read_context(context, quiet=True), sandbox=sandbox)
    except (Exception, KeyboardInterrupt) as exc:  # one line and an exit code, never a traceback
        _fail(_failure(exc))
    divergence = result.divergence
    if json_output:
        typer.echo(json_text({
            "identical": divergence is None, "status": result.status, "turns": result.turns,
            "answer": result.answer, "recorded_answer": result.recorded_answer,
            "divergence": None if divergence is None else {
                "kind": divergence.kind, "detail": divergence.detail, "run_id": divergence.run_id,
                "turn": divergence.turn, "recorded": divergence.recorded, "now": divergence.now,
            },
        }))
    else:
        echo(result.describe())
    if divergence is not None:
        raise typer.Exit(int(ExitCode.REPLAY_DIVERGED))


def ask_log_dir(log_dir: Path | None, keep_logs: bool) -> str | None:
    """Where `rlm ask` writes its trajectory: --log-dir; with --keep-logs, else $RLM_LOG_DIR, else
    the per-user data directory; without, None (the library then uses $RLM_LOG_DIR if set)."""
    if log_dir is not None:
        return str(log_dir)
    return str(_log_dir(None)) if keep_logs else None


# -- helpers -----------------------------------------------------------------------------------


def _log_dir(option: Path | None) -> Path:
    from rlm.trajectory import cli_log_dir

    return cli_log_dir(option)


def _latest(directory: Path) -> Path:
    from rlm.trajectory import find_runs

    found = find_runs(directory)
    if not found:
        raise BadInput(f"no runs in {directory}; pass a run file, or keep runs with rlm ask --keep-logs")
    return found[0]


def _row(summary: Any) -> dict[str, Any]:
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary.started)), "status": summary.status,
        "turns": summary.turns, "sub_calls": summary.sub_calls, "cost": summary.cost, "query": summary.query,
        "answer": summary.answer, "run_id": summary.run_id, "file": str(summary.path),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'WHEN':<19}  {'STATUS':<15}  {'TURNS':>5}  {'SUBS':>5}  {'COST':>8}  {'QUESTION':<40}  ANSWER"
    echo(header)
    for row in rows:
        if row["status"] == "unreadable":
            echo(f"{'?':<19}  {'unreadable':<15}  {'':>5}  {'':>5}  {'':>8}  {Path(row['file']).name}")
            continue
        cost = "" if row["cost"] is None else f"${row['cost']:.4f}"
        answer = "-" if row["answer"] is None else _short(row["answer"], 40)
        echo(f"{row['when']:<19}  {row['status']:<15}  {row['turns']:>5}  {row['sub_calls']:>5}  {cost:>8}  "
                   f"{_short(row['query'], 40):<40}  {answer}")


def _short(text: str, width: int) -> str:
    line = " ".join(terminal_safe(str(text)).split())  # made safe first, so the width is what shows
    return line if len(line) <= width else line[: width - 3] + "..."


def _failure(exc: BaseException) -> Failure:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return Failure(ExitCode.BAD_INPUT, f"error: cannot use {exc.filename}: {exc.strerror}; check the path")
    return failure_for(exc)


def _fail(failure: Failure) -> NoReturn:
    say(failure.message)
    raise typer.Exit(int(failure.code))

