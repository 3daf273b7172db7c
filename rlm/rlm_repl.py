"""`RLM_REPL`: the root loop. Ask the root model, run its code, feed the output back, stop.

One `completion()` is one run: a fresh REPL session with the context loaded, a conversation
that only ever appends (so server-side prefix caches stay warm), and a strict end: a valid
FINAL / FINAL_VAR, or `max_iterations` root turns without one (then the result is None).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from rlm._text import truncate_middle
from rlm.errors import ConfigError
from rlm.parsing import ParsedReply, parse_reply
from rlm.repl import REPLEnv, SandboxFactory, context_source
from rlm.rlm import RLM
from rlm.sandbox import SANDBOXES, ExecResult
from rlm.usage import CallRecord, UsageLedger, price_call
from rlm.utils import prompts
from rlm.utils.llm import Completion, LLMClient, OpenAICompatibleClient
from rlm.utils.tracing import ErrorEvent, Event, Final, LLMCall, RunEnd, RunStart, Tracer, new_run_id, resolve_log_dir

__all__ = ["RLM_REPL"]

_CHARS_PER_TOKEN_SAFE = 3  # conservative: code and numbers pack fewer characters per token
_SHORTENED_OUTPUT = 2_000
# Room for block labels, omission markers and notes, so that cutting a whole turn's feedback
# does not cut away the marker that states a stream's true length.
_FEEDBACK_ROOM = 4_096


@dataclasses.dataclass
class _Turn:
    """What one root reply led to: an answer, or feedback for the next turn."""

    answer: str | None = None
    source: str = ""
    feedback: list[str] = dataclasses.field(default_factory=list)


class RLM_REPL(RLM):
    """A Recursive Language Model over a persistent Python REPL.

    The context is loaded into the REPL as `context`; the root model sees only its type and
    size, writes ```repl code to inspect it, calls the sub-model (`recursive_model`) through
    `llm_query`, and ends with FINAL(answer) or FINAL_VAR(variable).

    Args:
        model: root model name, or "auto" for the first model the endpoint lists.
        recursive_model: sub-model for `llm_query`, or "auto".
        max_iterations: root turns before giving up (completion() then returns None).
        max_output_length: REPL output kept per stream before the middle is cut.
        api_url: endpoint base URL; default `RLM_API_URL`, else http://localhost:8080/v1.
        api_key: default `RLM_API_KEY`, else `OPENAI_API_KEY`.
        client, sub_client: ready-made clients (anything with `complete()`); override the above.
        sandbox: "subprocess" (default), "inprocess" (no isolation), or a factory.
        exec_timeout: seconds one cell may run (time waiting for sub-calls not counted).
        system_prompt: "default", "cautious", "small", or a full custom prompt text.
        context_window: root model's window in tokens, when the server does not report it.
        max_concurrency: most sub-calls in flight at once for `llm_query_batched`.
        sub_call_chars: how much text the prompt tells the model one sub-call can take.
        max_tokens: cap on each root reply's length (None: the server's default).
        log_dir: write each run's trajectory as JSONL here (default `RLM_LOG_DIR`; none if unset).
        on_event: called with every trace event as it happens (live progress).
    """

    def __init__(
        self,
        model: str = "auto",
        recursive_model: str = "auto",
        max_iterations: int = 20,
        max_output_length: int = 500_000,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        client: LLMClient | None = None,
        sub_client: LLMClient | None = None,
        sandbox: str | SandboxFactory = "subprocess",
        exec_timeout: float = 120.0,
        system_prompt: str = "default",
        context_window: int | None = None,
        max_concurrency: int = 16,
        sub_call_chars: int = 500_000,
        max_depth: int = 1,
        max_tokens: int | None = None,
        request_timeout: float = 600.0,
        max_retries: int = 3,
        log_dir: str | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        _require_positive(exec_timeout=exec_timeout, request_timeout=request_timeout)
        _require_count(max_iterations=max_iterations, max_output_length=max_output_length,
                       max_concurrency=max_concurrency, sub_call_chars=sub_call_chars)
        _require_count(**{k: v for k, v in (("context_window", context_window), ("max_tokens", max_tokens)) if v})
        if max_depth not in (0, 1):
            raise ConfigError(f"max_depth must be 0 (no sub-calls) or 1 (sub-calls to the sub-model), got {max_depth!r}")
        if isinstance(sandbox, str) and sandbox not in SANDBOXES:
            raise ConfigError(f"unknown sandbox {sandbox!r}; choose one of: {', '.join(SANDBOXES)}")
        if not isinstance(sandbox, str) and not callable(sandbox):
            raise ConfigError(f"sandbox must be a name such as 'subprocess' or a factory, got {sandbox!r}")
        for name, given in (("client", client), ("sub_client", sub_client)):
            if given is not None and not isinstance(given, LLMClient):
                raise ConfigError(
                    f"{name} must have .model, .base_url, .complete(messages) and .context_window() "
                    "(see rlm.utils.llm.LLMClient)"
                )
        self.max_iterations = max_iterations
        self.max_output_length = max_output_length
        self.sandbox = sandbox
        self.exec_timeout = exec_timeout
        self.max_concurrency = max_concurrency
        self.max_tokens = max_tokens
        self.max_depth = max_depth
        self._system_prompt = prompts.system_prompt(
            system_prompt, sub_chars=sub_call_chars, max_output=max_output_length, sub_calls=max_depth > 0
        )
        self._context_window = context_window
        options = {"api_url": api_url, "api_key": api_key, "timeout": request_timeout, "max_retries": max_retries}
        self.client: LLMClient = client or OpenAICompatibleClient(model, **options)
        self.sub_client: LLMClient = sub_client or OpenAICompatibleClient(recursive_model, **options)
        self._owned_clients = [c for c, given in ((self.client, client), (self.sub_client, sub_client)) if given is None]
        self.ledger = UsageLedger()
        self.tracer = Tracer(resolve_log_dir(log_dir), [on_event] if on_event else None)

    # -- the public API --------------------------------------------------------------------

    def completion(self, context: Any, query: str) -> str | None:
        """Answer `query` about `context`; None if no final answer within `max_iterations`.

        `context` may be a str, a list of str, a dict / list of JSON values, or a
        `pathlib.Path` to a text file. Raises `ClientError` when the endpoint fails,
        `ContextError` for a context that cannot be loaded.
        """
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("query must be a non-empty string")
        run_id = new_run_id()
        self.tracer.start(run_id)
        state = {"turns": 0, "started": time.perf_counter(), "records": len(self.ledger.records())}
        try:
            answer = self._run(context, query, run_id, state)
        except BaseException as exc:
            self._emit_end(run_id, "error", None, state, exc)
            raise
        self._emit_end(run_id, "answered" if answer is not None else "max_iterations", answer, state)
        return answer

    def cost_summary(self) -> dict[str, Any]:
        """Usage and cost since creation or `reset()`.

        Keys: `total_cost` (float, USD, known prices only), `root` and `sub` (each with
        `calls`, `input_tokens`, `output_tokens`, `cached_tokens`, `cost`, `models`),
        `unpriced_models` (models whose price is unknown; their cost is not in the total),
        `cost_complete`, `usage_estimated`, and grand totals.
        """
        return self.ledger.summary()

    def reset(self) -> None:
        """Forget usage and the last run's trace."""
        self.ledger.clear()
        self.tracer.events = []

    def close(self) -> None:
        """Release the HTTP connections of the clients this object made (not ones passed in)."""
        for owned in self._owned_clients:
            owned.close()
        self._owned_clients = []

    def __enter__(self) -> "RLM_REPL":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def trace(self) -> list[Event]:
        """Events of the last (or current) run."""
        return list(self.tracer.events)

    # -- the loop ----------------------------------------------------------------------------

    def _run(self, context: Any, query: str, run_id: str, state: dict) -> str | None:
        source = context_source(context)  # a bad context fails before any request
        root_model, sub_model = self.client.model, self.sub_client.model  # and the endpoint before loading
        with REPLEnv(
            sub_client=self.sub_client,
            ledger=self.ledger,
            tracer=self.tracer,
            run_id=run_id,
            sandbox=self.sandbox,
            max_concurrency=self.max_concurrency,
            exec_timeout=self.exec_timeout,
            max_output_length=self.max_output_length,
            sub_calls=self.max_depth > 0,
        ) as env:
            info = env.load_context(source)
            self.tracer.emit(RunStart(
                run_id=run_id, query=query, context=info, root_model=root_model,
                sub_model=sub_model, sandbox=env.sandbox.name,
                max_iterations=self.max_iterations, system_prompt=self._system_prompt,
            ))
            conversation = _Conversation(self._system_prompt, prompts.first_user_message(query, info))
            for turn in range(1, self.max_iterations + 1):
                state["turns"] = env.turn = turn
                reply = self._ask_root(conversation, run_id, turn)
                outcome = self._act(parse_reply(reply.text), reply, env)
                if outcome.answer is not None:
                    self.tracer.emit(Final(run_id=run_id, turn=turn, answer=outcome.answer, source=outcome.source))
                    return outcome.answer
                observations = truncate_middle("\n\n".join(outcome.feedback), self.max_output_length + _FEEDBACK_ROOM)
                conversation.add_observation(prompts.turn_user_message(query, observations))
        return None

    def _ask_root(self, conversation: "_Conversation", run_id: str, turn: int) -> Completion:
        shortened = conversation.fit(self._window(), self.max_tokens)
        new_messages = conversation.unsent()
        completion = self.client.complete(conversation.messages, max_tokens=self.max_tokens)
        conversation.add_reply(completion.text)
        cost = price_call(self.client.model, self.client.base_url, completion.usage)
        self.ledger.add(CallRecord("root", 0, self.client.model, completion.usage, cost))
        self.tracer.emit(LLMCall(
            run_id=run_id, turn=turn, model=self.client.model, new_messages=new_messages,
            message_count=len(conversation.messages) - 1, reply=completion.text,
            usage=dataclasses.asdict(completion.usage), cost=cost, latency=completion.latency,
            finish_reason=completion.finish_reason, shortened_outputs=shortened, reasoning=completion.reasoning,
        ))
        return completion

    def _window(self) -> int | None:
        if self._context_window is None:
            self._context_window = self.client.context_window() or 0
        return self._context_window or None

    def _act(self, parsed: ParsedReply, reply: Completion, env: REPLEnv) -> _Turn:
        """Run the reply's code, then accept its final answer or explain what was wrong."""
        turn = _Turn()
        code_failed = False
        for index, code in enumerate(parsed.repl_blocks, start=1):
            result = env.run(code)
            turn.feedback.append(_describe_result(index, len(parsed.repl_blocks), result))
            code_failed = code_failed or result.error is not None
            if result.final is not None:
                if result.final.strip():
                    turn.answer, turn.source = result.final, "code"
                    return turn
                turn.feedback.append("FINAL was called with an empty answer, so the run goes on.")
        turn.feedback.extend(parsed.problems)
        if parsed.final is not None:
            self._accept_final_line(parsed, env, code_failed, turn)
        elif not parsed.repl_blocks and not parsed.problems:
            turn.feedback.append(_empty_reply_note(reply))
        return turn

    @staticmethod
    def _accept_final_line(parsed: ParsedReply, env: REPLEnv, code_failed: bool, turn: _Turn) -> None:
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
            result = env.run(f"FINAL_VAR({final.variable!r})")
            if result.final is not None and result.final.strip():
                turn.answer, turn.source = result.final, "reply"
            elif result.final is not None:
                turn.feedback.append(f"FINAL_VAR({final.variable}): the variable is empty, so it was not accepted.")
            else:
                turn.feedback.append(
                    f"FINAL_VAR({final.variable}) was not accepted:\n{result.error or 'no value came back'}"
                )

    def _emit_end(
        self, run_id: str, status: str, answer: str | None, state: dict, exc: BaseException | None = None
    ) -> None:
        if exc is not None:
            kind = type(exc).__name__
            self.tracer.emit(ErrorEvent(run_id=run_id, turn=state["turns"], kind=kind, message=str(exc)))
        self.tracer.emit(RunEnd(
            run_id=run_id, status=status, answer=answer, turns=state["turns"],
            duration=time.perf_counter() - state["started"], usage=self.ledger.summary(since=state["records"]),
        ))


class _Conversation:
    """The root conversation: append-only, except that old REPL outputs may be shortened to fit."""

    def __init__(self, system: str, first_user: str) -> None:
        self.messages: list[dict] = [{"role": "system", "content": system}, {"role": "user", "content": first_user}]
        self._observations: list[int] = []  # indices of user messages holding REPL output
        self._shortened: set[int] = set()
        self._sent = 0

    def add_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self._sent = len(self.messages)

    def add_observation(self, text: str) -> None:
        self._observations.append(len(self.messages))
        self.messages.append({"role": "user", "content": text})

    def unsent(self) -> list[dict]:
        return [dict(message) for message in self.messages[self._sent :]]

    def fit(self, window: int | None, reply_tokens: int | None) -> int:
        """Shorten old messages until the estimate fits `window`; return how many were shortened.

        The oldest REPL outputs go first, then the model's own oldest replies (never the
        latest). If even that is not enough the request is sent as it is: the estimate is
        cautious, and a server that still refuses it answers with a clear error.
        """
        if not window:
            return 0
        budget = window - (reply_tokens or min(8192, window // 4))
        replies = [i for i, m in enumerate(self.messages[:-2]) if m["role"] == "assistant"]
        count = 0
        for index in [*self._observations, *replies]:
            if self._estimate() <= budget:
                break
            if index in self._shortened:
                continue
            message = self.messages[index]
            self.messages[index] = {**message, "content": truncate_middle(message["content"], _SHORTENED_OUTPUT)}
            self._shortened.add(index)
            count += 1
        if count:
            last = self.messages[-1]
            last["content"] += (
                f"\n\n(Note: to fit your context window, {count} earlier message(s) of this conversation "
                "were shortened. Keep what you need in variables and print less.)"
            )
        return count

    def _estimate(self) -> int:
        return sum(len(message["content"]) // _CHARS_PER_TOKEN_SAFE + 4 for message in self.messages)


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


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _require_count(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
