"""The RLM loop at any depth, and what one call tree shares: limiter, budget, cache, ledger, trace.

`Tree` is one top-level `acompletion()`: every run in it (the root loop and any child RLM
started with `rlm_query`) shares one concurrency limiter, one budget, one sub-call cache,
one usage ledger and one trace. `Run` is one RLM loop: ask its root model, run the reply's
code in its own REPL, feed the output back, stop at a valid final answer.

Blocking work (starting a REPL worker, running a cell) goes to the tree's thread pool; the
code in a cell reaches back into the event loop for `llm_query` and `rlm_query`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import threading
import time
from typing import Any, Awaitable, Callable, Protocol

from rlm._pool import TreePool
from rlm._text import clean_text, truncate_middle
from rlm.compaction import Summarise
from rlm.conversation import Conversation, Fit, reply_room, too_long
from rlm.errors import BudgetExceeded, ClientError, ContextError, ContextWindowExceeded, MalformedResponse
from rlm.parsing import ParsedReply, parse_reply
from rlm.repl import REPLEnv, SandboxFactory
from rlm.sandbox import ContextSource, ExecResult, SandboxLimits, SubCallFailed
from rlm.sandbox.base import ChildQuery
from rlm.sandbox.describe import describe_context
from rlm.schema import AnswerSchema
from rlm.stalls import StallWatch
from rlm.usage import CallRecord, Usage, UsageLedger, price_call
from rlm.utils import prompts
from rlm.tools import Tool, call_tool, tool_specs
from rlm.utils.llm import Completion, LLMClient
from rlm.utils.tracing import Final, LLMCall, RunStart, SubCall, ToolCall, Tracer, new_run_id

__all__ = ["BATCH_ERROR_PREFIX", "KeptREPL", "Limits", "Run", "Settings", "Tree", "recorded_settings"]

_UNWIND_WAIT = 1.0  # seconds a stopped run waits for its running cell to unwind before closing it
_FEEDBACK_ROOM = 4_096  # room for block labels and notes around outputs cut to max_output_length
# The reply of a batch item that failed (llm_query_batched, rlm_query_batched), before its error.
BATCH_ERROR_PREFIX = "[sub-call error] "
# Few tokenizers pack more characters of text in a token: a sub-call prompt longer than this many
# characters a token times the sub-model's window surely cannot fit, and is refused unsent.
_SURE_CHARS_PER_TOKEN = 4.0
_SMALLEST_WINDOW = 4_096  # tokens: a shorter prompt fits any sub-model, so its window is not looked up


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """Budgets of one call tree, enforced on the host. None means no limit."""

    max_cost: float | None = None  # USD, known prices only
    max_tokens: int | None = None  # input + output tokens of every call in the tree
    max_sub_calls: int | None = None  # calls below the top-level root model (cache hits excluded)
    max_time: float | None = None  # seconds of wall time for the whole tree


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How every run of a tree behaves (built once by RLM_REPL)."""

    root_client: LLMClient
    sub_client: LLMClient
    max_iterations: int
    max_output_length: int
    exec_timeout: float
    sandbox: str | SandboxFactory
    prompt: str  # a prompt name or custom text, filled per depth
    sub_call_chars: int
    context_window: int | None
    reply_tokens: int | None
    max_depth: int
    max_concurrency: int
    cache: bool
    limits: Limits
    sandbox_limits: SandboxLimits = SandboxLimits()  # memory, CPU time, file size of each worker
    sandbox_asked: str | None = None  # the name the caller gave ("auto") when `sandbox` is what it resolved to
    tools: dict[str, Tool] = dataclasses.field(default_factory=dict)  # host tools of the top run
    sub_tools: dict[str, Tool] = dataclasses.field(default_factory=dict)  # ... and of child runs
    sub_context_window: int | None = None  # the sub-model's window in tokens, when the server does not say it
    # the other sub-models llm_query(prompt, model=name) may choose (RLM_REPL(sub_models=...)), by name
    sub_models: dict[str, LLMClient] = dataclasses.field(default_factory=dict)
    compact_at: float | None = None  # share of the window at which old root turns are summarised (rlm.compaction)


class KeptREPL(Protocol):
    """A REPL that outlives its runs: a multi-turn session's (`rlm.session`)."""

    history: list[dict]  # earlier questions and answers: the start of each run's `history`
    note: str | None  # added to the first user message (which context this question has)

    def open(self, run: "Run", source: ContextSource) -> tuple[REPLEnv, dict]:
        """The REPL, made for `run` or kept from an earlier one, with `source` loaded (in a pool thread)."""
        ...


