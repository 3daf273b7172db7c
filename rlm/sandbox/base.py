"""What every sandbox provides: run a cell, load the context, read a variable, close."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from rlm._text import clean_text

__all__ = ["ContextSource", "ExecResult", "LLMBridge", "Sandbox", "SubCallFailed", "result_from_session", "timeout_message"]


class SubCallFailed(Exception):
    """Raised by the host's LLM bridge when a sub-call failed in a way the model should see.

    The sandbox turns it into an exception inside the model's code. Any other exception from
    the bridge is a failure of the run and propagates to the caller.
    """


# (kind, prompts) -> one answer per prompt; kind is "llm_query" or "llm_query_batched".
LLMBridge = Callable[[str, "list[str]"], "list[str]"]


@dataclass(frozen=True, kw_only=True)
class ContextSource:
    """Where a sandbox gets the context: a value in memory, or a file it reads itself.

    `fmt` is "text" (a UTF-8 file, memory-mapped) or "json" (a JSON document).
    """

    value: Any = None
    path: Path | None = None
    fmt: str = "text"


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


def result_from_session(outcome: dict, *, timed_out: bool, timeout: float) -> ExecResult:
    """An ExecResult from the dict `Session.execute` returns (in a worker or in process)."""
    final = outcome.get("final")
    error = timeout_message(timeout) if timed_out else outcome.get("error")
    return ExecResult(
        stdout=clean_text(outcome.get("stdout", "")),
        stderr=clean_text(outcome.get("stderr", "")),
        error=clean_text(error) if error is not None else None,
        final=clean_text(final) if final is not None else None,
        timed_out=timed_out,
        duration=outcome.get("duration", 0.0),
    )


class Sandbox(abc.ABC):
    """A persistent REPL session that runs model-written code."""

    name: ClassVar[str]
    isolated: ClassVar[bool]  # False: model code can reach everything the host process can

    @abc.abstractmethod
    def load_context(self, source: ContextSource) -> dict:
        """Load `context` into the session; return its description (type, lengths)."""

    @abc.abstractmethod
    def run(self, code: str, *, timeout: float, max_output: int) -> ExecResult:
        """Run one cell with a wall-clock limit; output streams are cut to `max_output` chars."""

    @abc.abstractmethod
    def get_variable(self, name: str) -> dict:
        """{'found': bool, 'value': str | None, 'names': [...]} for a user variable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the session and remove what it left on disk. Safe to call twice."""

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
