"""Trajectories: a typed, versioned stream of events for every step of a run.

Each event has `type`, `v` (schema version), `run_id`, `parent_id`, `depth` and `ts` (Unix
time). Root-model calls record only the messages added since the previous call (the
conversation only appends), so a trajectory grows linearly with the work, not quadratically.

Sinks: the tracer always keeps events in memory; with a log directory (`log_dir=` or
`RLM_LOG_DIR`) it also appends each event to `<log_dir>/<run_id>.jsonl`, with secrets redacted
and repeated long texts stored once (`rlm.utils.trace_sink`). Without one, nothing is written
and no folder is created. The file format is documented in docs/trajectory.md; `v` is its
major version: adding fields or event types keeps it, anything else raises it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from rlm.errors import ConfigError
from rlm.utils.trace_sink import JsonlSink, Redactor

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "RunStart",
    "LLMCall",
    "SubCall",
    "ToolCall",
    "CodeExec",
    "Compaction",
    "Final",
    "ErrorEvent",
    "RunEnd",
    "Tracer",
    "new_run_id",
    "resolve_log_dir",
]

SCHEMA_VERSION = 1


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random hex."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass(kw_only=True)
class Event:
    """Fields every event has."""

    type: ClassVar[str] = "event"
    run_id: str
    parent_id: str | None = None
    depth: int = 0
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "v": SCHEMA_VERSION, **dataclasses.asdict(self)}


@dataclass(kw_only=True)
class RunStart(Event):
    type: ClassVar[str] = "run_start"
    query: str
    context: dict
    root_model: str
    sub_model: str
    sandbox: str
    max_iterations: int
    system_prompt: str
    # A child run (rlm_query): the parent's turn and cell that started it, and its batch item.
    parent_turn: int | None = None
    parent_cell: int | None = None
    batch_index: int | None = None
    settings: dict | None = None  # what replay needs to run it again (see engine.recorded_settings)
    context_window: int | None = None  # the root model's window the conversation was fitted to (None: unknown)


@dataclass(kw_only=True)
class LLMCall(Event):
    """A root-model call: the messages appended since the last call, and the reply."""

    type: ClassVar[str] = "llm_call"
    turn: int
    model: str
    new_messages: list[dict]
    message_count: int
    prefix_unchanged: int  # leading messages repeated unchanged from the previous request
    reply: str
    usage: dict
    cost: float | None
    latency: float
    finish_reason: str | None = None
    shortened_outputs: int = 0  # messages of the latest turn cut in the middle for this request
    reasoning: str | None = None  # the reasoning text, when the server returns it separately
    window: int | None = None  # the window this request was fitted to (None: unknown)
    request_tokens: int | None = None  # the request's size as counted before sending
    removed_turns: list[int] = field(default_factory=list)  # old turns taken out for this request
    overflow: dict | None = None  # a first attempt the server refused as too long: status, body, window, request_tokens


@dataclass(kw_only=True)
class SubCall(Event):
    """One sub-model call (or a failed one: `error` is set; or a cache hit: no request made).

    `kind` is "llm_query", "llm_query_batched" or "rlm_query" (answered as a plain call at the
    depth limit, which `note` says).
    """

    type: ClassVar[str] = "sub_call"
    turn: int
    model: str
    prompt: str
    reply: str
    usage: dict
    cost: float | None
    latency: float
    batch_index: int | None = None
    error: str | None = None
    kind: str = "llm_query"
    note: str | None = None
    cache_hit: bool = False
    cell: int | None = None  # the index of the cell (exec event) of this run that made the call
    batch_size: int | None = None  # how many calls its llm_query_batched / rlm_query_batched made


@dataclass(kw_only=True)
class ToolCall(Event):
    """One call of a host tool (`RLM_REPL(tools=...)`) from a cell: its arguments and result as
    JSON text, or the `error` model code got instead."""

    type: ClassVar[str] = "tool_call"
    turn: int
    name: str
    arguments: str  # JSON: {"args": [...], "kwargs": {...}}
    result: str | None  # JSON text of what the tool returned
    latency: float
    error: str | None = None
    cell: int | None = None  # the index of the cell (exec event) of this run that made the call


@dataclass(kw_only=True)
class CodeExec(Event):
    type: ClassVar[str] = "exec"
    turn: int
    index: int
    code: str
    stdout: str
    stderr: str
    error: str | None
    timed_out: bool
    restarted: bool
    duration: float
    # The confinement the worker applied (Sandbox.confinement): on the first cell, and when it changes.
    confinement: dict | None = None


@dataclass(kw_only=True)
class Final(Event):
    type: ClassVar[str] = "final"
    turn: int
    answer: str
    source: str  # "reply" (a FINAL line) or "code" (FINAL called in a cell)


@dataclass(kw_only=True)
class Compaction(Event):
    """The root model summarised old turns of the conversation to keep it within its window
    (`compact_at`): the turns taken out, its summary (empty when it failed and the turns were
    dropped with a note instead: `error` says why), and the summary call's usage."""

    type: ClassVar[str] = "compaction"
    turn: int
    removed_turns: list[int]
    summary: str
    usage: dict = field(default_factory=dict)
    cost: float | None = 0.0
    error: str | None = None


