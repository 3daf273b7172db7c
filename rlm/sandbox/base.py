"""What every sandbox provides: run a cell, load the context, read a variable, close; and its limits."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from rlm._text import clean_text, truncate_middle
from rlm.errors import ConfigError
from rlm.sandbox.protocol import CUT_ROOM, MAX_ANSWER_CHARS, MAX_ERROR_CHARS

__all__ = [
    "ChildQuery",
    "ContextSource",
    "ExecResult",
    "LLMBridge",
    "Sandbox",
    "SandboxFactory",
    "SandboxLimits",
    "SubCallFailed",
    "child_queries",
    "parse_size",
    "result_from_session",
    "timeout_message",
]

GiB = 1 << 30


class SubCallFailed(Exception):
    """Raised by the host's LLM bridge when a sub-call failed in a way the model should see.

    The sandbox turns it into an exception inside the model's code. Any other exception from
    the bridge is a failure of the run and propagates to the caller.
    """


# (kind, items) -> one answer per item. kind is "llm_query" or "llm_query_batched" (items are
# prompts), or "rlm_query" or "rlm_query_batched" (items are ChildQuery).
LLMBridge = Callable[[str, list], "list[str]"]


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Resource limits of a worker process, set by the worker on itself before any model code runs.

    `memory`: bytes of address space (RLIMIT_AS); past it, allocations in model code raise
    MemoryError and the session goes on. The context counts twice against it (the mapped
    file and the decoded `str`): 4 GiB fits a 1 GB ASCII context; raise it for larger or
    non-ASCII ones.
    `cpu_time`: CPU seconds one worker may use in its life (RLIMIT_CPU). A worker past it
    is killed and replaced: its variables are lost and the model is told.
    `file_size`: largest file model code may write (RLIMIT_FSIZE); writing past it raises
    OSError (EFBIG). Under `bwrap` it is also the size of the private scratch file system.
    None means no limit. Per-cell wall time and output size are arguments of `Sandbox.run`.
    The in-process sandbox cannot enforce any of these.
    """

    memory: int | None = 4 * GiB
    cpu_time: float | None = None
    file_size: int | None = 1 * GiB

    def __post_init__(self) -> None:
        for name in ("memory", "cpu_time", "file_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"sandbox limit {name} must be a positive number or None, got {value!r}")
        if self.memory is not None and self.memory < 256 << 20:
            raise ConfigError(f"memory limit {self.memory} is too small for a Python worker; give at least 256 MiB")

    def as_message(self) -> dict:
        """The limits as the worker receives them (whole numbers; None for no limit)."""
        cpu = None if self.cpu_time is None else max(1, round(self.cpu_time))
        return {"memory": self.memory, "cpu_time": cpu, "file_size": self.file_size}


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int | None:
    """'4G', '512M', '1.5G', '123456' (bytes) -> bytes; 'none' or 'off' -> None (no limit)."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    if cleaned in ("NONE", "OFF"):
        return None
    unit = cleaned[-1:] if cleaned[-1:] in _SIZE_UNITS else ""
    number = cleaned[: len(cleaned) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"{text!r} is not a size; write it like 4G, 512M or 1048576 (bytes), or 'none'") from None
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive, or 'none' for no limit")
    return int(value * _SIZE_UNITS[unit])


@dataclass(frozen=True, kw_only=True)
class ContextSource:
    """Where a sandbox gets the context: a value in memory, JSON text, or a file it reads itself.

    `value`: a Python value (the user's). `json_text`: a JSON document as text, parsed only
    by the sandbox (an `rlm_query` context from model code: the host never parses it).
    `path`: a file the sandbox opens. `handle`: a file already open (a descriptor), read
    from its start; the sandbox makes its own copy of the descriptor and never closes this
    one. `fmt` says how a file is read: "text" (UTF-8, memory-mapped) or "json".
    """

    value: Any = None
    path: Path | None = None
    handle: int | None = None
    json_text: str | None = None
    fmt: str = "text"


@dataclass(frozen=True)
class ChildQuery:
    """One `rlm_query` of model code: the question, and its context (None: the question is the context)."""

    query: str
    context: ContextSource | None


def child_queries(items: list[dict], files: list[int]) -> list[ChildQuery]:
    """The rlm_query items a session sent (checked against protocol.py's schema), as ChildQuery.

    `files` are the context files (read-only descriptors), in the order of the items marked "file".
    """
    queries, remaining = [], iter(files)
    for item in items:
        context = item["context"]
        if item["file"]:
            source: ContextSource | None = ContextSource(handle=next(remaining), fmt=item["format"])
        elif context is None:
            source = None
        elif item["format"] == "json":
            source = ContextSource(json_text=context)
        else:
            source = ContextSource(value=context)
        queries.append(ChildQuery(item["query"], source))
    return queries


@dataclass(frozen=True, kw_only=True)
class ExecResult:
    """The outcome of one cell.

    `error` is the traceback text the model sees; `final` the answer given with FINAL /
    FINAL_VAR from code; `timed_out` means the cell hit its time limit; `restarted` that the
    worker had to be replaced, so the session's variables are gone (the context is reloaded).
    """

    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    final: str | None = None
    timed_out: bool = False
    restarted: bool = False
    duration: float = 0.0


def timeout_message(timeout: float) -> str:
    """What the model is told when a cell was interrupted at its time limit."""
    return f"The cell ran past its {timeout:g} s limit and was interrupted. Variables are kept."


def result_from_session(outcome: dict, *, timed_out: bool, timeout: float, max_output: int) -> ExecResult:
    """An ExecResult from the dict `Session.execute` returns (in a worker or in process).

    The texts are held to the caps the host states, whatever the session did: outputs to
    `max_output` characters, the answer to `MAX_ANSWER_CHARS`, the error to `MAX_ERROR_CHARS`
    (a cut is marked in the text; a session's own cut mark is let through).
    """
    final = outcome.get("final")
    error = timeout_message(timeout) if timed_out else outcome.get("error")
    return ExecResult(
        stdout=_capped(outcome.get("stdout", ""), max_output),
        stderr=_capped(outcome.get("stderr", ""), max_output),
        error=_capped(error, MAX_ERROR_CHARS) if error is not None else None,
        final=_capped(final, MAX_ANSWER_CHARS) if final is not None else None,
        timed_out=timed_out,
        duration=outcome.get("duration", 0.0),
    )


def _capped(text: str, limit: int) -> str:
    if len(text) > limit + CUT_ROOM:  # a text the session cut itself is not cut again
        text = truncate_middle(text, limit)
    return clean_text(text)


class Sandbox(abc.ABC):
    """A persistent REPL session that runs model-written code.

    Made with `Sandbox(bridge, limits)`: a sandbox class is itself a `SandboxFactory`.
    """

    name: ClassVar[str]
    isolated: ClassVar[bool]  # False: model code can reach everything the host process can

    @classmethod
    def check_platform(cls) -> None:
        """Raise SandboxUnavailable, saying what to install, if this machine cannot run this level.

        Cheap (nothing is started), so callers can check a choice long before the first session.
        """

    @classmethod
    def check_limits(cls, limits: SandboxLimits) -> None:
        """Raise ConfigError if this level cannot enforce `limits` (every worker level can)."""

    @abc.abstractmethod
    def load_context(self, source: ContextSource, *, name: str = "context") -> dict:
        """Load `context` into the session; return its description (type, lengths).

        `name`: "context_0" loads the context under that name too; "context_1"... and "history"
        load a multi-turn session's further values (rlm.session), put back before every cell.
        """

    @abc.abstractmethod
    def run(self, code: str, *, timeout: float, max_output: int) -> ExecResult:
        """Run one cell with a wall-clock limit; output streams are cut to `max_output` chars."""

    @abc.abstractmethod
    def get_variable(self, name: str) -> dict:
        """{'found': bool, 'value': str | None, 'names': [...]} for a user variable."""

    @property
    def confinement(self) -> dict | None:
        """What the current worker said it applied before any model code ran: `landlock_abi`
        (None: no Landlock), `namespaces` (its own, named as in /proc/self/ns: "ipc", "mnt",
        "net"...), `scratch_size` (bytes; None: scratch is a host directory). None in-process,
        and between a crash and the next cell."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the session and remove what it left on disk. Safe to call twice."""

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# How a REPL session gets its sandbox: called with the bridge answering `llm_query` and the
# worker's limits. Every sandbox class fits; so does any function with that signature.
SandboxFactory = Callable[[LLMBridge, SandboxLimits], Sandbox]
