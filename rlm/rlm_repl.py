"""`RLM_REPL`: the public RLM over a persistent Python REPL (configuration and the API).

One `completion()` / `acompletion()` is one call tree: the root loop (see `rlm.engine`) with
a fresh REPL session, and any child RLMs its code starts with `rlm_query`. The conversation
only ever appends (so server-side prefix caches stay warm), and the end is strict: a valid
FINAL / FINAL_VAR, or `max_iterations` root turns without one, or three replies in a row that
make no progress (`rlm.stalls`); then the result is None.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from rlm.compaction import DEFAULT_COMPACT_AT
from rlm.engine import KeptREPL, Limits, Run, Settings, Tree
from rlm.errors import BudgetExceeded, ConfigError
from rlm.providers import resolve_client
from rlm.repl import SandboxFactory, context_source
from rlm.result import RLMResult, run_with
from rlm.rlm import RLM
from rlm.sandbox import AUTO, SandboxLimits, check_available, resolve_level
from rlm.schema import answer_schema
from rlm.tools import ToolsArg, resolve_tools
from rlm.usage import UsageLedger
from rlm.utils import prompts
from rlm.utils.limits import ResponseLimits
from rlm.utils.llm import LLMClient
from rlm.utils.tracing import ErrorEvent, Event, RunEnd, Tracer, new_run_id, resolve_log_dir

__all__ = ["RLM_REPL"]

_MAX_SETTING = 1e12  # larger is a mistake (and NaN or inf would break the timers)
_TIME_GRACE = 1.1  # the hard stop comes at 110% of max_time (+1 s): calls already running may finish


class RLM_REPL(RLM):
    """A Recursive Language Model over a persistent Python REPL.

    The context is loaded into the REPL as `context`; the root model sees only its type and
    size, writes ```repl code to inspect it, calls the sub-model (`recursive_model`) through
    `llm_query`, and ends with FINAL(answer) or FINAL_VAR(variable).

    Args:
        model: root model: a name, "auto" (the endpoint's first model) or "provider:name"
            (e.g. "openai:gpt-5-mini", "anthropic:claude-haiku-4-5", "ollama:qwen3").
        recursive_model: the sub-model, in the same forms.
        max_iterations: root turns before giving up (completion() then returns None).
        max_output_length: REPL output kept per stream before the middle is cut.
        api_url: endpoint base URL; default `RLM_API_URL`, else http://localhost:8080/v1
            (for "provider:name" models, the provider's URL).
        api_key: default `RLM_API_KEY`, else `OPENAI_API_KEY` (or the provider's variable).
        client, sub_client: ready-made clients (`rlm.utils.llm.LLMClient`); override the above.
        sandbox: "auto" (default): the strongest level this machine provides, "bwrap", else
            "strict", else "subprocess" (then with an IsolationWarning, once per process);
            or a level by name ("bwrap", "strict", "subprocess", "inprocess": no isolation),
            which raises SandboxUnavailable if this machine cannot provide it; or a factory.
            `sandbox_level` says which level runs.
        exec_timeout: seconds one cell may run (time waiting for sub-calls not counted).
        memory_limit: bytes of address space a REPL worker may use (default 4 GiB; None: no
            limit); past it model code gets MemoryError. It must hold the context twice (mapped
            file and `str`): raise it for contexts over ~1.5 GB or non-ASCII ones over ~500 MB.
        cpu_time_limit: CPU seconds a worker may use in its life (None: no limit); past it
            the worker is replaced and the model told its variables are gone.
        file_size_limit: largest file model code may write in its scratch directory (1 GiB).
        system_prompt: "default", "cautious", "small", or a full custom prompt text.
        context_window: root model's window in tokens, when the server does not report it.
        sub_context_window: the sub-model's window in tokens, when the server does not report
            it; a sub-call prompt that cannot fit it fails in model code before any request.
        sub_models: other sub-models model code may choose with `llm_query(prompt, model=name)`
            (and `llm_query_batched`): names in the forms of `model`, or clients (chosen by
            their `.model`); any other name fails in model code.
        max_concurrency: most model calls in flight at once in the whole call tree.
        sub_call_chars: how much text the prompt tells the model one sub-call can take.
        max_depth: 1 (default): `llm_query` is a plain sub-model call and `rlm_query` answers
            as one; 2 or more: `rlm_query` starts a child RLM one level down; 0: no sub-calls.
        max_cost, max_tokens, max_sub_calls, max_time: budgets of the whole call tree (USD,
            tokens, calls below the root model, seconds); reaching one raises BudgetExceeded.
        cache: answer identical sub-calls of a run once (default True).
        max_reply_tokens: cap on each root reply's length (None: the server's default).
        request_timeout: seconds one model request may take, from connecting to the answer's
            last byte; a request with its retries and their waits ends within twice it.
        max_retries: how many times a failed model request is tried again (0 to 20).
        response_limits: caps on what a model server's answer may hold (`rlm.ResponseLimits`:
            body and header bytes, compression ratio, longest Retry-After), for the root and
            sub clients made here; default `ResponseLimits()`. Clients passed in as `client=`
            or `sub_client=` keep their own (`limits=` when made).
        log_dir: write each run's trajectory as JSONL here (default `RLM_LOG_DIR`; none if unset).
        on_event: called with every trace event as it happens (live progress).
        tools: host functions the model calls from the REPL as plain functions: a dict of
            names to functions (a value that is not callable becomes a read-only variable), a
            list of functions, or `rlm.Tool` objects. Arguments and results travel as JSON;
            a tool runs on the host in the tree's pool (timeout: `exec_timeout`, or the Tool's).
        sub_tools: the tools of child RLMs (`rlm_query` at `max_depth` >= 2); default the same
            as `tools`, `{}` for none.
        compact: when a root request passes `compact_at` of the root model's window (0.85),
            the root model summarises the older turns, whose full text stays in the REPL as
            `history` (see rlm.compaction); default True. False: old turns are dropped with a
            note when the window is full (also what happens when a summary fails).

    Attributes:
        sandbox_level: the level model code runs at ("bwrap", "strict", ...; "auto" resolved),
            None for a factory. Each run's `run_start` event records it too.
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
        sandbox: str | SandboxFactory = AUTO,
        exec_timeout: float = 120.0,
        memory_limit: int | None = SandboxLimits.memory,
        cpu_time_limit: float | None = None,
        file_size_limit: int | None = SandboxLimits.file_size,
        system_prompt: str = "default",
        context_window: int | None = None,
        sub_context_window: int | None = None,
        sub_models: list[str | LLMClient] | None = None,
        max_concurrency: int = 16,
        sub_call_chars: int = 500_000,
        max_depth: int = 1,
        max_cost: float | None = None,
        max_tokens: int | None = None,
        max_sub_calls: int | None = None,
        max_time: float | None = None,
        cache: bool = True,
        max_reply_tokens: int | None = None,
        request_timeout: float = 600.0,
        max_retries: int = 3,
        response_limits: ResponseLimits | None = None,
        log_dir: str | None = None,
        on_event: Callable[[Event], None] | None = None,
        tools: ToolsArg = None,
        sub_tools: ToolsArg = None,
        compact: bool = True,
        compact_at: float = DEFAULT_COMPACT_AT,
    ) -> None:
        _check_arguments(locals())
        prompts.system_prompt(system_prompt)  # an unknown prompt name fails here, not mid-run
        self.tools = resolve_tools(tools)  # a reserved name or a value that is not JSON fails here
        self.sandbox_limits = SandboxLimits(memory=memory_limit, cpu_time=cpu_time_limit, file_size=file_size_limit)
        # "auto" is resolved here (once per process); an unknown or unavailable level fails here, not mid-run.
        self.sandbox_level: str | None = resolve_level(sandbox) if isinstance(sandbox, str) else None
        if self.sandbox_level is not None:
            check_available(self.sandbox_level, self.sandbox_limits)
        options = {"api_url": api_url, "api_key": api_key, "timeout": request_timeout, "max_retries": max_retries,
                   "limits": response_limits}
        self.client: LLMClient = client or resolve_client(model, **options)
        self.sub_client: LLMClient = sub_client or resolve_client(recursive_model, **options)
        self._owned_clients = [c for c, given in ((self.client, client), (self.sub_client, sub_client)) if given is None]
        self.sub_models = _sub_models(sub_models or [], options)
        self._owned_clients += [made for name, made in self.sub_models.items() if name in (sub_models or [])]
        self.max_iterations = max_iterations
        self.max_depth = max_depth
        self.limits = Limits(max_cost=max_cost, max_tokens=max_tokens, max_sub_calls=max_sub_calls, max_time=max_time)
        self._settings = Settings(
            root_client=self.client, sub_client=self.sub_client, max_iterations=max_iterations,
            max_output_length=max_output_length, exec_timeout=exec_timeout, sandbox=self.sandbox_level or sandbox,
            sandbox_asked=sandbox if sandbox == AUTO else None, prompt=system_prompt,
            sub_call_chars=sub_call_chars, context_window=context_window, reply_tokens=max_reply_tokens,
            max_depth=max_depth, max_concurrency=max_concurrency, cache=cache, limits=self.limits,
            sandbox_limits=self.sandbox_limits, sub_context_window=sub_context_window, sub_models=self.sub_models,
            tools=self.tools, sub_tools=self.tools if sub_tools is None else resolve_tools(sub_tools, what="sub_tools"),
            compact_at=compact_at if compact else None,
        )
        self._session_repl: KeptREPL | None = None  # set by rlm.sessions.Session around each of its calls
        self.ledger = UsageLedger()
        self.tracer = Tracer(resolve_log_dir(log_dir), [on_event] if on_event else None, secrets=[api_key])

    # -- the public API --------------------------------------------------------------------

    def completion(self, context: Any, query: str, *, schema: Any = None) -> Any:
        """Answer `query` about `context`; None if no final answer within `max_iterations` (or
        the model made no progress in three replies in a row: the run's `run_end` says which).

        `context` may be a str, a list of str, a dict / list of JSON values, or a
        `pathlib.Path` to a text file. Raises `ClientError` when the endpoint fails,
        `ContextError` for a context that cannot be loaded, `BudgetExceeded` at a limit.
        A thin wrapper over `acompletion()`; inside a running event loop (a notebook) it runs
        the loop in a helper thread.

        `schema` (a pydantic model class, or a dict JSON schema: see `rlm.schema`) makes the
        answer typed: a FINAL / FINAL_VAR that does not match it is refused and the model told
        why, for another turn (within `max_iterations`); the result is then the validated
        object (the pydantic instance, or the parsed JSON value) instead of text.
        """
        return _run_sync(self.acompletion(context=context, query=query, schema=schema))

    def run(self, context: Any, query: str, *, schema: Any = None) -> RLMResult:
        """One run as an `RLMResult` (answer, status, usage, iterations, wall time, run id,
        trajectory path): a failure of the run is its status, not an exception; only a mistake
        in the call (`ConfigError`) raises."""
        return _run_sync(self.arun(context=context, query=query, schema=schema))

    async def arun(self, context: Any, query: str, *, schema: Any = None) -> RLMResult:
        """The same as `run()`, awaitable."""
        return await run_with(self, context, query, schema=schema)

    async def acompletion(self, context: Any, query: str, *, schema: Any = None) -> Any:
        """The same as `completion()`, awaitable: sub-calls and child runs are concurrent tasks."""
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("query must be a non-empty string")
        typed = answer_schema(schema)  # a bad schema fails here, before any request
        run_id = new_run_id()
        self.tracer.start(run_id)
        tree = Tree(self._settings, self.ledger, self.tracer, schema=typed)
        run = Run(tree, depth=0, parent_id=None, client=self.client, run_id=run_id, repl=self._session_repl)
        status, answer, reason = "error", None, None
        try:
            source = context_source(context)  # a bad context fails before any request
            await tree.blocking(_resolve_models, self.client, self.sub_client)  # the endpoint fails before loading
            answer = await self._within_time(run.answer(query, source))
            status, reason = ("answered", None) if answer is not None else (run.status, run.reason)
            return run.value if typed is not None and answer is not None else answer
        except BudgetExceeded as exc:
            status, reason = "budget_exceeded", str(exc)
            exc.partial_answer = tree.last_root_reply
            exc.usage = self.ledger.summary(since=tree.first_record)
            self._emit_error(run_id, run.turn, exc)
            raise
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._emit_error(run_id, run.turn, exc)
            raise
        finally:
            self.tracer.emit(RunEnd(
                run_id=run_id, status=status, answer=answer, turns=run.turn,
                duration=time.monotonic() - tree.started, usage=self.ledger.summary(since=tree.first_record),
                reason=reason,
            ))
            close_failure = await tree.close()
            clients = [self.client, self.sub_client, *self.sub_models.values()]
            for used in {id(each): each for each in clients}.values():
                await used.aclose()  # async connections belong to this event loop: release them here
            if close_failure is not None and status in ("answered", "max_iterations", "no_progress"):
                raise close_failure  # a REPL that could not be closed; never in place of the run's own error

    def cost_summary(self) -> dict[str, Any]:
        """Usage and cost since creation or `reset()`, for the whole call tree.

        Keys: `total_cost` (float, USD, known prices only), `root` (the top root model's
        calls) and `sub` (every call below it: sub-calls and child runs), each with `calls`,
        `input_tokens`, `output_tokens`, `cached_tokens`, `cost`, `models`; `breakdown` per
        (role, depth, model); `cache_hits`; `unpriced_models` (their cost is not in the
        total); `cost_complete`, `usage_estimated`, and grand totals.
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
        """Events of the last (or current) run, children's included."""
        return list(self.tracer.events)

    # -- helpers -----------------------------------------------------------------------------

    async def _within_time(self, work: Any) -> str | None:
        limit = self.limits.max_time
        if limit is None:
            return await work
        try:
            return await asyncio.wait_for(work, timeout=limit * _TIME_GRACE + 1)
        except asyncio.TimeoutError:
            raise BudgetExceeded("max_time", limit, limit * _TIME_GRACE + 1) from None

    def _emit_error(self, run_id: str, turn: int, exc: BaseException) -> None:
        self.tracer.emit(ErrorEvent(run_id=run_id, turn=turn, kind=type(exc).__name__, message=str(exc)))


def _run_sync(work: Any) -> Any:
    """Run a coroutine to its end; inside a running event loop (a notebook), in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, work).result()


def _sub_models(given: list, options: dict[str, Any]) -> dict[str, LLMClient]:
    """The sub-models `llm_query(model=...)` may choose, by the name model code gives."""
    if not isinstance(given, (list, tuple)):
        raise ConfigError(f"sub_models must be a list of model names or clients, got {given!r}")
    chosen: dict[str, LLMClient] = {}
    for entry in given:
        if isinstance(entry, str) and entry.strip() and entry != "auto":
            chosen[entry] = resolve_client(entry, **options)
        elif isinstance(entry, LLMClient):
            chosen[entry.model] = entry
        else:
            raise ConfigError(
                f"sub_models: {entry!r} is neither a model name (as for model=, but not 'auto') nor a client"
            )
    return chosen


def _resolve_models(*clients: LLMClient) -> None:
    for client in clients:
        client.model  # "auto" asks the endpoint now: an unreachable one fails before the REPL starts


def _check_arguments(args: dict[str, Any]) -> None:
    """Refuse bad constructor arguments with a message that says what is expected."""
    _require(args, float, "exec_timeout", "request_timeout")
    _require(args, int, "max_iterations", "max_output_length", "max_concurrency", "sub_call_chars")
    _require(args, int, "context_window", "sub_context_window", "max_reply_tokens", "max_tokens", "max_sub_calls",
             optional=True)
    _require(args, float, "max_cost", "max_time", optional=True)
    compact_at = args["compact_at"]
    if isinstance(compact_at, bool) or not isinstance(compact_at, (int, float)) or not 0 < compact_at <= 1:
        raise ConfigError(f"compact_at must be a share of the window between 0 and 1, such as 0.85; got {compact_at!r}")
    depth = args["max_depth"]
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ConfigError(f"max_depth must be 0 (no sub-calls), 1 (plain sub-calls) or more, got {depth!r}")
    sandbox = args["sandbox"]
    if not isinstance(sandbox, str) and not callable(sandbox):
        names = "'auto', 'bwrap', 'strict', 'subprocess', 'inprocess'"
        raise ConfigError(f"sandbox must be a name ({names}) or a factory, got {sandbox!r}")
    limits = args["response_limits"]
    if limits is not None and not isinstance(limits, ResponseLimits):
        raise ConfigError(
            f"response_limits must be a ResponseLimits, such as rlm.ResponseLimits(max_body_bytes=...), got {limits!r}"
        )
    for name in ("client", "sub_client"):
        given = args[name]
        if given is not None and not isinstance(given, LLMClient):
            raise ConfigError(
                f"{name} must have .model, .base_url, .complete(), .acomplete(), .context_window() and "
                ".aclose() (see rlm.utils.llm.LLMClient)"
            )


def _require(args: dict[str, Any], kind: type, *names: str, optional: bool = False) -> None:
    allowed = (int, float) if kind is float else (int,)
    for name in names:
        value = args[name]
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, allowed) or not 0 < value < _MAX_SETTING:
            what = "a positive finite number" if kind is float else "a positive whole number"
            raise ConfigError(f"{name} must be {what}, got {value!r}")
