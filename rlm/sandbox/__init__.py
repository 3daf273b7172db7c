"""Where model-written code runs. One module per backend, chosen by name through `create_sandbox`."""

from __future__ import annotations

import importlib

from rlm.errors import ConfigError
from rlm.sandbox.base import ContextSource, ExecResult, LLMBridge, Sandbox, SubCallFailed

__all__ = ["SANDBOXES", "ContextSource", "ExecResult", "LLMBridge", "Sandbox", "SubCallFailed", "create_sandbox"]

# name -> "module:Class"; imported only when chosen.
SANDBOXES = {
    "subprocess": "rlm.sandbox.subprocess:SubprocessSandbox",
    "inprocess": "rlm.sandbox.inprocess:InProcessSandbox",
}


def create_sandbox(name: str, bridge: LLMBridge) -> Sandbox:
    """Start the sandbox registered under `name`, answering `llm_query` calls with `bridge`."""
    try:
        target = SANDBOXES[name]
    except KeyError:
        raise ConfigError(f"unknown sandbox {name!r}; choose one of: {', '.join(SANDBOXES)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)(bridge)
