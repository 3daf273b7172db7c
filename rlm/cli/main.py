"""The `rlm` command: `rlm ask QUERY --context PATH`, `rlm models`, `rlm --version`.

Thin on purpose: it reads options, builds an `RLM_REPL`, prints the answer alone on stdout
(or one JSON object with --json), shows progress and errors on stderr, and exits with a code
from `rlm.cli.exits`, the one place they are defined.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from rlm import __version__
from rlm.cli import batch, bench, endpoints, local, sessions, view
from rlm.cli.exits import ExitCode, Failure, failure_for, no_answer
from rlm.cli.inputs import read_context, read_schema
from rlm.cli.local import LOCAL, local_endpoint
from rlm.cli.output import (
    SANDBOX_HELP,
    SANDBOX_METAVAR,
    command_app,
    echo,
    isolation_warning_held,
    json_text,
    say,
    warn_if_unisolated,
)
from rlm.cli.progress import Progress
from rlm.local import REPLY_TOKENS as LOCAL_REPLY_TOKENS
from rlm.sandbox import AUTO, parse_size
from rlm.utils.prompts import PROMPTS

__all__ = ["app", "run"]

app = command_app(name="rlm", no_args_is_help=True)

_API_URL_HELP = "OpenAI-compatible endpoint (default: $RLM_API_URL, else http://localhost:8080/v1)."
_RETRIES_HELP = "Retries of a failed request (429, 5xx, connection errors) before giving up."


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"rlm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Recursive Language Models: answer questions over contexts far larger than a model's window."""


@app.command()
def ask(
    query: Annotated[str, typer.Argument(metavar="QUERY", help="The question to answer about the context.")],
    context: Annotated[
        str, typer.Option("--context", "-c", metavar="FILE", help="Text file with the context, or - for stdin.")
    ],
    model: Annotated[
        str, typer.Option(metavar="NAME", help="Root model, 'auto' for the endpoint's first model, or 'local' (the "
                          "bundled model).")
    ] = "auto",
    sub_model: Annotated[str, typer.Option(metavar="NAME", help="Sub-model for llm_query, or 'auto'.")] = "auto",
    api_url: Annotated[str | None, typer.Option(metavar="URL", help=_API_URL_HELP)] = None,
    max_iterations: Annotated[int, typer.Option(min=1, metavar="N", help="Root turns before giving up.")] = 20,
    max_reply_tokens: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Cap on each root reply (default: the server's; "
                                 f"{LOCAL_REPLY_TOKENS} with --model local).")
    ] = None,
    context_window: Annotated[
        int | None, typer.Option(min=256, metavar="TOKENS", help="The root model's context window, when the server "
                                 "does not report it (or reports a wrong one).")
    ] = None,
    sandbox: Annotated[str, typer.Option(metavar=SANDBOX_METAVAR, help=SANDBOX_HELP)] = AUTO,
    exec_timeout: Annotated[
        float, typer.Option(min=0.1, metavar="SECONDS", help="Seconds one code cell may run.")
    ] = 120,
    memory_limit: Annotated[
        str, typer.Option(metavar="SIZE", help="Memory of the REPL worker, e.g. 8G, 512M, or none.")
    ] = "4G",
    cpu_time_limit: Annotated[
        float | None, typer.Option(min=1, metavar="SECONDS", help="CPU seconds a REPL worker may use before it is "
                                   "replaced.")
    ] = None,
    prompt: Annotated[str, typer.Option(metavar="|".join(PROMPTS), help="System prompt to use.")] = "default",
    log_dir: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Write the run's trajectory as JSONL here (default: "
                                  "$RLM_LOG_DIR).")
    ] = None,
    keep_logs: Annotated[
        bool, typer.Option("--keep-logs", help="Keep the trajectory ($RLM_LOG_DIR or the user data dir; see rlm runs).")
    ] = False,
    max_retries: Annotated[int, typer.Option(min=0, metavar="N", help=_RETRIES_HELP)] = 3,
    max_depth: Annotated[
        int, typer.Option(min=0, metavar="N", help="1: llm_query calls the sub-model; 2+: rlm_query starts child "
                          "RLMs; 0: none.")
    ] = 1,
    max_cost: Annotated[
        float | None, typer.Option(min=0, metavar="USD", help="Stop at this cost in USD (known prices).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Stop at this many tokens, all calls.")
    ] = None,
    max_sub_calls: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Most calls below the root model.")
    ] = None,
    max_time: Annotated[
        float | None, typer.Option(min=0, metavar="SECONDS", help="Stop after this many seconds.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object: answer, status, usage.")] = False,
    schema_file: Annotated[
        Path | None, typer.Option("--schema", metavar="FILE", help="A JSON schema the answer must match; the "
                                  "answer is printed as JSON.")
    ] = None,
    tools_ref: Annotated[
        str | None, typer.Option("--tools", metavar="MODULE:ATTR", help="Host functions the model may call from the "
                                 "REPL: a dict or list of functions in a module importable from here.")
    ] = None,
    session_name: Annotated[
        str | None, typer.Option("--session", metavar="NAME", help="Continue the session NAME (kept under the runs "
                                 "directory): earlier contexts, questions, answers and REPL variables.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No status line on stderr.")] = False,
) -> None:
    """Answer QUERY about a context too large for the model's window; the answer alone goes to stdout."""
    progress = Progress.for_stderr(max_iterations, quiet=quiet)
    answer: Any = None
    failure: Failure | None = None
    engine = None
    if model == LOCAL and max_reply_tokens is None:
        max_reply_tokens = LOCAL_REPLY_TOKENS  # what the local server caps replies at: the room fitting keeps
    try:
        source = read_context(context, quiet=quiet)
        schema = read_schema(schema_file) if schema_file is not None else None
        tools = _load_tools(tools_ref) if tools_ref is not None else None
        from rlm.rlm_repl import RLM_REPL

        with local_endpoint(model, sub_model, api_url, quiet=quiet) as (model, sub_model, url):
            with isolation_warning_held():
                engine = RLM_REPL(
                    model, sub_model, max_iterations,
                    api_url=url, sandbox=sandbox, system_prompt=prompt, max_retries=max_retries,
                    log_dir=view.ask_log_dir(log_dir, keep_logs), on_event=progress,
                    max_depth=max_depth, max_cost=max_cost, max_tokens=max_tokens, max_sub_calls=max_sub_calls,
                    max_time=max_time, exec_timeout=exec_timeout, max_reply_tokens=max_reply_tokens,
                    context_window=context_window, memory_limit=parse_size(memory_limit), cpu_time_limit=cpu_time_limit,
                    tools=tools,
                )
            warn_if_unisolated(sandbox)
            with progress:
                if session_name is None:
                    answer = engine.completion(context=source, query=query, schema=schema)
                else:
                    answer = sessions.answer_in_session(
                        engine, sessions.session_dir(log_dir, session_name), source, query, say,
                        schema=schema,
                    )
    except (Exception, KeyboardInterrupt) as exc:  # every failure becomes one line and an exit code
        failure = failure_for(exc, api_url=api_url)
    trajectory = engine.tracer.path if engine is not None else None
    if engine is not None:
        engine.close()
    end = progress.end
    if answer is None and failure is None:
        failure = no_answer(end.turns if end else max_iterations, end.status if end else "max_iterations",
                            end.reason if end else None)
    if json_output:
        level = engine.sandbox_level if engine is not None else None
        typer.echo(json_text({**_report(answer, failure, progress, trajectory), "sandbox": level}))
    elif answer is not None:
        echo(json_text(answer) if schema_file is not None else answer)
    if trajectory is not None and not quiet:
        say(f"trajectory: {trajectory}")
    if failure is not None:
        say(failure.message)
        raise typer.Exit(int(failure.code))


