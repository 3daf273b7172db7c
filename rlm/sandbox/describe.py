"""What the root model is told about a context: its type, total length and chunk lengths.

A neutral module: the worker describes the context it loaded, and the host describes one it
can measure itself (text, or a list of texts) without waiting for the worker. Neither side
imports the other's code for it. Standard library only.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["MAX_CHUNKS_LISTED", "describe_context"]

MAX_CHUNKS_LISTED = 100  # the paper lists the first ~100 chunk lengths; the count says how many there are


def describe_context(value: Any) -> dict:
    """Type, total length in characters and chunk lengths of a context value."""
    if isinstance(value, str):
        lengths = [len(value)]
    elif isinstance(value, dict):
        lengths = [_length(v) for v in value.values()]
    elif isinstance(value, (list, tuple)):
        lengths = [_length(v) for v in value]
    else:
        lengths = [_length(value)]
    return {
        "type": type(value).__name__,
        "total_length": sum(lengths),
        "chunk_count": len(lengths),
        "chunk_lengths": lengths[:MAX_CHUNKS_LISTED],
    }


def _length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, ensure_ascii=False, default=str))
