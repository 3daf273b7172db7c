"""The methods a bench run compares, on the same tasks and the same endpoint.

- `base`: one direct call to the root model with the context in the prompt, cut to the
  model's window when it does not fit (reported as truncated, with how much was kept).
- `rlm-depth0`: the RLM loop with the REPL but no sub-calls (`max_depth=0`).
- `rlm`: the RLM loop with sub-calls to the sub-model (`max_depth=1`).
- `rlm-depth2`: sub-calls that may themselves recurse (`max_depth=2`); listed always, usable
  only when `RLM_REPL` accepts `max_depth=2` (checked by trying, see `unavailable_reason`).

Every run writes its trajectory (JSONL) under the log directory it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from rlm.bench.tasks import Task
from rlm.errors import ConfigError, RLMError
from rlm.usage import CallRecord, UsageLedger, price_call
from rlm.utils.llm import LLMClient
from rlm.utils.tracing import ErrorEvent, Final, LLMCall, RunEnd, RunStart, Tracer, new_run_id

__all__ = ["METHODS", "DEFAULT_METHODS", "RunSettings", "Models", "Outcome", "unavailable_reason", "run_method"]

_CHARS_PER_TOKEN_SAFE = 3  # as the loop assumes: code and numbers pack fewer characters per token
_BASE_PROMPT_ROOM = 256  # tokens for the words around the context and the question
_DEFAULT_REPLY_TOKENS = 2048

METHODS: dict[str, str] = {
    "base": "one direct call, context cut to the model's window",
    "rlm-depth0": "RLM loop with the REPL, no sub-calls",
    "rlm": "RLM loop with sub-calls (depth 1)",
    "rlm-depth2": "RLM loop whose sub-calls may recurse (depth 2)",
}
DEFAULT_METHODS = ("base", "rlm-depth0", "rlm")
_DEPTH = {"rlm-depth0": 0, "rlm": 1, "rlm-depth2": 2}


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How every method runs, the same for all of them."""

    max_iterations: int = 20
    max_reply_tokens: int | None = None  # cap on each root reply (None: the server's default)
    sandbox: str = "auto"  # the strongest isolation this machine has (rlm.sandbox.auto)
    exec_timeout: float = 120.0
    system_prompt: str = "default"
    context_window: int | None = None  # root window in tokens; default: what the server reports
    max_concurrency: int = 16  # sub-calls in flight within one run


_Pair = tuple[LLMClient, LLMClient]


@dataclass(frozen=True)
class Models:
    """The root model and sub-model of a bench run.

    `make()` gives a fresh (root, sub) client pair for one run, as a context manager that
    releases them after: clients keep connection state per event loop, so runs going on at
    the same time must not share one. The names are the models' real ids, for the results.
    """

    root_name: str
    sub_name: str
    make: Callable[[], ContextManager[_Pair]]

    @classmethod
    def from_endpoint(cls, model: str, sub_model: str, *, api_url: str | None = None, max_retries: int = 3) -> "Models":
        """Models at an endpoint (specs as `RLM_REPL` takes them); "auto" is resolved now, so an
        unreachable endpoint fails here, before any run."""
        from rlm.providers import resolve_client

        def pair(root_spec: str, sub_spec: str) -> _Pair:
            root = resolve_client(root_spec, api_url=api_url, max_retries=max_retries)
            return root, resolve_client(sub_spec, api_url=api_url, max_retries=max_retries)

        @contextlib.contextmanager
        def make(root_spec: str, sub_spec: str) -> Iterator[_Pair]:
            root, sub = pair(root_spec, sub_spec)
            try:
                yield root, sub
            finally:
                root.close()
                sub.close()

        with make(model, sub_model) as (root, sub):
            names = (root.model, sub.model)
        return cls(names[0], names[1], functools.partial(make, *names))

    @classmethod
    def fixed(cls, root: LLMClient, sub: LLMClient) -> "Models":
        """The same two clients for every run: for clients that may be shared (test fakes)."""
        return cls(root.model, sub.model, lambda: contextlib.nullcontext((root, sub)))


@dataclass
class Outcome:
    """What one method did on one task."""

    answer: str | None
    status: str  # "answered", "no_answer" or "error"
    usage: dict[str, Any]
    turns: int
    wall_time: float
    trajectory: str | None
    error: str | None = None
    truncated: bool | None = None  # base only: was the context cut?
    kept_chars: int | None = None  # base only: how much of it the model saw


def unavailable_reason(method: str) -> str | None:
    """Why `method` cannot run with this version of rlm, or None when it can.

    For the depth methods this constructs an `RLM_REPL` with that depth (no request is
    made): the constructor is the authority on what it accepts.
    """
    if method not in METHODS:
        return f"unknown method {method!r}; choose from: {', '.join(METHODS)}"
    if method == "base":
        return None
    from rlm.rlm_repl import RLM_REPL

    depth = _DEPTH[method]
    try:
        with RLM_REPL("probe", "probe", api_url="http://127.0.0.1:9/v1", max_depth=depth):
            return None
    except ConfigError as exc:
        return f"{method} needs RLM_REPL(max_depth={depth}), which this version of rlm does not accept ({exc})"


