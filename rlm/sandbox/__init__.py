"""Where model-written code runs. One module per backend, chosen by name through `create_sandbox`.

Levels, weakest first: `inprocess` (no isolation), `subprocess` (a worker process: crashes,
hangs and limits, not hostile code), `strict` (the worker confined by Landlock and seccomp)
and `bwrap` (the worker in bubblewrap namespaces, plus seccomp). `auto`, the default, is not
a level of its own: it stands for the strongest of bwrap, strict and subprocess that this
machine really runs (see `rlm.sandbox.auto`), and warns when that is subprocess. A level
named explicitly that this machine cannot provide raises SandboxUnavailable when created;
there is never a silent fallback from it.
"""

from __future__ import annotations

import importlib

from rlm.errors import ConfigError

TYPE_CHECKING = False  # not imported from typing: the REPL worker imports this package too
if TYPE_CHECKING:
    from typing import Any

    from rlm.sandbox.base import (
        ContextSource,
        ExecResult,
        LLMBridge,
        Sandbox,
        SandboxFactory,
        SandboxLimits,
        SubCallFailed,
        parse_size,
    )

__all__ = [
    "AUTO",
    "SANDBOXES",
    "ContextSource",
    "ExecResult",
    "LLMBridge",
    "Sandbox",
    "SandboxFactory",
    "SandboxLimits",
    "SubCallFailed",
    "check_available",
    "create_sandbox",
    "parse_size",
    "resolve_level",
    "sandbox_class",
]

_OWN = {"AUTO", "SANDBOXES", "check_available", "create_sandbox", "resolve_level", "sandbox_class"}
_FROM_BASE = frozenset(__all__) - _OWN


def __getattr__(name: str) -> Any:
    # Lazily: the worker process imports this package too, and starts ~25 ms sooner without
    # base's dataclasses, typing and pathlib.
    if name in _FROM_BASE:
        return getattr(importlib.import_module("rlm.sandbox.base"), name)
    raise AttributeError(f"module 'rlm.sandbox' has no attribute {name!r}")


# name -> "module:Class"; imported only when chosen.
SANDBOXES = {
    "subprocess": "rlm.sandbox.subprocess:SubprocessSandbox",
    "inprocess": "rlm.sandbox.inprocess:InProcessSandbox",
    "strict": "rlm.sandbox.strict:StrictSandbox",
    "bwrap": "rlm.sandbox.bwrap:BwrapSandbox",
}
AUTO = "auto"  # the default: the strongest level this machine provides (rlm.sandbox.auto)


def resolve_level(name: str) -> str:
    """The level `name` runs at: itself, or for "auto" the level chosen for this process.

    The first "auto" checks what the machine provides (and issues IsolationWarning if only
    `subprocess` is left); later ones return the same level at once.
    """
    if name != AUTO:
        return name
    from rlm.sandbox.auto import auto_choice

    return auto_choice().level


def create_sandbox(
    name: str, bridge: LLMBridge, limits: SandboxLimits | None = None, *, tools: list | None = None
) -> Sandbox:
    """Start the sandbox registered under `name` (or chosen by "auto"), answering `llm_query`
    calls with `bridge`.

    `limits` default to `SandboxLimits()`; `tools`: the specs of the host tools the REPL
    offers (`rlm.tools.tool_specs`). Raises ConfigError for an unknown name and
    SandboxUnavailable when this machine cannot provide the level.
    """
    from rlm.sandbox.base import SandboxLimits

    limits = limits if limits is not None else SandboxLimits()
    return sandbox_class(name)(bridge, limits, tools=tools) if tools else sandbox_class(name)(bridge, limits)


def sandbox_class(name: str) -> type[Sandbox]:
    """The class registered under `name`, or chosen by "auto" (ConfigError if none is)."""
    try:
        target = SANDBOXES[resolve_level(name)]
    except KeyError:
        raise ConfigError(f"unknown sandbox {name!r}; choose one of: {', '.join([AUTO, *SANDBOXES])}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def check_available(name: str, limits: SandboxLimits | None = None) -> None:
    """Check a choice before any session starts, without starting anything.

    ConfigError for an unknown name or limits the level cannot enforce; SandboxUnavailable
    (saying what to install) if this machine cannot run the level.
    """
    from rlm.sandbox.base import SandboxLimits

    chosen = sandbox_class(name)
    chosen.check_limits(limits if limits is not None else SandboxLimits())
    chosen.check_platform()
