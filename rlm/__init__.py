"""rlm: Recursive Language Models over a persistent Python REPL.

    from rlm import RLM_REPL
    answer = RLM_REPL(model="auto").completion(context=big_text, query="...")

Names are imported lazily, so that the REPL worker process, which imports this package,
starts without loading the HTTP client.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not imported from typing: the REPL worker imports this package too
if TYPE_CHECKING:
    from typing import Any

from rlm import errors as _errors

__version__ = "0.1.0"

__all__ = ["RLM", "RLM_REPL", "RLMResult", "ResponseLimits", "Session", "Tool", "arun", "run", "session", *_errors.__all__, "__version__"]

_LAZY = {
    "RLM": "rlm.rlm", "RLM_REPL": "rlm.rlm_repl", "ResponseLimits": "rlm.utils.limits",
    "RLMResult": "rlm.result", "run": "rlm.result", "arun": "rlm.result", "Tool": "rlm.tools",
    "Session": "rlm.sessions", "session": "rlm.sessions",
}


def __getattr__(name: str) -> Any:
    if name in _errors.__all__:
        return getattr(_errors, name)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlm' has no attribute {name!r}")
