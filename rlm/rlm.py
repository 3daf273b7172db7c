"""`RLM`: the interface every Recursive Language Model implementation provides."""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["RLM"]


class RLM(abc.ABC):
    """Answers a query over a context too large for a model's window.

    `completion()` returns the answer text, or None when no final answer was given within
    the iteration limit. `cost_summary()` reports usage and cost since creation or `reset()`.
    """

    @abc.abstractmethod
    def completion(self, context: Any, query: str) -> str | None:
        """Answer `query` about `context`."""

    @abc.abstractmethod
    def cost_summary(self) -> dict[str, Any]:
        """Usage and cost so far; `total_cost` is always a float in USD."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget usage, trace and any per-run state."""
