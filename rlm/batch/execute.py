"""Running items: one item (`run_item`, the same function locally and in a Ray task), and the
local path (`run_local`: `concurrency` runs at once on one event loop of this process).

An item's run is `rlm.arun(...)` with its own `RLM_REPL`, so its own sandboxed worker. What
comes back is the item's result line without its id: a failure of the run (the endpoint, the
worker, the context file, a budget) is its status and error, never an exception. Only a bug
raises.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from rlm.errors import RLMError

__all__ = ["Payload", "arun_item", "run_item", "run_local"]

# What one item's run needs, all plain data (it crosses to Ray workers): "query", either
# "context" or "context_path", "arguments" (for RLM_REPL) and "log_dir" ("" writes no trajectory).
Payload = dict[str, Any]


async def arun_item(payload: Payload) -> dict[str, Any]:
    """Run one item; its result line, less the id."""
    from rlm.result import arun

    started = time.monotonic()
    path = payload.get("context_path")
    context = Path(path) if path is not None else payload["context"]
    try:
        result = await arun(context=context, query=payload["query"], log_dir=payload["log_dir"], **payload["arguments"])
    except RLMError as exc:  # an option this item's RLM_REPL refused, or a sandbox level this machine lacks
        return {"answer": None, "status": "error", "usage": {}, "wall_time": round(time.monotonic() - started, 4),
                "trajectory": None, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "answer": result.answer, "status": result.status, "usage": result.usage,
        "wall_time": round(result.wall_time, 4), "trajectory": result.trajectory_path,
        "error": result.error or (result.reason if result.status != "final" else None),
    }


def run_item(payload: Payload) -> dict[str, Any]:
    """`arun_item` for a caller without an event loop (a Ray task)."""
    return asyncio.run(arun_item(payload))


def run_local(
    jobs: Iterator[tuple[str, Payload]],
    concurrency: int,
    on_done: Callable[[str, dict[str, Any]], None],
) -> None:
    """Run every (key, payload) of `jobs`, `concurrency` at a time, on an event loop of this
    thread; `on_done(key, result)` as each ends, in this thread. Payloads are made only as
    runs start, so inline contexts are held only while in flight. Interrupted (Ctrl-C,
    SIGTERM), the runs in flight are cancelled and their sandboxes closed; nothing is recorded
    for them."""
    asyncio.run(_run_all(jobs, concurrency, on_done))


async def _run_all(
    jobs: Iterator[tuple[str, Payload]], concurrency: int, on_done: Callable[[str, dict[str, Any]], None]
) -> None:
    running: dict[asyncio.Task, str] = {}
    try:
        for key, payload in jobs:
            while len(running) >= concurrency:
                await _collect(running, on_done)
            running[asyncio.create_task(arun_item(payload), name=f"rlm-batch {key}")] = key
        while running:
            await _collect(running, on_done)
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def _collect(running: dict[asyncio.Task, str], on_done: Callable[[str, dict[str, Any]], None]) -> None:
    done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        key = running.pop(task)
        on_done(key, task.result())  # a bug in a run raises here, and stops the batch
