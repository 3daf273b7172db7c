"""A native Anthropic Messages API client (optional extra: `pip install 'rlm[anthropic]'`).

Why not the OpenAI-compatible route: Anthropic caches a prompt prefix only where the request
marks it. The RLM root conversation only ever appends, so marking the system prompt and the
newest message caches everything before it; each turn then pays full price only for what
is new. Usage maps cache reads and writes into `Usage.cached_tokens` and
`Usage.cache_write_tokens`, and `Usage.input_tokens` counts all prompt tokens.

Answers are read under the same `ResponseLimits` as the OpenAI-compatible client's, and no
redirect is followed (the key would go with it). The SDK runs its own retries and per-read
timeouts; a body still arriving `timeout` seconds after its headers is refused.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic

from rlm.errors import MalformedResponse
from rlm.usage import Usage, token_count
from rlm.utils.endpoint import (
    LoopBound, closing_http_client, decoded_json, guarded_options, ssl_context, translated_errors,
)
from rlm.utils.limits import ResponseLimits
from rlm.utils.llm import Completion, estimate_tokens

__all__ = ["AnthropicClient"]

DEFAULT_MAX_TOKENS = 8192  # the Messages API requires a limit on every request
_CACHE = {"type": "ephemeral"}
_EMPTY_TURN = "(empty)"  # the API refuses empty text blocks


class AnthropicClient:
    """Chat completions through Anthropic's Messages API, with prompt caching marked."""

    def __init__(
        self,
        model: str,
        *,
        api_url: str = "https://api.anthropic.com",
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        limits: ResponseLimits | None = None,
    ) -> None:
        self.model = model
        self.base_url = api_url.rstrip("/")
        self._options = {"base_url": self.base_url, "api_key": api_key, "timeout": timeout, "max_retries": max_retries}
        self._limits = limits or ResponseLimits()
        http = closing_http_client(
            anthropic.DefaultHttpxClient, **guarded_options(self._limits, timeout, asynchronous=False)
        )
        self._sdk = anthropic.Anthropic(**self._options, http_client=http)
        self._async = LoopBound(self._new_async_sdk, close=lambda sdk: sdk.close())

    def context_window(self) -> int | None:
        return None  # the API does not report it; pass context_window= to RLM_REPL if needed

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        started = time.perf_counter()
        with translated_errors(self.base_url, anthropic):
            raw = self._sdk.messages.with_raw_response.create(**self._params(messages, max_tokens))
        return self._completion(decoded_json(raw.http_response, self.base_url), messages, time.perf_counter() - started)

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        started = time.perf_counter()
        with translated_errors(self.base_url, anthropic):
            raw = await self._async.get().messages.with_raw_response.create(**self._params(messages, max_tokens))
        return self._completion(decoded_json(raw.http_response, self.base_url), messages, time.perf_counter() - started)

    def close(self) -> None:
        self._sdk.close()

    async def aclose(self) -> None:
        await self._async.aclose()

    def _new_async_sdk(self) -> Any:
        http = anthropic.DefaultAsyncHttpxClient(
            verify=ssl_context(),
            **guarded_options(self._limits, self._options["timeout"], asynchronous=True),
        )
        return anthropic.AsyncAnthropic(**self._options, http_client=http)

    def _params(self, messages: list[dict], max_tokens: int | None) -> dict[str, Any]:
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [
            {"role": m["role"], "content": [{"type": "text", "text": m["content"] or _EMPTY_TURN}]}
            for m in messages
            if m["role"] != "system"
        ]
        if turns:  # everything up to and including the newest message is a cacheable prefix
            turns[-1]["content"][-1]["cache_control"] = _CACHE
        params: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens or DEFAULT_MAX_TOKENS, "messages": turns}
        if system:
            params["system"] = [{"type": "text", "text": "\n\n".join(system), "cache_control": _CACHE}]
        return params

    def _completion(self, payload: Any, messages: list[dict], latency: float) -> Completion:
        blocks = payload.get("content") if isinstance(payload, dict) else None
        if not isinstance(blocks, list):
            raise MalformedResponse(
                f"the endpoint at {self.base_url} returned JSON without a content list",
                url=self.base_url,
                body=json.dumps(payload)[:500],
            )
        text = "".join(_texts(blocks, "text"))
        thinking = "".join(_texts(blocks, "thinking"))
        return Completion(
            text=text,
            usage=_usage(payload.get("usage"), messages, text),
            model=str(payload.get("model") or self.model),
            latency=latency,
            finish_reason=reason[:200] if isinstance(reason := payload.get("stop_reason"), str) else None,
            content_missing=not any(isinstance(b, dict) and b.get("type") == "text" for b in blocks),
            reasoning=thinking or None,
        )


def _texts(blocks: list, kind: str) -> list[str]:
    """The `kind` fields of the content blocks of that type (text or thinking) that are text."""
    found = [block.get(kind) for block in blocks if isinstance(block, dict) and block.get("type") == kind]
    return [text for text in found if isinstance(text, str)]


def _usage(raw: Any, messages: list[dict], text: str) -> Usage:
    """The usage the API reported; counts that cannot be true are estimated instead (and flagged)."""
    raw = raw if isinstance(raw, dict) else {}
    prompt, output = token_count(raw.get("input_tokens")), token_count(raw.get("output_tokens"))
    read = token_count(raw.get("cache_read_input_tokens")) or 0
    written = token_count(raw.get("cache_creation_input_tokens")) or 0
    if prompt is None:
        chars = sum(len(m.get("content") or "") for m in messages)
        prompt, read, written = estimate_tokens(chars), 0, 0
    return Usage(
        input_tokens=prompt + read + written,
        output_tokens=output if output is not None else estimate_tokens(text),
        cached_tokens=read,
        cache_write_tokens=written,
        estimated=token_count(raw.get("input_tokens")) is None or output is None,
    )