class Tree:
    """State shared by every run of one top-level call."""

    def __init__(
        self, settings: Settings, ledger: UsageLedger, tracer: Tracer, schema: AnswerSchema | None = None
    ) -> None:
        self.settings = settings
        self.schema = schema  # what the top run's final answer must match (`completion(schema=...)`)
        self.ledger = ledger
        self.tracer = tracer
        self.started = time.monotonic()
        self.first_record = len(ledger.records())
        self.limiter = asyncio.Semaphore(settings.max_concurrency)
        self._child_slots: dict[int, asyncio.Semaphore] = {}  # depth -> room for child runs (child_slot)
        self.cache: dict[tuple[str, str], asyncio.Future] | None = {} if settings.cache else None
        self.executor = TreePool()  # blocking work: cells, REPL starts and closes
        self.window: int | None = settings.context_window
        self.sub_windows: dict[str, int] = {}  # each sub-model's window, asked of its server once (0: unknown)
        self.last_root_reply: str | None = None
        self._releasing: list[tuple[concurrent.futures.Future, concurrent.futures.Future]] = []  # closing, opening

    async def blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (a cell, a worker start) in the tree's thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def check_budget(self, new_sub_calls: int = 0) -> None:
        """Raise BudgetExceeded if a limit is reached, or would be passed by `new_sub_calls` more.

        Cost, tokens and time are spent once they reach the limit; sub-calls only when more
        would be made than allowed (a root turn after exactly `max_sub_calls` is fine).
        """
        limits = self.settings.limits
        cost, tokens, sub_calls = self.ledger.totals(self.first_record)
        elapsed = time.monotonic() - self.started
        for name, allowed, spent in (
            ("max_cost", limits.max_cost, cost),
            ("max_tokens", limits.max_tokens, tokens),
            ("max_time", limits.max_time, elapsed),
        ):
            if allowed is not None and spent >= allowed:
                raise BudgetExceeded(name, allowed, spent)
        allowed = limits.max_sub_calls
        if allowed is not None and sub_calls + new_sub_calls > allowed:
            raise BudgetExceeded("max_sub_calls", allowed, sub_calls)

    async def model_call(
        self, client: LLMClient, messages: list[dict], max_tokens: int | None = None, *, sub_call: bool
    ) -> Completion:
        """One model request under the tree's limiter, after a budget check (`sub_call`: it
        counts against max_sub_calls: any call below the top-level root model)."""
        async with self.limiter:
            self.check_budget(new_sub_calls=1 if sub_call else 0)
            return await client.acomplete(messages, max_tokens=max_tokens)

    def record(self, role: str, depth: int, model: str, base_url: str, usage: Usage, hit: bool = False) -> float | None:
        cost = 0.0 if hit else price_call(model, base_url, usage)
        self.ledger.add(CallRecord(role, depth, model, usage, cost, cache_hit=hit))
        return cost

    async def child_slot(self, depth: int) -> asyncio.Semaphore:
        """Wait for room for one more child run at `depth` and take it; `free_slot` gives it back.

        At most `max_concurrency` child runs, each with its own REPL worker, are alive at once
        at each depth (a batch of 200 `rlm_query` items starts them as others end). Per depth,
        not for the whole tree: a run waiting for room for its children holds its own, which
        children never wait for, so no two runs can wait on each other.
        """
        slots = self._child_slots.setdefault(depth, asyncio.Semaphore(self.settings.max_concurrency))
        await slots.acquire()
        return slots

    def free_slot(self, slots: asyncio.Semaphore, closing: "concurrent.futures.Future | None") -> None:
        """Give a child run's room back once its REPL is closed (`closing`; None: closed already)."""
        if closing is None or closing.done():
            slots.release()
            return
        loop = asyncio.get_running_loop()

        def closed(_: object) -> None:  # in the pool thread that closed the REPL
            if not loop.is_closed():  # (`close()` waits for every REPL: the loop runs until then)
                loop.call_soon_threadsafe(slots.release)

        closing.add_done_callback(closed)

    def release(self, opening: "concurrent.futures.Future[tuple[REPLEnv, dict]]") -> "concurrent.futures.Future | None":
        """Close a finished run's REPL (once it is open) in the background: a child's answer
        need not wait for its worker to die. `close()` waits for every one. A child unwinding
        after its tree has ended (cancelled with it) closes its REPL here and now. Returns the
        closing, or None once it is done."""
        closing = self.executor.submit_unless_shut(_close_opened, opening)
        if closing is None:
            _close_opened(opening)
        else:
            self._releasing.append((closing, opening))
        return closing

    async def close(self) -> BaseException | None:
        """Wait for every REPL to close, then end the tree's share of the pool. Returns the
        first failure to close one (after trying them all), for the caller to raise unless it
        is already raising the run's own error."""
        outcomes: list = []
        try:
            outcomes = await asyncio.gather(
                *(asyncio.wrap_future(closing) for closing, _ in self._releasing), return_exceptions=True
            )
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            for closing, opening in self._releasing:
                if closing.cancelled():  # interrupted before the pool got to it
                    _close_opened(opening)
        return next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)


