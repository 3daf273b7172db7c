"""How servers say that a request is too long for the model's context window, as data.

Each server words the refusal its own way; `PATTERNS` lists the wordings we know (and the
sizes they state), so that a refusal becomes `ContextWindowExceeded` with the window and the
request size filled in when the server gave them. A refusal that matches none of them stays
an ordinary `ClientError` with the server's text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rlm.errors import ContextWindowExceeded

__all__ = ["PATTERNS", "overflow_error"]

_REFUSAL_STATUSES = (400, 413, 422)

# (server, pattern); named groups `window` and `request` are token counts when the text states them.
PATTERNS: tuple[tuple[str, str], ...] = (
    ("llama.cpp",
     r"request \((?P<request>\d+) tokens\) exceeds the available context size \((?P<window>\d+) tokens\)"),
    ("llama.cpp (older)", r"exceeds? the available context size"),
    ("OpenAI, vLLM, DeepSeek, OpenRouter",
     r"maximum context length is (?P<window>\d+) tokens\. However, (?:your messages resulted in|you requested"
     r"(?: about)?) (?P<request>\d+) tokens"),
    ("vLLM (newer)",
     r"maximum context length is (?P<window>\d+) tokens and your request has (?P<request>\d+) input tokens"),
    ("OpenAI-compatible", r"maximum context length is (?P<window>\d+) tokens"),
    ("OpenAI", r"context_length_exceeded|exceeds the context window"),
    ("Anthropic", r"prompt is too long: (?P<request>\d+) tokens > (?P<window>\d+) maximum"),
    ("SGLang",
     r"input \((?P<request>\d+) tokens\) is longer than the model's context length \((?P<window>\d+) tokens\)"),
    ("Gemini",
     r"input token count \((?P<request>\d+)\) exceeds the maximum number of tokens allowed \((?P<window>\d+)\)"),
    ("Text Generation Inference",
     r"`inputs` tokens \+ `max_new_tokens` must be <= (?P<window>\d+)\. Given: (?P<request>\d+) `inputs` tokens"),
)
_COMPILED = tuple((server, re.compile(pattern, re.IGNORECASE | re.DOTALL)) for server, pattern in PATTERNS)


def overflow_error(url: str, status: int, body: str, brief: str) -> ContextWindowExceeded | None:
    """`ContextWindowExceeded` when a refusal (`status`, `body`) says the request is too long
    for the window; None for any other answer. `brief` is the server's message, for ours."""
    if status not in _REFUSAL_STATUSES:
        return None
    window, request = _stated_sizes(body)
    for _, pattern in _COMPILED:
        found = pattern.search(body)
        if found is None:
            continue
        groups = found.groupdict()
        window = window or _count(groups.get("window"))
        request = request or _count(groups.get("request"))
        return ContextWindowExceeded(
            f"the model endpoint {url} refused the request as too long for the model's context window: {brief}",
            url=url, status=status, body=body, window=window, request_tokens=request,
        )
    return None


def _stated_sizes(body: str) -> tuple[int | None, int | None]:
    """llama.cpp states the sizes as fields too: `n_ctx` and `n_prompt_tokens` of its error object."""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return None, None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return None, None
    return _count(error.get("n_ctx")), _count(error.get("n_prompt_tokens"))


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 10**9 else None
