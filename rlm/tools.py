"""Custom tools: host Python callables the model calls from the REPL as plain functions.

`RLM_REPL(tools=...)` takes a dict of names to functions (or values), a list of functions, or
`Tool` objects. A function never crosses into the worker: the worker gets its name, signature
and the first line of its docstring (the "setup" frame) and makes a stand-in that sends a
"tool" sub-call (protocol.py) with the arguments as JSON; the host runs the function in the
tree's pool under its timeout and sends the result back as JSON. A value that is not callable
becomes a read-only variable (sent once, as JSON, restored before every cell).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import inspect
import json
import keyword
import re
from typing import Any, Iterable, Mapping

from rlm.errors import ConfigError
from rlm.sandbox.base import SubCallFailed
from rlm.sandbox.protocol import MAX_TOOL_CHARS

__all__ = ["RESERVED_NAMES", "Tool", "call_tool", "load_tools", "resolve_tools", "tool_specs"]

# Names of the REPL's own scaffold (and Python's module names) a tool may not take.
RESERVED_NAMES = frozenset({
    "context", "context_bytes", "llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched",
    "FINAL", "FINAL_VAR", "SHOW_VARS", "history", "ToolError",
})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tool:
    """A host function (or value) exposed in the REPL under `name`.

    `description` defaults to the first line of the function's docstring; `timeout` (seconds
    one call may take on the host) defaults to the run's `exec_timeout`.
    """

    fn: Any
    name: str = ""
    description: str = ""
    timeout: float | None = None

    def __init__(self, fn: Any, *, name: str | None = None, description: str | None = None,
                 timeout: float | None = None) -> None:
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "name", name if name is not None else getattr(fn, "__name__", ""))
        object.__setattr__(self, "description", description if description is not None else _first_line(fn))
        object.__setattr__(self, "timeout", timeout)

    @property
    def is_function(self) -> bool:
        return callable(self.fn)

    def signature(self) -> str:
        """`name(arguments)` as the prompt shows it."""
        try:
            try:  # annotations written as strings (`from __future__ import annotations`) shown as types
                return f"{self.name}{inspect.signature(self.fn, eval_str=True)}"
            except NameError:  # an annotation naming what is not importable at run time
                return f"{self.name}{inspect.signature(self.fn)}"
        except (TypeError, ValueError):  # a builtin without a signature
            return f"{self.name}(...)"


def _first_line(fn: Any) -> str:
    if not callable(fn):
        return ""
    doc = inspect.getdoc(fn) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


ToolsArg = Mapping[str, Any] | Iterable[Any] | None


def resolve_tools(tools: ToolsArg, *, what: str = "tools") -> dict[str, Tool]:
    """`tools` as name -> Tool, checked: ConfigError for a reserved or invalid name, a
    duplicate, or a value that is not JSON (or too large)."""
    if tools is None:
        return {}
    if isinstance(tools, Mapping):
        items = [value if isinstance(value, Tool) and value.name == name else Tool(
            value.fn if isinstance(value, Tool) else value, name=name,
            description=value.description if isinstance(value, Tool) else None,
            timeout=value.timeout if isinstance(value, Tool) else None,
        ) for name, value in tools.items()]
    elif isinstance(tools, (str, bytes)) or not isinstance(tools, Iterable):
        raise ConfigError(
            f"{what} must be a dict of names to functions, a list of functions or rlm.Tool objects"
        )
    else:
        items = []
        for value in tools:
            if not isinstance(value, Tool) and not callable(value):
                raise ConfigError(
                    f"{what}: {value!r} in a list is not a function; give values in a dict: {{'name': value}}"
                )
            items.append(value if isinstance(value, Tool) else Tool(value))
    resolved: dict[str, Tool] = {}
    for tool in items:
        _check(tool, what)
        if tool.name in resolved:
            raise ConfigError(
                f"{what}: two tools are named {tool.name!r}; give one another name with rlm.Tool(fn, name=...)"
            )
        resolved[tool.name] = tool
    return resolved


def _check(tool: Tool, what: str) -> None:
    name = tool.name
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ConfigError(
            f"{what}: {name!r} is not a usable name; a tool's name is a Python identifier not starting with '_'"
        )
    if name in RESERVED_NAMES or keyword.iskeyword(name) or re.fullmatch(r"context_\d+", name):
        raise ConfigError(f"{what}: {name!r} is a name the REPL reserves for itself; give the tool another name")
    if tool.timeout is not None and not (0 < tool.timeout < 1e9):
        raise ConfigError(f"{what}: the timeout of {name!r} must be a positive number of seconds")
    if not tool.is_function:
        try:
            text = json.dumps(tool.fn, ensure_ascii=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what}: the value of {name!r} is neither a function nor JSON ({exc})") from None
        if len(text) > MAX_TOOL_CHARS:
            raise ConfigError(
                f"{what}: the value of {name!r} is {len(text):,} characters as JSON, over {MAX_TOOL_CHARS:,}; "
                "pass large data as the context instead"
            )


def tool_specs(tools: Mapping[str, Tool]) -> list[dict]:
    """What the worker gets for each tool (setup frame): name, signature, description, and for
    a value its JSON text."""
    specs = []
    for tool in tools.values():
        spec = {"name": tool.name, "signature": tool.signature(), "doc": tool.description}
        if not tool.is_function:
            spec["value"] = json.dumps(tool.fn, ensure_ascii=True)
        specs.append(spec)
    return specs


def load_tools(reference: str) -> dict[str, Tool]:
    """Tools from `module:attr` (a dict or list of functions), for `rlm ask --tools`."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--tools takes module:attribute (e.g. mytools:TOOLS), not {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--tools: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    try:
        value = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"--tools: module {module_name!r} has no attribute {attr!r}") from None
    return resolve_tools(value, what="--tools")


async def call_tool(tool: Tool, call: dict, *, timeout: float, executor: concurrent.futures.Executor) -> str:
    """Run one decoded call (`protocol.decode_tool_call`) of `tool` on the host: a plain function
    in `executor` (the tree's pool), a coroutine function on the event loop, either within
    `timeout` seconds. Returns the result as ASCII JSON text; SubCallFailed (an exception in
    model code) if the tool raised, timed out, or returned what is not JSON or is too large."""
    name, args, kwargs = tool.name, call["args"], call["kwargs"]
    try:
        if inspect.iscoroutinefunction(tool.fn):
            value = await asyncio.wait_for(tool.fn(*args, **kwargs), timeout)
        else:
            running = asyncio.wrap_future(executor.submit(tool.fn, *args, **kwargs))
            value = await asyncio.wait_for(running, timeout)
    except asyncio.TimeoutError:
        raise SubCallFailed(f"{name}() did not return within {timeout:g} s (the tool's timeout)") from None
    except SubCallFailed:  # the tool's own message for the model (a replay's recorded failure, say)
        raise
    except Exception as exc:  # the tool's own failure: the model sees it, the run goes on
        raise SubCallFailed(f"{name}() raised {type(exc).__name__}: {exc}") from None
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SubCallFailed(f"{name}() returned a {type(value).__name__}, which is not JSON ({exc})") from None
    if len(text) > MAX_TOOL_CHARS:
        raise SubCallFailed(f"{name}() returned {len(text):,} characters of JSON, over {MAX_TOOL_CHARS:,}")
    return text
