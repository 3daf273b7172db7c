"""The REPL session that runs model-written code.

`Session` holds one persistent namespace: `context`, the scaffold functions (`llm_query`,
`llm_query_batched`, `FINAL`, `FINAL_VAR`, `SHOW_VARS`) and whatever the model defines. A
multi-turn session (rlm.session) also loads named values: its first context as `context_0`
too, later ones as `context_1`, `context_2`..., and `history` (earlier questions and answers,
and turns taken out by compaction); all of them are put back before every cell, like `context`.
The worker levels run it in a child process (serve.py: confinement, then frames over the
child's stdin/stdout); the in-process sandbox uses it directly.

Standard library only: this module is imported inside the worker, where start-up time counts.
"""

from __future__ import annotations

import ast
import io
import json
import linecache
import mmap
import os
import sys
import threading
import time
import traceback

TYPE_CHECKING = False  # typing costs the worker ~5 ms of start-up; type checkers read this as True
if TYPE_CHECKING:
    from typing import Any

    from rlm.sandbox.base import LLMBridge

from rlm._text import BoundedText
from rlm.sandbox.describe import describe_context

__all__ = ["FinalAnswer", "LLMQueryError", "Session", "SCAFFOLD_NAMES", "ToolError"]

SCAFFOLD_NAMES = (
    "context", "context_bytes", "llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched",
    "FINAL", "FINAL_VAR", "SHOW_VARS",
)


class FinalAnswer(BaseException):
    """Raised by FINAL / FINAL_VAR to end the cell with an answer.

    A BaseException, so that `except Exception:` in model code cannot swallow it.
    """

    def __init__(self, value: str) -> None:
        super().__init__(value)
        self.value = value


class LLMQueryError(RuntimeError):
    """A sub-model call failed; raised inside model code so the model can react."""


class ToolError(RuntimeError):
    """A host tool raised, timed out or returned what is not JSON; raised inside model code."""


def _short_repr(value: Any, limit: int) -> str:
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return repr(value[:limit]) + f" ... ({len(value):,} in total)"
    return repr(value)


class _CellStream(io.TextIOBase):
    """A text stream writing into a cell's bounded buffer."""

    def __init__(self, sink: BoundedText) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        return self._sink.write(text)


class _ThreadRouter:
    """Stands in for sys.stdout/sys.stderr while cells run inside the host process.

    Writes from a thread that is running a cell go to that cell's buffer; all other writes,
    and every other attribute (encoding, fileno, buffer, isatty...), go to the stream that was
    there before. Concurrent cells never mix their output and the host's own printing is
    untouched. It is installed while at least one cell runs and removed after the last.
    """

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback
        self.local = threading.local()
        self.users = 0

    def write(self, text: str) -> int:
        target = getattr(self.local, "target", None)
        return (target or self.fallback).write(text)

    def flush(self) -> None:
        target = getattr(self.local, "target", None)
        (target or self.fallback).flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fallback, name)


_router_lock = threading.Lock()


def _acquire_router(name: str) -> _ThreadRouter:
    with _router_lock:
        current = getattr(sys, name)
        if not isinstance(current, _ThreadRouter):
            current = _ThreadRouter(current)
            setattr(sys, name, current)
        current.users += 1
        return current


def _release_router(name: str, router: _ThreadRouter) -> None:
    with _router_lock:
        router.users -= 1
        if router.users == 0 and getattr(sys, name) is router:
            setattr(sys, name, router.fallback)


