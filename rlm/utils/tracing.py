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
    "CodeExec",
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
    shortened_outputs: int = 0
    reasoning: str | None = None  # the reasoning text, when the server returns it separately


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
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    turn: int
    kind: str
    message: str


@dataclass(kw_only=True)
class RunEnd(Event):
    type: ClassVar[str] = "run_end"
    status: str  # "answered", "max_iterations", "budget_exceeded" or "error"
    answer: str | None
    turns: int
    duration: float
    usage: dict


def resolve_log_dir(log_dir: str | os.PathLike | None) -> Path | None:
    """The argument, else `RLM_LOG_DIR`, else None (no files)."""
    value = log_dir if log_dir is not None else os.environ.get("RLM_LOG_DIR")
    return Path(value).expanduser() if value else None


class Tracer:
    """Collects events in memory, writes them as JSONL when given a directory, tells listeners."""

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

    def start(self, run_id: str) -> None:
        """Begin a new run: forget old events, open its file if logging."""
        with self._lock:
            self.run_id = run_id
            self.events = []
            self.path = None
            self._sink = None
            if self.log_dir is not None:
                try:
                    self.log_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot use {str(self.log_dir)!r} as the log directory ({exc.strerror}); "
                        "pass another log_dir / --log-dir or unset RLM_LOG_DIR"
                    ) from None
                self.path = self.log_dir / f"{run_id}.jsonl"
                self._sink = JsonlSink(self.path, Redactor(self.secrets))

    def emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)
            if self._sink is not None:
                self._sink.write(event.to_dict())
        for listener in self.listeners:
            listener(event)
