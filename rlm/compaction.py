"""Compaction: the root model summarises the old turns of its conversation near the window's end.

With `RLM_REPL(compact=True)`, once a root request passes `compact_at` of the window (0.85 by
default) the conversation takes old turns out (`Conversation.fit`) and `Summarise`, its
condenser, asks the root model for a summary of them, which stands in their place. The turns'
full text goes into the REPL as `history` first, so nothing is lost to the model's code. A
failed or empty summary falls back to `DropTurns`' note (the turns are dropped, as without
compaction). Between compactions the conversation appends only, so a server's prompt cache
keeps working. Each compaction is a `compaction` trace event.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rlm.conversation import DropTurns, turns_text
from rlm.errors import ClientError
from rlm.sandbox import ContextSource
from rlm.utils import prompts
from rlm.utils.tracing import Compaction

if TYPE_CHECKING:
    from rlm.engine import Run

__all__ = ["DEFAULT_COMPACT_AT", "Summarise", "load_history", "summary_request"]

DEFAULT_COMPACT_AT = 0.85  # share of the root model's window at which old turns are summarised


def summary_request(removed: list[dict]) -> list[dict]:
    """The messages asking the root model to summarise `removed` (role and content each)."""
    transcript = "\n\n".join(f"[{message['role']}]\n{message['content']}" for message in removed)
    return [{"role": "system", "content": prompts.SUMMARY_PROMPT}, {"role": "user", "content": transcript}]


async def load_history(run: "Run") -> None:
    """Put the run's `history` (earlier questions and answers, turns taken out) into its REPL."""
    env = await run.env()
    await run.tree.blocking(env.load_context, ContextSource(value=list(run.history)), "history")


class Summarise:
    """The compaction condenser: the root model's summary of the turns taken out."""

    def __init__(self, run: "Run") -> None:
        self.run = run

    async def condense(self, removed: list[dict], removed_turns: list[int]) -> str:
        run = self.run
        taken = [message for message in removed if "turn" in message]  # not an earlier note
        run.history.extend({"role": m["role"], "content": m["content"], "turn": m["turn"]} for m in taken)
        await load_history(run)
        turns = sorted({message["turn"] for message in taken})
        summary, error, usage, cost = await self._summary(removed)
        run.tree.tracer.emit(Compaction(
            run_id=run.run_id, parent_id=run.parent_id, depth=run.depth, turn=run.turn, removed_turns=turns,
            summary=summary, usage=usage, cost=cost, error=error,
        ))
        if not summary:
            return await DropTurns().condense(removed, removed_turns)
        return prompts.compaction_note(turns_text(removed_turns), summary)

    async def _summary(self, removed: list[dict]) -> tuple[str, str | None, dict, float | None]:
        """The summary text ("" on failure), the failure, the call's usage and cost."""
        run = self.run
        try:
            completion = await run.tree.model_call(
                run.client, summary_request(removed), run.settings.reply_tokens, sub_call=run.depth > 0
            )
        except ClientError as exc:  # the fallback: the turns are dropped with a note
            return "", f"{type(exc).__name__}: {exc}", {}, None
        cost = run.tree.record("root", run.depth, run.client.model, run.client.base_url, completion.usage)
        usage = dataclasses.asdict(completion.usage)
        if not completion.text.strip():
            return "", "the model sent an empty summary", usage, cost
        return completion.text.strip(), None, usage, cost