class Session:
    """One persistent REPL namespace and the rules for running cells in it.

    `process_wide=True` (inside a worker process) swaps sys.stdout/sys.stderr for the cell's
    buffers while a cell runs, so output from threads the model starts is caught too.
    `process_wide=False` (inside the host) routes output per thread instead.
    """

    def __init__(self, llm: LLMBridge, *, process_wide: bool, tools: list | None = None) -> None:
        self._llm = llm
        self._process_wide = process_wide
        self._context: Any = None
        self._context_bytes: Any = None  # the raw bytes of a text context (an mmap in a worker)
        self._named: dict[str, Any] = {}  # context_0 (an alias of context), context_1..., history
        self._cells = 0
        self._guard: Any = None  # integrity.Guard, in a worker process, from the first cell on
        self.running_user_code = False
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self._scaffold = {
            "llm_query": self._llm_query,
            "llm_query_batched": self._llm_query_batched,
            "FINAL": self._final,
            "FINAL_VAR": self._final_var,
            "SHOW_VARS": self._show_vars,
            "rlm_query": self._rlm_query,
            "rlm_query_batched": self._rlm_query_batched,
        }
        # Host tools (rlm/tools.py): a stand-in function each, or a value kept as JSON text and
        # parsed afresh before every cell, so that model code cannot change it for later cells.
        self._tool_values: dict[str, str] = {}
        for spec in tools or ():
            if "value" in spec:
                self._tool_values[spec["name"]] = spec["value"]
            else:
                self._scaffold[spec["name"]] = self._tool_function(spec["name"], spec["doc"])
        if tools:
            self._tool_values["ToolError"] = ""  # the class, put back with the values: see _restore_scaffold
        self._tools = frozenset((*self._scaffold, *self._tool_values))
        self._restore_scaffold()

    # -- context -----------------------------------------------------------------------

    def set_context(self, value: Any, raw: Any = None, name: str = "context") -> dict:
        """Make `value` the context; `raw` is what `context_bytes` shows (None for non-text).

        `name` "context_0" is the context under both names; "context_1"... and "history" are
        a session's further values (their raw bytes are not kept).
        """
        if name not in ("context", "context_0"):
            _check_named(name)
            self._named[name] = value
            self.namespace[name] = value
            return describe_context(value)
        self._context = value
        self._context_bytes = raw
        self.namespace["context_bytes"] = raw
        self.namespace["context"] = value
        if name == "context_0":
            self._named["context_0"] = value
            self.namespace["context_0"] = value
        return describe_context(value)

    def load_context_fd(self, fd: int, fmt: str, name: str = "context") -> dict:
        """Load the context from an open file, which is closed here.

        'json' is parsed. 'text' is memory-mapped (that mapping is `context_bytes`) and decoded
        once into `context`, bad UTF-8 replaced; a pure-ASCII file is read straight into the
        string (textfile.py). 'str' is text the host wrote from a `str` (surrogates passed
        through), so that the context is exactly the string the user gave.
        """
        self.set_context(None, name=name)  # let a previous context go before the new one is built
        with open(fd, "rb") as handle:
            if fmt == "json":
                handle.seek(0)  # the offset is shared with every other descriptor of this open file
                return self.set_context(json.load(handle), name=name)
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return self.set_context("", b"", name=name)
            raw = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            from rlm.sandbox.textfile import read_ascii  # imports ctypes: only when a file comes

            text = read_ascii(handle.fileno(), size)
        errors = "surrogatepass" if fmt == "str" else "replace"
        return self.set_context(str(raw, "utf-8", errors) if text is None else text, raw, name=name)

    # -- running cells ------------------------------------------------------------------

    def execute(self, code: str, max_output: int) -> dict:
        """Run one cell; return its captured output, error text and final answer, if any."""
        self._guard_scaffold()
        self._restore_scaffold()
        self._cells += 1
        filename = f"<cell {self._cells}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        out, err = BoundedText(max_output), BoundedText(max_output)
        error = final = None
        interrupted = False
        started = time.perf_counter()
        try:
            with self._capture(out, err):
                self._run(code, filename, max_output)
        except FinalAnswer as answer:
            final = answer.value
        except KeyboardInterrupt:
            if not self._process_wide:
                raise  # in the host process this is the user's Ctrl-C, not a cell timeout
            interrupted = True
            error = "KeyboardInterrupt: the cell was interrupted"
        except BaseException as exc:  # model code may raise anything, SystemExit included
            error = _format_exception(exc)
        return {
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "error": error,
            "final": final,
            "interrupted": interrupted,
            "duration": time.perf_counter() - started,
        }

    def _run(self, code: str, filename: str, max_output: int) -> None:
        tree = compile(code, filename, "exec", ast.PyCF_ONLY_AST)  # not ast.parse: its frame would show in tracebacks
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        body = compile(tree, filename, "exec")
        tail = compile(ast.Expression(last.value), filename, "eval") if last is not None else None
        self.running_user_code = True
        try:
            if _pending_interrupt.is_set():  # a timeout signal that came while compiling
                _pending_interrupt.clear()
                raise KeyboardInterrupt
            exec(body, self.namespace)
            value = eval(tail, self.namespace) if tail is not None else None
        finally:
            self.running_user_code = False
            self._guard_scaffold()  # before any of our code runs again
        if value is not None:
            shown = _short_repr(value, max_output)  # the value's __repr__ is model code too
            self._guard_scaffold()
            print(shown)

    def _capture(self, out: BoundedText, err: BoundedText) -> "_Capture":
        return _Capture(self._process_wide, _CellStream(out), _CellStream(err))

    def get_variable(self, name: str) -> dict:
        """A user variable as answer text: {'found', 'value', 'names', 'error'}.

        Converting model-made objects to text runs model code (`__str__`); its failure is
        reported in 'error', never raised.
        """
        if (name not in self.namespace or name in SCAFFOLD_NAMES or name in self._named or name in self._tools
                or name.startswith("__")):
            return {"found": False, "value": None, "names": sorted(self._user_names())}
        try:
            return {"found": True, "value": _as_answer(self.namespace[name])}
        except Exception as exc:  # model-defined __str__ may raise anything; the model is told
            return {"found": True, "value": None, "error": f"{type(exc).__name__}: {exc}"}

    def _guard_scaffold(self) -> None:
        """In a worker, undo what earlier cells patched in the scaffold (see integrity.py).

        The snapshot is taken just before the first cell, when the worker is fully wired and
        no model code has run yet. In the host process (in-process sandbox) there is nothing
        to guard: model code there can do anything anyway.
        """
        if not self._process_wide:
            return
        if self._guard is not None:
            self._guard.restore()
            return
        from rlm.sandbox.integrity import Guard

        self._guard = Guard.capture(functions=[self._llm, *self._scaffold.values()])
        self._guard.keep_attributes(self, ("_llm", "_scaffold", "_process_wide", "_guard", "_tool_values", "_tools"))

    def _restore_scaffold(self) -> None:
        self.namespace.update(self._scaffold)
        for name, value in self._tool_values.items():
            self.namespace[name] = json.loads(value) if value else ToolError
        self.namespace["context"] = self._context
        self.namespace["context_bytes"] = self._context_bytes
        self.namespace.update(self._named)

    def _user_names(self) -> list[str]:
        return [
            name
            for name, value in self.namespace.items()
            if name not in SCAFFOLD_NAMES and name not in self._named and name not in self._tools
            and not name.startswith("_")
            and not isinstance(value, type(sys))
        ]

    # -- the scaffold functions the model calls ----------------------------------------

    def _llm_query(self, prompt: str, model: str | None = None) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"llm_query(prompt) takes a str, got {type(prompt).__name__}")
        return self._call_llm("llm_query", [_with_model(prompt, model)])[0]

    def _rlm_query(self, query: str, context: Any = None) -> str:
        return self._rlm_query_batched([query], None if context is None else [context])[0]

    def _rlm_query_batched(self, queries: list[str], contexts: list | None = None) -> list[str]:
        queries = list(queries)
        contexts = [None] * len(queries) if contexts is None else list(contexts)
        if len(contexts) != len(queries):
            raise ValueError(f"rlm_query_batched: {len(queries)} queries but {len(contexts)} contexts")
        items = []
        for index, (query, context) in enumerate(zip(queries, contexts)):
            if not isinstance(query, str):
                raise TypeError(f"rlm_query: query {index} is a {type(query).__name__}, not a str")
            items.append({"query": query, **_context_item(index, context)})
        if not items:
            return []
        return self._call_llm("rlm_query" if len(items) == 1 else "rlm_query_batched", items)

    def _llm_query_batched(self, prompts: list[str], model: str | None = None) -> list[str]:
        prompts = list(prompts)
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"llm_query_batched(prompts): item {index} is a {type(prompt).__name__}, not a str")
        if not prompts:
            return []
        return self._call_llm("llm_query_batched", [_with_model(prompt, model) for prompt in prompts])

    def _tool_function(self, name: str, doc: str) -> Any:
        """The stand-in for host tool `name`: its arguments go to the host as JSON, its result comes back so."""
        from rlm.sandbox.protocol import MAX_TOOL_CHARS

        def tool(*args: Any, **kwargs: Any) -> Any:
            try:
                text = json.dumps({"name": name, "args": args, "kwargs": kwargs}, ensure_ascii=True, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"{name}(): arguments must be JSON values (str, int, float, bool, None, list, dict): {exc}"
                ) from None
            if len(text) > MAX_TOOL_CHARS:
                raise ValueError(
                    f"{name}(): the arguments are {len(text):,} characters as JSON, over {MAX_TOOL_CHARS:,}; pass less"
                )
            try:
                return json.loads(self._call_llm("tool", [text])[0])
            except LLMQueryError as exc:
                raise ToolError(str(exc)) from None

        tool.__name__ = tool.__qualname__ = name
        tool.__doc__ = doc
        return tool

    def _call_llm(self, kind: str, prompts: list[str]) -> list[str]:
        # While the host answers, a timeout interrupt must not tear a frame in half: hold it
        # and raise it once the answer is in. Signals only ever reach the main thread.
        if threading.current_thread() is not threading.main_thread():
            return self._llm(kind, prompts)
        was_running, self.running_user_code = self.running_user_code, False
        try:
            return self._llm(kind, prompts)
        finally:
            self.running_user_code = was_running
            if was_running and _pending_interrupt.is_set():
                _pending_interrupt.clear()
                raise KeyboardInterrupt

    @staticmethod
    def _final(answer: Any) -> None:
        raise FinalAnswer(_as_answer(answer))

    def _final_var(self, name: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(
                f"FINAL_VAR takes the variable's name as a string, e.g. FINAL_VAR('answer'); got a "
                f"{type(name).__name__}. To answer with a value directly, call FINAL(value)."
            )
        key = name.strip().strip("'\"")
        found = self.get_variable(key)
        if not found["found"]:
            raise NameError(f"FINAL_VAR: there is no variable named {key!r}. Variables: {found['names']}")
        # Converted here, not through get_variable: a failing __str__ must reach the model as
        # the exception it raised.
        raise FinalAnswer(_as_answer(self.namespace[key]))

    def _show_vars(self) -> dict[str, str]:
        return {name: type(self.namespace[name]).__name__ for name in self._user_names()}


def _check_named(name: str) -> None:
    """A session's value may be `context_<n>` or `history`: never a scaffold function's name."""
    number = name[len("context_"):] if name.startswith("context_") else ""
    if name != "history" and not (number.isdigit() and number == str(int(number))):
        raise ValueError(f"a session value may be named context_<n> or history, not {name[:40]!r}")


def _context_item(index: int, context: Any) -> dict:
    """An rlm_query context as it travels: text, or a list / dict as JSON text (parsed only by
    the child's own sandbox: the host never parses nested data from a worker)."""
    if context is None or isinstance(context, str):
        return {"context": context, "format": "text", "file": False}
    if isinstance(context, (list, tuple, dict)):
        try:
            return {"context": json.dumps(context, ensure_ascii=False), "format": "json", "file": False}
        except (TypeError, ValueError):
            pass  # said below
    raise TypeError(
        f"rlm_query: context {index} must be a str, list or dict of plain values, not {type(context).__name__}"
    )


def _with_model(prompt: str, model: Any) -> Any:
    """A prompt as sent to the host: the text, or {prompt, model} when model code chose a sub-model."""
    from rlm.sandbox.protocol import MAX_MODEL_NAME

    if model is None:
        return prompt
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME:
        raise TypeError(f"llm_query(prompt, model=...): model is the name of an allowed sub-model, got {model!r:.100}")
    return {"prompt": prompt, "model": model}


def _as_answer(value: Any) -> str:
    if value is None or callable(value):
        what = "None" if value is None else f"a {type(value).__name__}"
        raise TypeError(f"the final answer is {what}, not a value; give the answer itself, e.g. FINAL(result)")
    return value if isinstance(value, str) else str(value)


class _Capture:
    """Sends sys.stdout/sys.stderr writes to a cell's buffers for the duration of a `with`."""

    def __init__(self, process_wide: bool, out: _CellStream, err: _CellStream) -> None:
        self._process_wide = process_wide
        self._streams = {"stdout": out, "stderr": err}
        self._saved: dict[str, Any] = {}
        self._routers: dict[str, _ThreadRouter] = {}

    def __enter__(self) -> None:
        for name, stream in self._streams.items():
            if self._process_wide:
                self._saved[name] = getattr(sys, name)
                setattr(sys, name, stream)
            else:
                router = self._routers[name] = _acquire_router(name)
                self._saved[name] = getattr(router.local, "target", None)
                router.local.target = stream

    def __exit__(self, *exc_info: object) -> None:
        for name, saved in self._saved.items():
            if self._process_wide:
                setattr(sys, name, saved)
            else:
                router = self._routers[name]
                router.local.target = saved
                _release_router(name, router)


def _format_exception(exc: BaseException) -> str:
    """A traceback showing only the model's own frames (not this module's)."""
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list(
        [frame for frame in summary.stack if frame.filename != __file__]
    )
    return "".join(summary.format()).rstrip()


# Set by the worker process's SIGINT handler (serve.py) when a timeout signal comes while no
# model code runs; the next cell, or the next sub-call's return, raises KeyboardInterrupt then.
_pending_interrupt = threading.Event()