def _close_opened(opening: "concurrent.futures.Future[tuple[REPLEnv, dict]]") -> None:
    """Close the REPL `opening` makes, once made. One that failed to open has nothing to close
    (its error went to its run, or that run had already failed for another reason)."""
    if opening.cancelled() or opening.exception() is not None:
        return
    opening.result()[0].close()


class Run:
    """One RLM loop at `depth` (0 for the top level), with its own REPL session."""

    def __init__(
        self, tree: Tree, *, depth: int, parent_id: str | None, client: LLMClient, run_id: str | None = None,
        origin: dict | None = None, repl: "KeptREPL | None" = None,
    ) -> None:
        self.tree = tree
        self.origin = origin or {}  # a child run: the parent's turn, cell and batch item that started it
        self.kept = repl  # a session's REPL, which outlives this run; None: the run opens and closes its own
        self.history: list[dict] = list(repl.history) if repl is not None else []  # `history` in the REPL
        self.cell = 0  # cells run so far (the index of the running one), as the exec events count them
        self.depth = depth
        self.parent_id = parent_id
        self.client = client
        self.run_id = run_id or new_run_id()
        self._loop_ref = asyncio.get_running_loop()
        self.turn = 0
        self.settings = tree.settings
        self.can_sub_call = depth < self.settings.max_depth
        self.can_recurse = depth + 1 < self.settings.max_depth
        self.tools = self.settings.tools if depth == 0 else self.settings.sub_tools
        self._waiting: set[concurrent.futures.Future] = set()  # cells' sub-calls being answered
        self._waiting_lock = threading.Lock()
        self._ended = False
        self._cell: concurrent.futures.Future | None = None  # the cell running now, or the last one
        self.status = "max_iterations"  # how a run without an answer ended: or "no_progress"
        self.reason: str | None = None  # why it ended so
        self._learned_window: int | None = None  # the window a server stated when it refused a request
        self.closing: concurrent.futures.Future | None = None  # its REPL closing, once the run has ended
        self.value: Any = None  # the validated answer, when the tree has a schema (the top run only)

    async def answer(self, query: str, source: ContextSource) -> str | None:
        """Run the loop to a final answer, or None without one (`status` and `reason` say why:
        max_iterations turns used, or no progress).

        The REPL starts in the pool while the model writes its first reply, when the host can
        describe the context as the worker would (text, or a list of texts).
        """
        opening = self._opening = self.tree.executor.submit(self._open_env, source)
        try:
            info = self._described(source)
            sandbox = self.settings.sandbox
            if info is None or not isinstance(sandbox, str):
                env, info = await asyncio.wrap_future(opening)
                sandbox = env.sandbox.name
            system = prompts.system_prompt(
                self.settings.prompt, sub_chars=self.settings.sub_call_chars,
                max_output=self.settings.max_output_length, sub_calls=self.can_sub_call, recursion=self.can_recurse,
            ) + prompts.tools_note(self.tools.values())
            self.tree.tracer.emit(RunStart(
                run_id=self.run_id, parent_id=self.parent_id, depth=self.depth, query=query, context=info,
                root_model=self.client.model, sub_model=self.settings.sub_client.model, sandbox=sandbox,
                max_iterations=self.settings.max_iterations, system_prompt=system,
                settings=recorded_settings(self.settings) if self.depth == 0 else None,
                context_window=await self._window(), **self.origin,
            ))
            first = prompts.first_user_message(query, info)
            if self.depth == 0 and self.tree.schema is not None:
                first += "\n\n" + prompts.answer_schema_note(self.tree.schema.describe())
            if self.can_sub_call and self.settings.sub_models:
                others = list(self.settings.sub_models)
                first += "\n\n" + prompts.sub_models_note(self.settings.sub_client.model, others)
            if self.kept is not None and self.kept.note:
                first += "\n\n" + self.kept.note
            condenser = Summarise(self) if self.settings.compact_at is not None else None
            return await self._loop(opening, query, Conversation(system, first, condenser))
        finally:
            try:
                await self._end()
            finally:
                if self.kept is None:
                    self.closing = self.tree.release(opening)
                else:  # a session's REPL outlives the run, but the session must know it once it is open
                    await asyncio.wait([asyncio.wrap_future(opening)])
                    if not opening.cancelled():
                        opening.exception()  # retrieved: an opening that failed has failed the run already

    async def env(self) -> REPLEnv:
        """The run's REPL, once open."""
        return (await asyncio.wrap_future(self._opening))[0]

    def _open_env(self, source: ContextSource) -> tuple[REPLEnv, dict]:
        """A new REPL with the context loaded, and the context's description (in a pool thread);
        a session's own REPL with this context added."""
        if self.kept is not None:
            return self.kept.open(self, source)
        env = self.new_env()
        try:
            return env, env.load_context(source)
        except BaseException:
            env.close()
            raise

    def new_env(self, bridge: Callable[[str, list], list] | None = None) -> REPLEnv:
        """A new REPL for this run (`bridge`: another way to reach the run, for a session's)."""
        return REPLEnv(
            bridge=bridge or self._bridge, tracer=self.tree.tracer, run_id=self.run_id, depth=self.depth,
            parent_id=self.parent_id,
            sandbox=self.settings.sandbox, exec_timeout=self.settings.exec_timeout,
            max_output_length=self.settings.max_output_length, limits=self.settings.sandbox_limits,
            tools=tool_specs(self.tools),
        )

    @staticmethod
    def _described(source: ContextSource) -> dict | None:
        """The context's description, when the host can tell it without the worker."""
        value = source.value
        if source.path is None and (isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        )):
            return describe_context(value)
        return None

    async def _loop(self, opening: "concurrent.futures.Future[tuple[REPLEnv, dict]]", query: str,
                    conversation: Conversation) -> str | None:
        env: REPLEnv | None = None
        stalls = StallWatch()
        for turn in range(1, self.settings.max_iterations + 1):
            self.turn = turn
            reply = await self._ask(conversation)
            if env is None:  # started while the model thought about its first reply
                env = (await asyncio.wrap_future(opening))[0]
            env.turn = turn
            parsed = parse_reply(reply.text)
            outcome = await self._act(parsed, reply, env)
            if outcome.answer is not None and self.depth == 0 and self.tree.schema is not None:
                self._check_typed(outcome)
            if outcome.answer is not None:
                self.tree.tracer.emit(Final(
                    run_id=self.run_id, parent_id=self.parent_id, depth=self.depth, turn=turn,
                    answer=outcome.answer, source=outcome.source,
                ))
                return outcome.answer
            note = stalls.check(reply, parsed)
            if stalls.stalled:
                self.status, self.reason = "no_progress", stalls.reason
                return None
            if note is not None:
                outcome.feedback.append(note)
            limit = self.settings.max_output_length + _FEEDBACK_ROOM
            observations = truncate_middle("\n\n".join(outcome.feedback), limit)
            conversation.add_observation(prompts.turn_user_message(query, observations))
        self.reason = f"no final answer within {self.settings.max_iterations} turns"
        return None

    def _check_typed(self, outcome: "_Turn") -> None:
        """Keep a final answer that matches the schema (its value in `value`); else drop it and
        tell the model why, for another turn."""
        self.value, problem = self.tree.schema.check(outcome.answer)
        if problem is not None:
            outcome.answer = None
            outcome.feedback.append(prompts.schema_refusal(problem))

    async def _ask(self, conversation: Conversation) -> Completion:
        try:
            completion, fit, (new_messages, unchanged), overflow = await self._fitted_call(conversation)
        except ClientError as exc:
            # A child run's failed turn fails its rlm_query only; the top run's ends the run (the
            # caller records the error and keeps the trajectory so far).
            failure = _call_failure(exc) if self.depth > 0 else None
            if failure is None:
                raise
            raise SubCallFailed(f"rlm_query: the child run's model call failed: {failure}") from None
        conversation.add_reply(completion.text, completion.usage)
        if self.depth == 0:
            self.tree.last_root_reply = completion.text
        cost = self.tree.record("root", self.depth, self.client.model, self.client.base_url, completion.usage)
        self.tree.tracer.emit(LLMCall(
            run_id=self.run_id, parent_id=self.parent_id, depth=self.depth, turn=self.turn, model=self.client.model,
            new_messages=new_messages, message_count=len(conversation.messages) - 1, prefix_unchanged=unchanged,
            reply=completion.text, usage=dataclasses.asdict(completion.usage), cost=cost, latency=completion.latency,
            finish_reason=completion.finish_reason, shortened_outputs=fit.shortened, reasoning=completion.reasoning,
            window=fit.window, request_tokens=fit.request_tokens, removed_turns=fit.removed_turns, overflow=overflow,
        ))
        return completion

    async def _fitted_call(
        self, conversation: Conversation
    ) -> tuple[Completion, Fit, tuple[list[dict], int], dict | None]:
        """Fit the conversation to the window and send it. A server refusing it as too long
        gets it once more, fitted again with the sizes it stated (recorded as `overflow`)."""
        window = self._learned_window or await self._window()
        cap, url = self.settings.reply_tokens, self.client.base_url
        fit = await conversation.fit(window, cap, url=url, compact_at=self.settings.compact_at)
        try:
            sent = conversation.unsent(), conversation.unchanged_prefix()
            return await self._send(conversation), fit, sent, None
        except ContextWindowExceeded as refusal:
            overflow = {"status": refusal.status, "body": refusal.body, "window": refusal.window,
                        "request_tokens": refusal.request_tokens}
            window = conversation.learn(refusal, window)
            self._learned_window = refusal.window or self._learned_window
            again = await conversation.fit(window, cap, url=url, compact_at=self.settings.compact_at)
            fit = Fit(again.window, again.request_tokens, fit.removed_turns + again.removed_turns,
                      fit.shortened + again.shortened)
        try:
            sent = conversation.unsent(), conversation.unchanged_prefix()
            return await self._send(conversation), fit, sent, overflow
        except ContextWindowExceeded as refusal:
            raise too_long(url, window=refusal.window or window, reply_tokens=reply_room(window, cap),
                           request_tokens=refusal.request_tokens or fit.request_tokens) from None

    async def _send(self, conversation: Conversation) -> Completion:
        return await self.tree.model_call(
            self.client, conversation.messages, self.settings.reply_tokens, sub_call=self.depth > 0
        )

    async def _window(self) -> int | None:
        if self.depth == 0:
            if self.tree.window is None:
                self.tree.window = await self.tree.blocking(self.client.context_window) or 0
            return self.tree.window or None
        return self.settings.context_window

    async def _act(self, parsed: ParsedReply, reply: Completion, env: REPLEnv) -> "_Turn":
        """Run the reply's code, then accept its final answer or explain what was wrong."""
        turn = _Turn()
        code_failed = False
        for index, code in enumerate(parsed.repl_blocks, start=1):
            result = await self._run_cell(env, code)
            turn.feedback.append(_describe_result(index, len(parsed.repl_blocks), result))
            code_failed = code_failed or result.error is not None
            if result.final is not None:
                if result.final.strip():
                    turn.answer, turn.source = result.final, "code"
                    return turn
                turn.feedback.append("FINAL was called with an empty answer, so the run goes on.")
        turn.feedback.extend(parsed.problems)
        if parsed.final is not None:
            await self._accept_final_line(parsed, env, code_failed, turn)
        elif not parsed.repl_blocks and not parsed.problems:
            turn.feedback.append(_empty_reply_note(reply))
        return turn

    async def _accept_final_line(self, parsed: ParsedReply, env: REPLEnv, code_failed: bool, turn: "_Turn") -> None:
        final = parsed.final
        if code_failed:
            turn.feedback.append(
                "Your reply also had a final answer, but its code raised an error, so the answer was not "
                "accepted. Fix the code, check the output, then answer again."
            )
        elif final.kind == "FINAL":
            turn.answer, turn.source = final.answer, "reply"
        else:
            # Resolved as a cell: turning a model-made object into text runs model code, which
            # must have the same time limit and error reporting as any other cell.
            result = await self._run_cell(env, f"FINAL_VAR({final.variable!r})")
            if result.final is not None and result.final.strip():
                turn.answer, turn.source = result.final, "reply"
            elif result.final is not None:
                turn.feedback.append(f"FINAL_VAR({final.variable}): the variable is empty, so it was not accepted.")
            else:
                turn.feedback.append(
                    f"FINAL_VAR({final.variable}) was not accepted:\n{result.error or 'no value came back'}"
                )

    # -- the host side of llm_query / rlm_query ---------------------------------------------

    def _bridge(self, kind: str, items: list) -> list[str]:
        """Called from the thread running a cell; answers on the event loop.

        When the run ends under a cell still waiting here (a budget's hard stop), the wait is
        cancelled: the cell unwinds at once and its sub-calls stop instead of running on.
        """
        future = asyncio.run_coroutine_threadsafe(self._serve(kind, items), self._loop_ref)
        with self._waiting_lock:
            self._waiting.add(future)
            if self._ended:
                future.cancel()
        try:
            return future.result()
        finally:
            with self._waiting_lock:
                self._waiting.discard(future)

    async def _run_cell(self, env: REPLEnv, code: str) -> ExecResult:
        self.cell += 1
        self._cell = self.tree.executor.submit(env.run, code)
        return await asyncio.wrap_future(self._cell)

    async def _end(self) -> None:
        """Release a cell still waiting on a sub-call (the run was stopped), and let it unwind
        before its sandbox is closed under it."""
        with self._waiting_lock:
            self._ended = True
            waiting = list(self._waiting)
        for future in waiting:
            future.cancel()
        if self._cell is not None and not self._cell.done():
            unwound = asyncio.wrap_future(self._cell)
            # A cell released from a sub-call unwinds at once; one computing would not: its
            # sandbox is closed under it without waiting.
            done, _ = await asyncio.wait([unwound], timeout=_UNWIND_WAIT if waiting else 0)
            for future in done:
                if not future.cancelled():
                    future.exception()  # retrieved and dropped: the run has already ended
            if not done:
                unwound.cancel()  # closing the sandbox stops it

    async def _serve(self, kind: str, items: list) -> list[str]:
        if kind == "tool":  # not a model call: no sub-call budget, allowed at any depth
            return [await self._tool_call(items[0])]
        if not self.can_sub_call:
            raise SubCallFailed("sub-calls are off in this run (max_depth reached): work with code alone")
        self.tree.check_budget(new_sub_calls=len(items))
        if kind in ("llm_query", "llm_query_batched"):
            size = len(items) if kind == "llm_query_batched" else None
            chosen = [self._chosen_model(item) for item in items]
            calls = [
                lambda p=prompt, c=client, i=index: self._sub_call(p, i, kind, size=size, client=c)
                for index, (prompt, client) in enumerate(chosen)
            ]
        else:
            calls = [lambda q=item, i=index: self._child(q, i) for index, item in enumerate(items)]
        if not kind.endswith("_batched"):
            return [await calls[0]()]
        return await _gather_batch([call() for call in calls])

    def _chosen_model(self, item: str | dict) -> tuple[str, LLMClient]:
        """An llm_query prompt and the sub-model to ask: the default, or the one `model=` named
        (a prompt object checked by protocol.py) if the user allowed it."""
        default = self.settings.sub_client
        if isinstance(item, str):
            return item, default
        name = item["model"]
        client = default if name == default.model else self.settings.sub_models.get(name)
        if client is None:
            allowed = ", ".join(repr(model) for model in [default.model, *self.settings.sub_models])
            raise SubCallFailed(
                f"llm_query: model {name[:100]!r} is not one of the sub-models allowed in this run ({allowed}); "
                "pick one of those, or leave model= out for the default (the user allows more with sub_models=)"
            )
        return item["prompt"], client

    async def _sub_call(
        self, prompt: str, index: int | None, kind: str, note: str | None = None, size: int | None = None,
        client: LLMClient | None = None,
    ) -> str:
        client = client or self.tree.settings.sub_client
        prompt = clean_text(prompt)
        too_big = await self._unfit_sub_prompt(client, prompt)
        if too_big is not None:
            self._trace_sub(kind, prompt, "", None, 0.0, index, too_big, note, size=size, model=client.model)
            raise SubCallFailed(too_big)
        key = (client.model, prompt)
        cache = self.tree.cache
        if cache is not None and key in cache:
            reply = await asyncio.shield(cache[key])
            self.tree.record("sub", self.depth + 1, client.model, client.base_url, Usage(), hit=True)
            self._trace_sub(
                kind, prompt, reply, None, 0.0, index, None, note, cache_hit=True, size=size, model=client.model
            )
            return reply
        pending: asyncio.Future = asyncio.get_running_loop().create_future()
        if cache is not None:
            cache[key] = pending
        try:
            reply = await self._fresh_sub_call(client, prompt, index, kind, note, size)
        except BaseException as exc:
            if cache is not None:
                del cache[key]  # a failure is not remembered: a later identical call tries again
            pending.set_exception(exc if isinstance(exc, Exception) else SubCallFailed("cancelled"))
            pending.exception()  # retrieved here, so an unawaited failure is not reported as lost
            raise
        pending.set_result(reply)
        return reply

    async def _unfit_sub_prompt(self, client: LLMClient, prompt: str) -> str | None:
        """Why `prompt` cannot fit the sub-model's window (`sub_context_window=`, else the
        server's figure), or None when it may: such a prompt fails before any request."""
        window, windows = self.settings.sub_context_window, self.tree.sub_windows
        if window is None:
            if len(prompt) <= _SURE_CHARS_PER_TOKEN * _SMALLEST_WINDOW:
                return None  # fits any window: the server is not asked
            if client.model not in windows:
                windows[client.model] = await self.tree.blocking(client.context_window) or 0
            window = windows[client.model]
        tokens = int(len(prompt) / _SURE_CHARS_PER_TOKEN)
        if not window or tokens <= window:
            return None
        pieces = -(-tokens // max(1, window // 2))  # pieces of half a window leave room for the reply
        return (
            f"the prompt is too long for the sub-model {client.model!r}: at least {tokens:,} tokens "
            f"({len(prompt):,} characters) against its window of {window:,} tokens; split it into "
            f"{pieces} or more pieces and call llm_query_batched on them"
        )

    async def _fresh_sub_call(
        self, client: LLMClient, prompt: str, index: int | None, kind: str, note: str | None, size: int | None
    ) -> str:
        started = time.perf_counter()
        try:
            completion = await self.tree.model_call(client, [{"role": "user", "content": prompt}], sub_call=True)
        except ClientError as exc:
            self._trace_sub(
                kind, prompt, "", None, time.perf_counter() - started, index, str(exc), note, size=size,
                model=client.model,
            )
            failure = _call_failure(exc)
            if failure is None:
                raise
            raise failure from None
        cost = self.tree.record("sub", self.depth + 1, client.model, client.base_url, completion.usage)
        missing = _missing_text(completion)
        self._trace_sub(
            kind, prompt, completion.text, completion, completion.latency, index, missing, note, cost=cost, size=size,
            model=client.model,
        )
        if missing is not None:
            raise SubCallFailed(missing)
        return completion.text

    async def _child(self, item: ChildQuery, index: int) -> str:
        query, context = item.query, item.context
        if not self.can_recurse:
            prompt = query if context is None else f"{query}\n\n{_context_text(context)}"
            return await self._sub_call(prompt, index, "rlm_query", note="max_depth reached: answered as llm_query")
        origin = {"parent_turn": self.turn, "parent_cell": self.cell, "batch_index": index}
        child = Run(
            self.tree, depth=self.depth + 1, parent_id=self.run_id, client=self.tree.settings.sub_client, origin=origin
        )
        slots = await self.tree.child_slot(self.depth + 1)  # held until the child's REPL is closed
        try:
            answer = await child.answer(query, context if context is not None else ContextSource(value=query))
        except ContextError as exc:  # model code's own data (bad JSON, say): its call fails, not the run
            raise SubCallFailed(f"rlm_query: the child could not load this context: {exc}") from None
        finally:
            self.tree.free_slot(slots, child.closing)
        if answer is None:
            raise SubCallFailed(f"rlm_query: the child run ended without an answer: {child.reason}")
        return answer

    async def _tool_call(self, call: dict) -> str:
        """One host tool call from a cell (protocol.decode_tool_call), traced as a tool_call event."""
        self.tree.check_budget()  # max_time and the others, as before any work of the tree
        tool = self.tools.get(call["name"])
        started = time.perf_counter()
        result = error = None
        try:
            if tool is None:
                raise SubCallFailed(f"there is no tool named {call['name'][:80]!r} in this run")
            result = await call_tool(
                tool, call, timeout=tool.timeout or self.settings.exec_timeout, executor=self.tree.executor
            )
            return result
        except SubCallFailed as exc:
            error = str(exc)
            raise
        finally:
            self.tree.tracer.emit(ToolCall(
                run_id=self.run_id, parent_id=self.parent_id, depth=self.depth, turn=self.turn, cell=self.cell,
                name=call["name"], arguments=json.dumps({"args": call["args"], "kwargs": call["kwargs"]}),
                result=result, error=error, latency=time.perf_counter() - started,
            ))

    def _trace_sub(
        self, kind: str, prompt: str, reply: str, completion: Completion | None, latency: float,
        index: int | None, error: str | None, note: str | None, *, cost: float | None = 0.0, cache_hit: bool = False,
        size: int | None = None, model: str | None = None,
    ) -> None:
        self.tree.tracer.emit(SubCall(
            run_id=self.run_id, parent_id=self.parent_id, depth=self.depth + 1, turn=self.turn,
            model=model or self.tree.settings.sub_client.model, prompt=prompt, reply=reply,
            usage=dataclasses.asdict(completion.usage) if completion is not None else {},
            cost=cost if completion is not None or cache_hit else None, latency=latency, batch_index=index,
            error=error, kind=kind, note=note, cache_hit=cache_hit, cell=self.cell, batch_size=size,
        ))



def recorded_settings(settings: Settings) -> dict[str, Any]:
    """The settings a replay needs to run the same loop again (traced in the top run's run_start).

    Clients are left out (a replay serves the recorded replies); a sandbox factory or a custom
    prompt is recorded by name ("custom") or text. The sandbox is recorded as asked ("auto"),
    so a replay chooses again on its machine; run_start's own `sandbox` says the level that ran.
    """
    return {
        "prompt": settings.prompt, "max_iterations": settings.max_iterations,
        "max_output_length": settings.max_output_length, "exec_timeout": settings.exec_timeout,
        "sandbox": settings.sandbox_asked or (settings.sandbox if isinstance(settings.sandbox, str) else "custom"),
        "sub_call_chars": settings.sub_call_chars, "context_window": settings.context_window,
        "reply_tokens": settings.reply_tokens, "max_depth": settings.max_depth,
        "max_concurrency": settings.max_concurrency, "cache": settings.cache,
        "limits": dataclasses.asdict(settings.limits), "compact_at": settings.compact_at,
        # host tools as the worker gets them (a replay serves their recorded results)
        **({"tools": tool_specs(settings.tools), "sub_tools": tool_specs(settings.sub_tools)}
           if settings.tools or settings.sub_tools else {}),
    }


async def _gather_batch(coroutines: list[Awaitable[str]]) -> list[str]:
    """Run a batch; replies in order. A failure the model should see (`SubCallFailed`) is that
    item's reply: `BATCH_ERROR_PREFIX` and the error.

    A failure of the run (endpoint down, budget reached) stops the batch: calls already in
    flight finish when it is a budget (their usage counts), and are cancelled otherwise.
    """
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    pending = set(tasks)
    fatal: BaseException | None = None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.cancelled():
                    continue
                error = task.exception()
                if error is not None and not isinstance(error, SubCallFailed) and fatal is None:
                    fatal = error
                    if not isinstance(error, BudgetExceeded):
                        for other in pending:
                            other.cancel()
    except asyncio.CancelledError:  # the run was stopped (a hard time limit): its calls stop with it
        for task in pending:
            task.cancel()
        raise
    if fatal is not None:
        raise fatal
    # No task was cancelled here (cancelling only follows a fatal error, raised above). One
    # item's failure is that item's reply, so the others' answers are not lost.
    return [task.result() if task.exception() is None else f"{BATCH_ERROR_PREFIX}{task.exception()}" for task in tasks]


def _call_failure(exc: ClientError) -> SubCallFailed | None:
    """The failure of one call that model code should see, or None when the endpoint itself is
    not usable (unreachable, refusing the key, failing after retries): that ends the tree.

    A request the server rejected and an answer that cannot be used (malformed, past a cap)
    concern that call alone.
    """
    if exc.is_request_error:
        return SubCallFailed(f"the sub-model rejected the request: {exc}")
    if isinstance(exc, MalformedResponse):
        return SubCallFailed(f"the sub-model's answer could not be used: {exc}")
    return None


def _missing_text(completion: Completion) -> str | None:
    """Why a sub-call's answer has no text, or None when it has some: an empty answer is not
    passed off as one."""
    if not completion.content_missing:
        return None
    return f"the sub-model sent no text (finish_reason={completion.finish_reason or 'none'}); try again or rephrase"


def _context_text(source: ContextSource) -> str:
    """An rlm_query context as prompt text, when the call is answered as llm_query (max_depth)."""
    if source.handle is not None:
        raise SubCallFailed(
            "rlm_query: at max_depth the call is answered as llm_query, whose prompt cannot carry a "
            "context this large; pass a smaller context, or split it and call llm_query on the pieces"
        )
    return source.json_text if source.json_text is not None else source.value


@dataclasses.dataclass
class _Turn:
    """What one root reply led to: an answer, or feedback for the next turn."""

    answer: str | None = None
    source: str = ""
    feedback: list[str] = dataclasses.field(default_factory=list)


def _describe_result(index: int, count: int, result: ExecResult) -> str:
    label = f"[repl block {index} of {count}]" if count > 1 else "[repl block]"
    parts = [f"{label} output:"]
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append("stderr:\n" + result.stderr.rstrip("\n"))
    if result.error:
        parts.append("Error:\n" + result.error)
    if result.restarted:
        parts.append(
            "The REPL worker was restarted: all variables, functions and imports were lost. "
            "`context` has been loaded again."
        )
    if len(parts) == 1:
        parts.append("(no output)")
    return "\n".join(parts)


def _empty_reply_note(reply: Completion) -> str:
    if not reply.text.strip():
        why = " (the server sent no message content)" if reply.content_missing else ""
        return f"Your last reply was empty{why}. Write ```repl code to explore the context, or answer with FINAL(...)."
    return (
        "Your reply had no ```repl code block and no FINAL(...) / FINAL_VAR(...) line, so nothing happened. "
        "Write code in a ```repl block, or give your answer on its own line as FINAL(answer)."
    )