@dataclass(kw_only=True)
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    turn: int
    kind: str
    message: str


@dataclass(kw_only=True)
class RunEnd(Event):
    type: ClassVar[str] = "run_end"
    status: str  # "answered", "max_iterations", "no_progress", "budget_exceeded" or "error"
    answer: str | None
    turns: int
    duration: float
    usage: dict
    reason: str | None = None  # why a run without an answer ended (the error's type and message for "error")


def resolve_log_dir(log_dir: str | os.PathLike | None) -> Path | None:
    """The argument, else `RLM_LOG_DIR`, else None (no files)."""
    value = log_dir if log_dir is not None else os.environ.get("RLM_LOG_DIR")
    return Path(value).expanduser() if value else None


# What a run's events may hold in memory (`RLM_REPL.trace`); the JSONL file and listeners get
# every event whole. Sub-calls are the only events model code can multiply without bound (a
# batch of cache hits costs nothing): past these, their texts are left out of the in-memory copy,
# then the events themselves.
MEMORY_TRACE_CHARS = 16_000_000  # prompt and reply characters of sub-call events kept whole
MEMORY_TRACE_SUB_CALLS = 100_000  # sub-call events kept at all


class Tracer:
    """Collects events in memory, writes them as JSONL when given a directory, tells listeners.

    In memory a run keeps every event but sub-calls past `MEMORY_TRACE_CHARS` (kept without their
    prompt and reply texts) and `MEMORY_TRACE_SUB_CALLS` (not kept); the file keeps everything.
    """

    def __init__(
        self,
        log_dir: Path | None = None,
        listeners: list[Callable[[Event], None]] | None = None,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self.log_dir = log_dir
        self.listeners = list(listeners or [])
        self.secrets = list(secrets)  # redacted from files, with every *_API_KEY variable's value
        self.events: list[Event] = []
        self.path: Path | None = None
        self._sink: JsonlSink | None = None
        self.run_id: str | None = None
        self._lock = threading.Lock()
        self._sub_calls = 0
        self._sub_call_chars = 0

    def start(self, run_id: str) -> None:
        """Begin a new run: forget old events, open its file if logging."""
        with self._lock:
            self.run_id = run_id
            self.events = []
            self._sub_calls = self._sub_call_chars = 0
            self.path = None
            self._sink = None
            if self.log_dir is not None:
                try:
                    self.log_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot use {str(self.log_dir)!r} as the log directory ({exc.strerror}); "
                        "pass another log_dir= (or unset RLM_LOG_DIR)"
                    ) from None
                self.path = self.log_dir / f"{run_id}.jsonl"
                self._sink = JsonlSink(self.path, Redactor(self.secrets))

    def emit(self, event: Event) -> None:
        with self._lock:
            kept = self._kept(event)
            if kept is not None:
                self.events.append(kept)
            if self._sink is not None:
                self._sink.write(event.to_dict())
        for listener in self.listeners:
            listener(event)

    def _kept(self, event: Event) -> Event | None:
        """What of `event` stays in memory (see MEMORY_TRACE_CHARS); called under the lock."""
        if not isinstance(event, SubCall):
            return event
        self._sub_calls += 1
        if self._sub_calls > MEMORY_TRACE_SUB_CALLS:
            return None
        self._sub_call_chars += len(event.prompt) + len(event.reply)
        if self._sub_call_chars <= MEMORY_TRACE_CHARS:
            return event
        where = "in the trajectory file" if self._sink is not None else "not kept"
        return dataclasses.replace(
            event, prompt=f"[{len(event.prompt):,} characters: {where}]", reply=f"[{len(event.reply):,} characters: {where}]"
        )