def _load_tools(reference: str) -> dict:
    """`--tools module:attr`, the module looked up from the current directory first (as `python -m` would)."""
    import os
    import sys

    from rlm.tools import load_tools

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return load_tools(reference)


@app.command()
def models(
    api_url: Annotated[str | None, typer.Option(metavar="URL", help=_API_URL_HELP)] = None,
    max_retries: Annotated[int, typer.Option(min=0, metavar="N", help=_RETRIES_HELP)] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the endpoint's models (id, and context window when the server tells it)."""
    from rlm.utils.llm import OpenAICompatibleClient, context_window_of

    try:
        client = OpenAICompatibleClient(api_url=api_url, max_retries=max_retries)
        listing = client.list_models()
        client.close()
    except (Exception, KeyboardInterrupt) as exc:  # one line and an exit code, never a traceback
        failure = failure_for(exc, api_url=api_url)
        say(failure.message)
        raise typer.Exit(int(failure.code)) from None
    rows = [{"id": str(entry["id"]), "context_window": context_window_of(entry)} for entry in listing]
    if json_output:
        typer.echo(json_text({"api_url": client.base_url, "models": rows}))
        return
    if not rows:
        say(f"{client.base_url}/models lists no models; load one into your server, or name one with --model")
    width = max((len(row["id"]) for row in rows), default=0)
    for row in rows:
        window = row["context_window"]
        echo(f"{row['id']:<{width}}  {window:,} tokens" if window else row["id"])


bench.register(app)
local.register(app)
view.register(app)
endpoints.register(app)
batch.register(app)


def run() -> None:
    """Console-script entry point (`rlm`, `python -m rlm`)."""
    signal.signal(signal.SIGTERM, _terminate)  # stop like Ctrl-C: workers killed, temp files removed
    app(prog_name="rlm")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _report(answer: Any, failure: Failure | None, progress: Progress, trajectory: Path | None) -> dict[str, Any]:
    end = progress.end
    if answer is not None:
        status = "answered"
    elif failure is not None and failure.code is ExitCode.INTERRUPTED:
        status = "interrupted"
    elif failure is not None and failure.code is ExitCode.BUDGET:
        status = "budget_exceeded"
    elif end is not None and end.status in ("max_iterations", "no_progress"):
        status = end.status
    else:
        status = "error"
    return {
        "answer": answer,
        "status": status,
        "exit_code": int(failure.code if failure is not None else ExitCode.ANSWERED),
        "error": failure.message if failure is not None else None,
        "reason": end.reason if end is not None else None,
        "cost_summary": end.usage if end is not None else None,
        "run_id": end.run_id if end is not None else None,
        "turns": end.turns if end is not None else 0,
        "duration": end.duration if end is not None else None,
        "trajectory": str(trajectory) if trajectory is not None else None,
    }

