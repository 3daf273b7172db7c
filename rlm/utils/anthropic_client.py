"""A native Anthropic Messages API client (optional extra: `pip install 'rlm[anthropic]'`).

Why not the OpenAI-compatible route: Anthropic caches a prompt prefix only where the request
marks it. The RLM root conversation only ever appends, so marking the system prompt and the
newest message caches everything before it; each turn then pays full price only for what
is new. Usage maps cache reads and writes into `Usage.cached_tokens` and
`Usage.cache_write_tokens`, and `Usage.input_tokens` counts all prompt tokens.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic

from rlm.errors import MalformedResponse
from rlm.usage import Usage
from rlm.utils.endpoint import LoopBound, closing_http_client, decoded_json, lean_transport, ssl_context, translated_errors
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
    ) -> None:
        self.model = model
        self.base_url = api_url.rstrip("/")
        self._options = {"base_url": self.base_url, "api_key": api_key, "timeout": timeout, "max_retries": max_retries}
        self._sdk = anthropic.Anthropic(**self._options, http_client=closing_http_client(anthropic.DefaultHttpxClient))
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
        http = anthropic.DefaultAsyncHttpxClient(verify=ssl_context(), transport=lean_transport(self.base_url))
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
        text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        thinking = "".join(b.get("thinking", "") for b in blocks if isinstance(b, dict) and b.get("type") == "thinking")
        return Completion(
            text=text,
            usage=_usage(payload.get("usage"), messages, text),
            model=str(payload.get("model") or self.model),
            latency=latency,
            finish_reason=payload.get("stop_reason"),
            content_missing=not any(isinstance(b, dict) and b.get("type") == "text" for b in blocks),
            reasoning=thinking or None,
        )


def _usage(raw: Any, messages: list[dict], text: str) -> Usage:
    if not isinstance(raw, dict) or not isinstance(raw.get("input_tokens"), int):
        chars = sum(len(m.get("content") or "") for m in messages)
        return Usage(input_tokens=estimate_tokens(chars), output_tokens=estimate_tokens(text), estimated=True)

    def count(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) else 0

    read, written = count("cache_read_input_tokens"), count("cache_creation_input_tokens")
    return Usage(
        input_tokens=count("input_tokens") + read + written,
        output_tokens=count("output_tokens"),
        cached_tokens=read,
        cache_write_tokens=written,
    )