def run_method(method: str, task: Task, models: Models, settings: RunSettings, log_dir: Path) -> Outcome:
    """Run `method` on `task`; failures of the endpoint or sandbox become an "error" outcome."""
    runner: Callable[..., Outcome] = _run_base if method == "base" else _run_rlm
    with models.make() as clients:
        return runner(method, task, clients, settings, log_dir)


def _run_rlm(method: str, task: Task, clients: _Pair, settings: RunSettings, log_dir: Path) -> Outcome:
    from rlm.rlm_repl import RLM_REPL

    engine = RLM_REPL(
        max_iterations=settings.max_iterations, client=clients[0], sub_client=clients[1],
        sandbox=settings.sandbox, exec_timeout=settings.exec_timeout, system_prompt=settings.system_prompt,
        context_window=settings.context_window, max_concurrency=settings.max_concurrency,
        max_depth=_DEPTH[method], max_reply_tokens=settings.max_reply_tokens, log_dir=str(log_dir),
    )
    started = time.perf_counter()
    answer, error = None, None
    try:
        answer = engine.completion(context=task.context, query=task.question)
    except RLMError as exc:
        error = f"{type(exc).__name__}: {exc}"
    ends = [event for event in engine.trace if isinstance(event, RunEnd)]
    return Outcome(
        answer=answer,
        status="error" if error else "answered" if answer is not None else "no_answer",
        usage=engine.cost_summary(),
        turns=ends[-1].turns if ends else 0,
        wall_time=time.perf_counter() - started,
        trajectory=str(engine.tracer.path) if engine.tracer.path else None,
        error=error,
    )


def base_prompt(task: Task, window: int, reply_tokens: int) -> tuple[str, int]:
    """The one user message of `base`, and how many context characters it keeps."""
    budget = (window - reply_tokens - _BASE_PROMPT_ROOM) * _CHARS_PER_TOKEN_SAFE - len(task.question)
    kept = max(min(len(task.context), budget), 0)
    note = ""
    if kept < len(task.context):
        note = (
            f"\n\n(The context was cut to fit your context window: you see its first {kept:,} of "
            f"{len(task.context):,} characters.)"
        )
    prompt = f"Here is a context:\n\n{task.context[:kept]}{note}\n\nQuestion: {task.question}"
    return prompt, kept


def _without_context(prompt: str, task: Task, kept: int) -> str:
    """The prompt as logged: the context itself is left out (trajectories never copy it)."""
    return prompt.replace(task.context[:kept], f"<the first {kept:,} characters of the context>", 1)


def _run_base(method: str, task: Task, clients: _Pair, settings: RunSettings, log_dir: Path) -> Outcome:
    root = clients[0]
    window = settings.context_window or root.context_window()
    if not window:
        raise ConfigError(
            "the base method needs the root model's context window, and the server does not report it; "
            "pass it with --context-window (tokens)"
        )
    reply_tokens = settings.max_reply_tokens or min(_DEFAULT_REPLY_TOKENS, window // 4)
    prompt, kept = base_prompt(task, window, reply_tokens)
    tracer, run_id = Tracer(log_dir), new_run_id()
    tracer.start(run_id)
    tracer.emit(RunStart(
        run_id=run_id, query=task.question, context={"type": "str", "total_length": len(task.context), "kept": kept},
        root_model=root.model, sub_model="", sandbox="none", max_iterations=1, system_prompt="",
    ))
    started = time.perf_counter()
    ledger, answer, error = UsageLedger(), None, None
    try:
        reply = root.complete([{"role": "user", "content": prompt}], max_tokens=settings.max_reply_tokens)
    except RLMError as exc:
        error = f"{type(exc).__name__}: {exc}"
        tracer.emit(ErrorEvent(run_id=run_id, turn=1, kind=type(exc).__name__, message=str(exc)))
    else:
        cost = price_call(root.model, root.base_url, reply.usage)
        ledger.add(CallRecord("root", 0, root.model, reply.usage, cost))
        answer = reply.text if reply.text.strip() else None
        tracer.emit(LLMCall(
            run_id=run_id, turn=1, model=root.model, new_messages=[{"role": "user", "content": _without_context(prompt, task, kept)}],
            message_count=1, prefix_unchanged=0, reply=reply.text, usage=dataclasses.asdict(reply.usage), cost=cost,
            latency=reply.latency, finish_reason=reply.finish_reason,
        ))
        if answer is not None:
            tracer.emit(Final(run_id=run_id, turn=1, answer=answer, source="reply"))
    elapsed = time.perf_counter() - started
    status = "error" if error else "answered" if answer is not None else "no_answer"
    tracer.emit(RunEnd(run_id=run_id, status=status, answer=answer, turns=1, duration=elapsed, usage=ledger.summary()))
    return Outcome(
        answer=answer, status=status, usage=ledger.summary(), turns=1, wall_time=elapsed,
        trajectory=str(tracer.path), error=error, truncated=kept < len(task.context), kept_chars=kept,
    )
