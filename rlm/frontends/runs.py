"""One request's run, as the front ends drive it: started, watched, and stopped when its caller leaves.

Each request gets its own `RLM_REPL` (its own clients, usage ledger, trace and REPL worker at
the server's sandbox level), run in an asyncio task of its own. The front end waits on the
task, reads its progress lines, and calls `stop()` when the caller is gone: the task is
cancelled once, as asyncio cancels, and waited for while the engine closes the run's
worker, shielded from the caller's own cancellation (anyio, under MCP and Starlette, would
otherwise cancel every wait of that clean-up again).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import anyio

from rlm.cli.progress import Progress
from rlm.frontends.schema import RunRequest, ServerSettings, repl_options

if TYPE_CHECKING:
    from rlm.result import RLMResult
    from rlm.rlm_repl import RLM_REPL

__all__ = ["RunHandle", "STOP_WAIT"]

STOP_WAIT = 10.0  # seconds stop() waits for a cancelled run to close its worker


class RunHandle:
    """A request's run in its own task; `lines` receives its progress lines as they happen."""

    def __init__(self, rlm: "RLM_REPL", request: RunRequest, slots: asyncio.Semaphore, lines: asyncio.Queue) -> None:
        self.rlm = rlm
        self.request = request
        self.lines: asyncio.Queue[str] = lines
        self.task: asyncio.Task[RLMResult] = asyncio.ensure_future(self._run(slots))

    @classmethod
    async def start(cls, settings: ServerSettings, request: RunRequest, slots: asyncio.Semaphore) -> "RunHandle":
        """Make the request's `RLM_REPL` (a bad model or option raises here, before anything
        runs) and start its run, which waits for one of `slots` first."""
        from rlm.rlm_repl import RLM_REPL

        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def queue_line(line: str) -> None:  # trace events come from the pool's threads too
            loop.call_soon_threadsafe(lines.put_nowait, line)

        progress = Progress(request.max_iterations, "plain", on_line=queue_line)
        rlm = await asyncio.to_thread(lambda: RLM_REPL(**repl_options(settings, request, progress)))
        return cls(rlm, request, slots, lines)

    async def _run(self, slots: asyncio.Semaphore) -> "RLMResult":
        try:
            if slots.locked():
                self.lines.put_nowait("waiting for a free slot: this server runs a limited number of runs at once")
            async with slots:
                return await self.rlm.arun(context=self.request.context, query=self.request.query)
        finally:
            self.rlm.close()
            if hasattr(self.request.context, "close"):
                self.request.context.close()  # a context_path file, opened when it was checked

    async def result(self) -> "RLMResult":
        """The run's result. If the caller is cancelled while waiting, the run is stopped first."""
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Cancel the run and wait (at most `STOP_WAIT` seconds) until its worker is closed."""
        self.task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait({self.task}, timeout=STOP_WAIT)
        if self.task.done() and not self.task.cancelled():
            self.task.exception()  # retrieved: a run that failed as it was stopped has no one to tell
