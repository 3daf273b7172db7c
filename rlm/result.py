"""`RLMResult`: one run's outcome as an object, and `run()` / `arun()`, which return it.

`completion()` keeps the seed's contract (the answer text, or None; errors raised). `run()`
says everything about one run instead, and raises only for a mistake in the call itself
(`ConfigError`): an endpoint that fails, a worker that cannot start or a budget reached end
the run with that status and the error's message, usage and trajectory kept.

    result = rlm.run(context=text, query="...", model="auto")
    if result.status == "final":
        print(result.answer, result.usage["total_cost"])
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlm.errors import BudgetExceeded, ConfigError, RLMError
from rlm.utils.tracing import RunEnd

if TYPE_CHECKING:
    from rlm.rlm_repl import RLM_REPL

__all__ = ["RLMResult", "STATUSES", "run", "arun", "run_with"]

# "final": FINAL / FINAL_VAR ended it; "max_iterations": no final answer in time; "no_progress":
# the model's replies made no progress three times in a row (rlm.stalls); "budget":
# a limit of RLM_REPL (max_cost, max_tokens, max_sub_calls, max_time) was reached; "error":
# an error of ours (the endpoint, the worker, the context) ended it.
STATUSES = ("final", "max_iterations", "no_progress", "budget", "error")
_FROM_RUN_END = {
    "answered": "final", "max_iterations": "max_iterations", "no_progress": "no_progress", "budget_exceeded": "budget",
}


@dataclass(frozen=True)
class RLMResult:
    """What one run came to.

    answer: the final answer (None unless status is "final").
    status: one of STATUSES.
    usage: the run's usage and cost, the whole call tree (the form of `cost_summary()`).
    iterations: root turns taken.
    wall_time: seconds from the call to its end.
    run_id: the run's id (its trajectory file is named after it).
    trajectory_path: the JSONL trajectory, when logging (`log_dir` / `RLM_LOG_DIR`); else None.
    error: for "budget" and "error", what ended the run (its type and message); else None.
    reason: for every status but "final", why the run ended without an answer (for
        "no_progress", how the replies failed; for "error", the same text as `error`).
    """

    answer: Any
    status: str
    usage: dict
    iterations: int
    wall_time: float
    run_id: str
    trajectory_path: str | None
    error: str | None = None
    reason: str | None = None


async def run_with(rlm: "RLM_REPL", context: Any, query: str, *, schema: Any = None) -> RLMResult:
    """Run `rlm` once and describe the outcome (what `RLM_REPL.arun` does)."""
    started = time.monotonic()
    answer, error = None, None
    try:
        answer = await rlm.acompletion(context=context, query=query, schema=schema)
    except ConfigError:
        raise
    except (RLMError, OSError) as exc:  # OSError: a context file that cannot be read
        error = f"{type(exc).__name__}: {exc}"
        failed = exc
    else:
        failed = None
    run_id = rlm.tracer.run_id or ""
    end = next((event for event in reversed(rlm.trace) if isinstance(event, RunEnd) and event.run_id == run_id), None)
    if end is None:  # not begun: nothing was spent
        status, usage, iterations, reason = "error", {}, 0, error
    else:
        status = _FROM_RUN_END.get(end.status, "error")
        status = "budget" if isinstance(failed, BudgetExceeded) else status
        usage, iterations, reason = end.usage, end.turns, end.reason
    path = rlm.tracer.path
    return RLMResult(
        answer=answer, status=status, usage=usage, iterations=iterations, wall_time=time.monotonic() - started,
        run_id=run_id, trajectory_path=str(path) if path is not None else None, error=error, reason=reason,
    )


def run(context: Any, query: str, *, schema: Any = None, **options: Any) -> RLMResult:
    """One run of `RLM_REPL(**options)` on `context` and `query`, as an `RLMResult` (`schema`:
    a typed answer, as in `RLM_REPL.completion`)."""
    from rlm.rlm_repl import RLM_REPL

    with RLM_REPL(**options) as rlm:
        return rlm.run(context=context, query=query, schema=schema)


async def arun(context: Any, query: str, *, schema: Any = None, **options: Any) -> RLMResult:
    """The same as `run()`, awaitable."""
    from rlm.rlm_repl import RLM_REPL

    with RLM_REPL(**options) as rlm:
        return await rlm.arun(context=context, query=query, schema=schema)
