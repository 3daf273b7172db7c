"""Multi-turn sessions: one REPL worker, its variables and the questions asked, kept across completions.

    import rlm
    with rlm.session(model="auto") as s:
        s.completion(context=report, query="Which quarter had the most revenue?")
        s.completion(context=memo, query="Does the memo agree with that?")
        print(s.cost_summary()["total_cost"])

Each `completion()` is a run of its own (its own trajectory, usage and `run_end`), but the
REPL worker is the same: the first context is `context` (and `context_0`), later ones are
`context_1`, `context_2`...; variables, imports and functions stay; `history` lists the
earlier questions and answers. Closing the session frees the worker. A completion that fails
(an endpoint error, a budget reached) closes the worker too, since a cell may still be running
in it: the next completion starts a new one and the model is told the earlier variables are
gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlm.errors import ConfigError
from rlm.repl import REPLEnv
from rlm.sandbox import ContextSource, SubCallFailed
from rlm.utils import prompts

if TYPE_CHECKING:
    from rlm.engine import Run
    from rlm.rlm_repl import RLM_REPL

__all__ = ["Session", "session"]

_LOST_NOTE = (
    "The REPL of the earlier questions of this session was closed after an error: their variables and "
    "contexts are gone; `history` still lists the earlier questions and answers."
)


class Session:
    """Completions that share one REPL worker and a `history` (see the module's docstring).

    Attributes:
        rlm: the `RLM_REPL` answering (its settings, clients, trace and ledger).
        history: the earlier questions and answers, as the REPL's `history` holds them: dicts
            with "role" ("user": a question, "assistant": its answer), "content", "completion".
        usage: each completion's own usage and cost (the form of `cost_summary()`), in order.
        workers_started: REPL workers this session has started (1 unless one was lost).
    """

    def __init__(self, rlm: "RLM_REPL", *, owned: bool = False) -> None:
        self.rlm = rlm
        self.history: list[dict] = []
        self.usage: list[dict] = []
        self.workers_started = 0
        self.note: str | None = None  # said with the next question (the engine's KeptREPL)
        self._owned = owned
        self._start = len(rlm.ledger.records())  # the ledger's records before this session
        self._env: REPLEnv | None = None
        self._run: "Run | None" = None
        self._contexts = 0
        self._closed = False
        self._restoring: tuple[list[ContextSource], list[str]] | None = None
        self._variables_lost = False  # a kept session continued without its cells run again
        self.replay_error: str | None = None  # why the replayed cells of `restore()` did not all run cleanly

    def completion(self, context: Any, query: str, **options: Any) -> Any:
        """Answer `query` about `context` in this session's REPL; the same contract as
        `RLM_REPL.completion()` (None without a final answer)."""
        from rlm.rlm_repl import _run_sync

        return _run_sync(self.acompletion(context=context, query=query, **options))

    async def acompletion(self, context: Any, query: str, **options: Any) -> Any:
        """The same as `completion()`, awaitable."""
        if self._closed:
            raise ConfigError("this session is closed; start another with rlm.session()")
        lost = self._env is None and self.history and self._restoring is None
        index = self._contexts or (len(self._restoring[0]) if self._restoring else 0)
        self.note = prompts.session_note(index, not self._variables_lost) if index else (_LOST_NOTE if lost else None)
        first = len(self.rlm.ledger.records())
        self.rlm._session_repl = self
        answer: Any = None
        try:
            answer = await self.rlm.acompletion(context=context, query=query, **options)
        except BaseException:
            self._drop_env()  # a cell may still run in it (a run stopped mid-cell)
            raise
        finally:
            self.rlm._session_repl = None
            self._run = None
            self.usage.append(self.rlm.ledger.summary(since=first))
        number = sum(message["role"] == "user" for message in self.history)
        self.history += [
            {"role": "user", "content": query, "completion": number},
            {"role": "assistant", "content": None if answer is None else str(answer), "completion": number},
        ]
        return answer

    def restore(self, contexts: list[ContextSource], history: list[dict], cells: list[str] | None) -> None:
        """Continue a session kept elsewhere (`rlm ask --session`): its earlier contexts (loaded
        as `context_0`..., when the worker starts), questions and answers, and the cells to run
        again to re-create its variables (without sub-calls: a cell making one fails, and
        `replay_error` says which); None: the variables are gone, and the model is told."""
        if self._env is not None or self.history:
            raise ConfigError("restore() continues a kept session: call it before the first completion")
        self.history = list(history)
        self._restoring = (list(contexts), list(cells or []))
        self._variables_lost = cells is None

    def cost_summary(self) -> dict[str, Any]:
        """The usage and cost of every completion of this session, summed (`cost_summary()`'s form)."""
        return self.rlm.ledger.summary(since=self._start)

    def close(self) -> None:
        """Free the REPL worker (and the clients, when the session made its `RLM_REPL`)."""
        self._closed = True
        self._drop_env()
        if self._owned:
            self.rlm.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the engine's KeptREPL --------------------------------------------------------------

    def open(self, run: "Run", source: ContextSource) -> tuple[REPLEnv, dict]:
        """The session's REPL (started by the first completion) with `source` loaded as the
        next `context_<n>`, and `history` brought up to date (in a pool thread)."""
        self._run = run
        if self._env is None:
            self._env = run.new_env(bridge=self._forward)
            self.workers_started += 1
            self._contexts = 0
            if self._restoring is not None:
                self._replay(self._env, *self._restoring)
        env = self._env
        env.run_id, env.parent_id, env.depth = run.run_id, run.parent_id, run.depth
        info = env.load_context(source, f"context_{self._contexts}")
        env.load_context(ContextSource(value=list(self.history)), "history")
        self._contexts += 1
        return env, info

    def _replay(self, env: REPLEnv, contexts: list[ContextSource], cells: list[str]) -> None:
        """Load a kept session's contexts and run its cells again, untraced, sub-calls refused."""
        self._restoring = None
        for source in contexts:
            env.load_context(source, f"context_{self._contexts}")
            self._contexts += 1
        run, self._run = self._run, None
        try:
            for number, code in enumerate(cells, start=1):
                result = env.sandbox.run(code, timeout=env.exec_timeout, max_output=env.max_output_length)
                if result.error is not None and self.replay_error is None:
                    last = result.error.splitlines()[-1]
                    self.replay_error = f"cell {number} of {len(cells)} failed when run again: {last}"
        finally:
            self._run = run

    def _forward(self, kind: str, items: list) -> list:
        """The worker's sub-calls and tool calls go to the run of the moment."""
        run = self._run
        if run is None:
            raise SubCallFailed("cells run again to restore a session make no sub-calls or tool calls")
        return run._bridge(kind, items)

    def _drop_env(self) -> None:
        env, self._env = self._env, None
        self._contexts = 0
        if env is not None:
            env.close()


def session(rlm: "RLM_REPL | None" = None, **options: Any) -> Session:
    """A multi-turn session over `rlm`, or over a new `RLM_REPL(**options)` that it closes."""
    if rlm is not None and options:
        raise ConfigError("pass either an RLM_REPL or its options to rlm.session(), not both")
    if rlm is not None:
        return Session(rlm)
    from rlm.rlm_repl import RLM_REPL

    return Session(RLM_REPL(**options), owned=True)
