"""`rlm mcp` and `rlm api`: serve RLM runs to MCP clients and to OpenAI-compatible clients.

Both take the options of `rlm ask` that configure a run (models, endpoint, sandbox, limits,
budgets), as the ceiling of what a request may ask; `--allow-dir` (the directories whose
files `context_path` may name), `--max-request-size` and `--max-runs`. `RLM_SERVER_KEY`, when
set, is the bearer key HTTP clients must send; without it the server listens only on a
loopback address. The logic is in `rlm.frontends`; this module reads options and reports.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable

import typer

from rlm.cli.exits import BadInput, failure_for
from rlm.cli.local import local_endpoint
from rlm.cli.output import SANDBOX_HELP, SANDBOX_METAVAR, echo, isolation_warning_held, say, sandbox_line, warn_if_unisolated
from rlm.sandbox import AUTO, parse_size
from rlm.utils.prompts import PROMPTS

if TYPE_CHECKING:
    from rlm.frontends.schema import ServerSettings

__all__ = ["register", "mcp", "api"]

KEY_VARIABLE = "RLM_SERVER_KEY"

Model = Annotated[str, typer.Option(
    metavar="NAME", help="Root model of requests that name none: a name, 'auto' (the endpoint's first), 'provider:name', or 'local'.")]
SubModel = Annotated[str, typer.Option(metavar="NAME", help="Sub-model of requests that name none, or 'auto'.")]
ApiUrl = Annotated[str | None, typer.Option(
    metavar="URL", help="OpenAI-compatible endpoint of the models (default: $RLM_API_URL, else http://localhost:8080/v1).")]
MaxIterations = Annotated[int, typer.Option(min=1, metavar="N", help="Root turns per run (a request may ask for fewer).")]
Sandbox = Annotated[str, typer.Option(metavar=SANDBOX_METAVAR, help=SANDBOX_HELP + " Each run has its own worker.")]
ExecTimeout = Annotated[float, typer.Option(min=0.1, metavar="SECONDS", help="Seconds one code cell may run.")]
MemoryLimit = Annotated[str, typer.Option(metavar="SIZE", help="Memory of each REPL worker, e.g. 8G, 512M, or none.")]
CpuTimeLimit = Annotated[float | None, typer.Option(min=1, metavar="SECONDS", help="CPU seconds a REPL worker may use.")]
Prompt = Annotated[str, typer.Option(metavar="|".join(PROMPTS), help="System prompt of the root model.")]
MaxRetries = Annotated[int, typer.Option(min=0, metavar="N", help="Retries of a failed model request.")]
MaxDepth = Annotated[int, typer.Option(min=0, metavar="N", help="Recursion depth per run (a request may ask for less).")]
MaxCost = Annotated[float | None, typer.Option(min=0, metavar="USD", help="USD per run (known prices); requests may only lower it.")]
MaxTokens = Annotated[int | None, typer.Option(min=1, metavar="N", help="Tokens per run, all calls; requests may only lower it.")]
MaxSubCalls = Annotated[int | None, typer.Option(min=1, metavar="N", help="Calls below the root model per run; requests may only lower it.")]
MaxTime = Annotated[float | None, typer.Option(min=0, metavar="SECONDS", help="Seconds per run; requests may only lower it.")]
AllowDir = Annotated[list[Path] | None, typer.Option(
    "--allow-dir", metavar="DIR", help="A directory whose files context_path may name; repeat for more (default: the working directory).")]
MaxRequestSize = Annotated[str, typer.Option(
    metavar="SIZE", help="Largest request, its context included (e.g. 32M); larger contexts go by context_path.")]
MaxRuns = Annotated[int, typer.Option(min=1, max=256, metavar="N", help="Runs at once; further requests wait for a slot.")]
Host = Annotated[str, typer.Option(
    metavar="ADDRESS", help=f"Address to listen on. Other than the loopback, {KEY_VARIABLE} must be set (clients send it as a bearer key).")]


def register(app: typer.Typer) -> None:
    """Add `mcp` and `api` to the `rlm` app."""
    app.command()(mcp)
    app.command()(api)


def mcp(
    http: Annotated[int | None, typer.Option(
        "--http", metavar="PORT", min=0, max=65535,
        help="Serve streamable HTTP at http://HOST:PORT/mcp (0: any free port) instead of stdio.")] = None,
    host: Host = "127.0.0.1",
    model: Model = "auto", sub_model: SubModel = "auto", api_url: ApiUrl = None, max_iterations: MaxIterations = 20,
    sandbox: Sandbox = AUTO, exec_timeout: ExecTimeout = 120, memory_limit: MemoryLimit = "4G",
    cpu_time_limit: CpuTimeLimit = None, prompt: Prompt = "default", max_retries: MaxRetries = 3,
    max_depth: MaxDepth = 1, max_cost: MaxCost = None, max_tokens: MaxTokens = None,
    max_sub_calls: MaxSubCalls = None, max_time: MaxTime = None,
    log_dir: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Where runs are kept, for rlm_runs (default: $RLM_LOG_DIR, else the per-user data dir, as rlm runs).")] = None,
    allow_dir: AllowDir = None, max_request_size: MaxRequestSize = "32M", max_runs: MaxRuns = 8,
) -> None:
    """Serve RLM runs to MCP clients (tools rlm_ask, rlm_runs, rlm_trajectory), on stdio unless --http."""
    options = dict(locals())
    options.pop("http")
    options.pop("host")

    def start(settings: "ServerSettings") -> None:
        from rlm.frontends import mcp_server

        server = mcp_server.create_server(settings, settings.log_dir)
        if http is None:
            say(f"MCP server on stdio; runs are kept in {settings.log_dir}")
            mcp_server.run_stdio(server)
            return
        _serve_http(mcp_server.http_app(server, settings, host, loopback=_loopback(host)), host, http, "/mcp",
                    settings, "the MCP server (streamable HTTP)")

    _run("mcp", "mcp", host if http is not None else "127.0.0.1", options, start)


def api(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, metavar="N", help="Port to listen on (0: any free port).")] = 8765,
    model: Model = "auto", sub_model: SubModel = "auto", api_url: ApiUrl = None, max_iterations: MaxIterations = 20,
    sandbox: Sandbox = AUTO, exec_timeout: ExecTimeout = 120, memory_limit: MemoryLimit = "4G",
    cpu_time_limit: CpuTimeLimit = None, prompt: Prompt = "default", max_retries: MaxRetries = 3,
    max_depth: MaxDepth = 1, max_cost: MaxCost = None, max_tokens: MaxTokens = None,
    max_sub_calls: MaxSubCalls = None, max_time: MaxTime = None,
    log_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Keep each run's trajectory here (default: $RLM_LOG_DIR).")] = None,
    keep_logs: Annotated[bool, typer.Option(
        "--keep-logs", help="Keep trajectories ($RLM_LOG_DIR or the user data dir; see rlm runs).")] = False,
    allow_dir: AllowDir = None, max_request_size: MaxRequestSize = "32M", max_runs: MaxRuns = 8,
) -> None:
    """Serve RLMs as an OpenAI-compatible endpoint: POST /v1/chat/completions with model "rlm:<root model>"."""
    options = dict(locals())
    for name in ("host", "port", "keep_logs"):
        options.pop(name)

    def start(settings: "ServerSettings") -> None:
        from rlm.frontends.api import create_app

        _serve_http(create_app(settings, loopback=_loopback(host)), host, port, "/v1", settings,
                    "RLMs as an OpenAI-compatible endpoint (models rlm:auto, rlm:<model>)")

    from rlm.cli.view import ask_log_dir

    options["log_dir"] = ask_log_dir(log_dir, keep_logs)
    _run("api", "api", host, options, start)


# -- shared by both ------------------------------------------------------------------------------


def _run(command: str, extra: str, host: str, options: dict, start: Callable[["ServerSettings"], None]) -> None:
    """Check the options and the machine, then `start` the server; stop quietly on Ctrl-C / SIGTERM."""
    try:
        _require_extra(command, extra)
        key = os.environ.get(KEY_VARIABLE) or None
        if not _loopback(host) and key is None:
            raise BadInput(f"listening on {host} lets other machines start runs: set {KEY_VARIABLE} to a secret "
                           "that clients send as a bearer key, or keep --host 127.0.0.1")
        with local_endpoint(options["model"], options["sub_model"], options["api_url"], quiet=False) as endpoint:
            options.update(zip(("model", "sub_model", "api_url"), endpoint))  # --model local: its server
            settings = _settings(command, options, key)
            if not _loopback(host):
                say(f"warning: {host} is reachable from other machines; requests must carry the bearer key")
            start(settings)
    except KeyboardInterrupt:
        say("stopped")
    except Exception as exc:  # one line and an exit code, never a traceback
        failure = failure_for(exc)
        say(failure.message)
        raise typer.Exit(int(failure.code)) from None


def _settings(command: str, options: dict, key: str | None) -> "ServerSettings":
    """The server's settings, checked by making one `RLM_REPL` with them (no request is sent)."""
    from rlm.frontends.schema import RunRequest, ServerSettings, allowed_dirs, repl_options
    from rlm.rlm_repl import RLM_REPL
    from rlm.trajectory import cli_log_dir

    if options["sandbox"] == "inprocess":
        raise BadInput(f"rlm {command} runs requests beside each other: --sandbox inprocess would run model code "
                       "inside the server, next to other requests and the key; use auto, bwrap, strict or subprocess")
    log_dir = cli_log_dir(options["log_dir"]) if command == "mcp" else options["log_dir"]
    settings = ServerSettings(
        model=options["model"], sub_model=options["sub_model"], api_url=options["api_url"],
        max_iterations=options["max_iterations"], max_depth=options["max_depth"], sandbox=options["sandbox"],
        exec_timeout=options["exec_timeout"], memory_limit=parse_size(options["memory_limit"]),
        cpu_time_limit=options["cpu_time_limit"], prompt=options["prompt"], max_retries=options["max_retries"],
        max_cost=options["max_cost"], max_tokens=options["max_tokens"], max_sub_calls=options["max_sub_calls"],
        max_time=options["max_time"], log_dir=Path(log_dir) if log_dir is not None else None,
        allow_dirs=allowed_dirs(options["allow_dir"] or []),
        max_request_bytes=_request_size(options["max_request_size"]), max_runs=options["max_runs"], key=key,
    )
    probe = RunRequest(query="-", context="", model=settings.model, sub_model=settings.sub_model,
                       max_iterations=settings.max_iterations, max_depth=settings.max_depth,
                       max_cost=settings.max_cost, max_tokens=settings.max_tokens,
                       max_sub_calls=settings.max_sub_calls, max_time=settings.max_time)
    with isolation_warning_held():
        made = RLM_REPL(**repl_options(settings, probe, lambda event: None))
    made.close()
    warn_if_unisolated(settings.sandbox)
    say(sandbox_line(made.sandbox_level or settings.sandbox, settings.sandbox) + ", one worker per run")
    return settings


def _serve_http(app: Callable, host: str, port: int, path: str, settings: "ServerSettings", what: str) -> None:
    from rlm.frontends.http import serve_http

    def ready(base: str) -> None:
        echo(base + path)
        guard = "bearer key required" if settings.key else f"no key ({KEY_VARIABLE} unset)"
        say(f"serving {what} at {base}{path}; {guard}; Ctrl-C to stop")

    serve_http(app, host, port, ready, max_connections=4 * settings.max_runs + 16)


def _request_size(text: str) -> int:
    size = parse_size(text)
    if size is None:
        raise BadInput("--max-request-size needs a size such as 32M: a server must cap what a request may send")
    return size


def _require_extra(command: str, extra: str) -> None:
    modules = {"mcp": ("mcp",), "api": ("starlette", "uvicorn")}[extra]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise BadInput(f"rlm {command} needs {', '.join(missing)}: pip install 'rlm[{extra}]'")


def _loopback(host: str) -> bool:
    from rlm.frontends.http import is_loopback

    return is_loopback(host)
