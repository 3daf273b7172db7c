"""`rlm mcp`: RLM runs as the tools of an MCP server (the official `mcp` SDK), over stdio or HTTP.

Tools:

- `rlm_ask(query, context_text | context_path, model, sub_model, max_iterations, max_depth,
  max_cost, max_tokens, max_sub_calls, max_time)`: one RLM run; returns the answer, status
  ("final", "max_iterations", "budget"), usage over the whole call tree, turns, seconds, run id
  and trajectory path. A run that fails (the endpoint, the sandbox) is a tool error saying why.
  The options are checked by `rlm.frontends.schema` (only ever lowering the server's limits).
- `rlm_runs(limit)`: the newest runs of the log directory; `rlm_trajectory(run_id)`: one of
  them turn by turn (`rlm.frontends.history`).

A client that sends a progress token gets a notification for each progress line of the run
(the sandbox, each root turn with its totals, each finished batch of sub-calls). A cancelled
call, or a client gone, stops the run and closes its worker.

Over stdio the protocol owns stdout: nothing else is printed there. Over HTTP
(`--http PORT`) the SDK's streamable HTTP app is served at /mcp, behind the bearer key and
Host checks of `rlm.frontends.http`, with the request cap as the SDK's body limit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Callable

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from rlm import __version__
from rlm.errors import ConfigError, ContextError
from rlm.frontends.history import outline, recent_runs
from rlm.frontends.http import LoopbackOnly, RequireKey
from rlm.frontends.runs import RunHandle
from rlm.frontends.schema import ServerSettings, parse_run_request

__all__ = ["create_server", "http_app", "run_stdio"]

_INSTRUCTIONS = (
    "rlm answers questions about texts far larger than a model's context window (a Recursive Language "
    "Model: the text is loaded into a sandboxed Python REPL that a model explores with code and sub-calls). "
    "Call rlm_ask with the question and the text (context_text) or a file (context_path). "
    "rlm_runs and rlm_trajectory show earlier runs."
)

ModelName = Annotated[str | None, Field(
    description="A model of the server's endpoint, or 'auto'; leave out for the server's default.")]


def create_server(settings: ServerSettings, log_dir: Path) -> MCPServer:
    """The MCP server of `rlm mcp`, its tools bound to `settings`; runs are logged in `log_dir`."""
    server = MCPServer("rlm", instructions=_INSTRUCTIONS, version=__version__, log_level="WARNING")
    slots = asyncio.Semaphore(settings.max_runs)
    server.add_tool(_asker(settings, slots), name="rlm_ask", title="Ask an RLM",
                    annotations=ToolAnnotations(read_only_hint=True, open_world_hint=True))
    server.add_tool(_runs_tool(log_dir), name="rlm_runs", title="Recent RLM runs",
                    annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    server.add_tool(_trajectory_tool(log_dir), name="rlm_trajectory", title="One RLM run, turn by turn",
                    annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    return server


def run_stdio(server: MCPServer) -> None:
    """Serve one client over stdin / stdout until it closes them."""
    asyncio.run(server.run_stdio_async())


def http_app(server: MCPServer, settings: ServerSettings, host: str, *, loopback: bool) -> Callable:
    """The streamable HTTP app (at /mcp) behind the bearer key and, on loopback, the Host check."""
    app = server.streamable_http_app(host=host, max_request_body_size=settings.max_request_bytes)
    keyed = RequireKey(app, settings.key)
    return LoopbackOnly(keyed) if loopback else keyed


def _asker(settings: ServerSettings, slots: asyncio.Semaphore) -> Callable:
    async def rlm_ask(
        query: Annotated[str, Field(description="The question to answer about the context.")],
        ctx: Context,
        context_text: Annotated[str | None, Field(description="The context itself, as text.")] = None,
        context_path: Annotated[str | None, Field(
            description="Or a text file on the server's machine, under a directory it allows.")] = None,
        model: ModelName = None,
        sub_model: ModelName = None,
        max_iterations: Annotated[int | None, Field(description="Root turns; at most the server's.")] = None,
        max_depth: Annotated[int | None, Field(description="Recursion depth; at most the server's.")] = None,
        max_cost: Annotated[float | None, Field(description="USD budget of the run; at most the server's.")] = None,
        max_tokens: Annotated[int | None, Field(description="Token budget of the run; at most the server's.")] = None,
        max_sub_calls: Annotated[int | None, Field(description="Most calls below the root model.")] = None,
        max_time: Annotated[float | None, Field(description="Seconds; at most the server's.")] = None,
    ) -> dict[str, Any]:
        """Answer a question about a context far larger than a model's window with a Recursive
        Language Model: the context goes into a sandboxed Python REPL that the model explores with
        code and sub-model calls. Give the context as context_text or as context_path. Returns the
        answer (null when the run ended without one), its status, usage and trajectory."""
        fields = {
            "query": query, "context": context_text, "context_path": context_path, "model": model,
            "sub_model": sub_model, "max_iterations": max_iterations, "max_depth": max_depth, "max_cost": max_cost,
            "max_tokens": max_tokens, "max_sub_calls": max_sub_calls, "max_time": max_time,
        }
        try:
            handle = await RunHandle.start(settings, parse_run_request(fields, settings), slots)
        except (ConfigError, ContextError) as exc:
            raise ToolError(str(exc)) from None
        forward = asyncio.ensure_future(_forward_progress(handle, ctx))
        try:
            result = await handle.result()
        except ConfigError as exc:
            raise ToolError(str(exc)) from None
        finally:
            forward.cancel()
        if result.status == "error":
            where = f"; trajectory: {result.trajectory_path}" if result.trajectory_path else ""
            raise ToolError(f"the run failed: {result.error} (run {result.run_id}{where})")
        return {
            "answer": result.answer, "status": result.status, "error": result.error, "usage": result.usage,
            "iterations": result.iterations, "wall_time": round(result.wall_time, 3), "run_id": result.run_id,
            "trajectory_path": result.trajectory_path,
        }

    return rlm_ask


async def _forward_progress(handle: RunHandle, ctx: Context) -> None:
    """Each progress line as a progress notification (none when the client sent no token)."""
    sent = 0
    while True:
        line = await handle.lines.get()
        sent += 1
        await ctx.report_progress(sent, None, line)


def _runs_tool(log_dir: Path) -> Callable:
    async def rlm_runs(
        limit: Annotated[int, Field(ge=1, le=200, description="How many recent runs.")] = 20,
    ) -> dict[str, Any]:
        """The most recent RLM runs kept by this server (and by `rlm ask --keep-logs`): when, status,
        turns, sub-calls, cost, question and answer, and each run's id for rlm_trajectory."""
        return {"log_dir": str(log_dir), "runs": await asyncio.to_thread(recent_runs, log_dir, limit)}

    return rlm_runs


def _trajectory_tool(log_dir: Path) -> Callable:
    async def rlm_trajectory(
        run_id: Annotated[str, Field(description="A run id from rlm_runs or rlm_ask.")],
    ) -> dict[str, Any]:
        """One earlier RLM run turn by turn: the root model's replies, each code cell with its output,
        the sub-calls and child runs it made, the answer and the totals (long texts are shortened)."""
        try:
            return await asyncio.to_thread(outline, log_dir, run_id)
        except ConfigError as exc:
            raise ToolError(str(exc)) from None

    return rlm_trajectory
