"""A native Anthropic Messages API client (optional extra: `pip install 'rlm[anthropic]'`).

Why not the OpenAI-compatible route: Anthropic caches a prompt prefix only where the request
marks it. The RLM root conversation only ever appends, so marking the system prompt and the
newest message caches everything before it; each turn then pays full price only for what
is new. Usage maps cache reads and writes into `Usage.cached_tokens` and
`Usage.cache_write_tokens`, and `Usage.input_tokens` counts all prompt tokens.

Requests are sent by the SDK, on the time and caps of the OpenAI-compatible client: answers
are read under the same `ResponseLimits`, no redirect is followed (the key would go with
it), and the SDK's own retries are off: ours (`rlm.utils.retry`) run instead, so that each
attempt, from connecting to the body's last byte, ends within `timeout` seconds (the SDK's
HTTP client reads each answer whole under that deadline, a trickled head or body included)
and the whole call, retries and their waits included, within twice `timeout`. The blocking
`complete()` runs the same code on an event loop of its own.
"""

from __future__ import annotations

import contextvars
import json
import time
from typing import Any

import anthropic
import httpx2

from rlm.errors import MalformedResponse
from rlm.usage import Usage, token_count
from rlm.utils.endpoint import (
    LoopBound, decoded_json, guarded_options, read_within, run_blocking, sdk_retried, ssl_context, translated_errors,
)
from rlm.utils.limits import ResponseLimits
from rlm.utils.llm import Completion, estimate_tokens
from rlm.utils.retry import CallSchedule, check_timing, told_wait

__all__ = ["AnthropicClient"]

DEFAULT_MAX_TOKENS = 8192  # the Messages API requires a limit on every request
_CACHE = {"type": "ephemeral"}
_EMPTY_TURN = "(empty)"  # the API refuses empty text blocks
# The time of the call in flight, set by `AnthropicClient._create` for the SDK's HTTP client.
_SCHEDULE: contextvars.ContextVar[CallSchedule] = contextvars.ContextVar("rlm_anthropic_schedule")


class AnthropicClient:
    """Chat completions through Anthropic's Messages API, with prompt caching marked.

    `timeout` bounds each attempt, in seconds, from connecting to the answer's last byte, and
    twice it the whole call with its `max_retries` retries and their waits (see
    `rlm.utils.retry`); `limits` caps what an answer may hold (default `ResponseLimits()`).
    """

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
        check_timing(timeout, max_retries)
        self.model = model
        self.base_url = api_url.rstrip("/")
        self._timeout = float(timeout)
        self._max_retries = max_retries
        self._api_key = api_key
        self._limits = limits or ResponseLimits()
        self._async = LoopBound(self._new_async_sdk, close=lambda sdk: sdk.close())

    def context_window(self) -> int | None:
        return None  # the API does not report it; pass context_window= to RLM_REPL if needed

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        return run_blocking(lambda: self.acomplete(messages, max_tokens=max_tokens), self._async.aclose)

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        started = time.perf_counter()
        with translated_errors(self.base_url, anthropic):
            raw = await self._create(self._params(messages, max_tokens))
        return self._completion(decoded_json(raw.http_response, self.base_url), messages, time.perf_counter() - started)

    def close(self) -> None:
        """Nothing to release: a blocking call closes its connection when done (async ones: `aclose()`)."""

    async def aclose(self) -> None:
        await self._async.aclose()

    async def _create(self, params: dict[str, Any]) -> Any:
        """The SDK's raw response to `messages.create`, tried again on the failures worth it, within
        the call's deadline; raises the SDK's exception for the last failure."""
        schedule = CallSchedule(self._timeout, self._max_retries, self._limits.max_retry_wait)
        sdk = self._async.get()
        scheduled = _SCHEDULE.set(schedule)
        try:
            while True:
                try:
                    return await sdk.messages.with_raw_response.create(**params)
                except anthropic.APIError as exc:
                    told = told_wait(exc.response.headers) if isinstance(exc, anthropic.APIStatusError) else None
                    if not sdk_retried(exc, anthropic) or not await schedule.pause(told):
                        raise
        finally:
            _SCHEDULE.reset(scheduled)

    def _new_async_sdk(self) -> Any:
        http = _AttemptBoundClient(self.base_url, verify=ssl_context(), **guarded_options(self._limits))
        return anthropic.AsyncAnthropic(
            base_url=self.base_url, api_key=self._api_key, timeout=self._timeout, max_retries=0, http_client=http
        )

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


class _AttemptBoundClient(anthropic.DefaultAsyncHttpxClient):
    """The SDK's HTTP client, reading each answer whole within what the call's schedule allows
    an attempt (the SDK's per-read timeouts alone let a trickled head or body run on)."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(**options)
        self._url = url

    async def send(self, request: httpx2.Request, **options: Any) -> httpx2.Response:
        send = super().send
        return await read_within(lambda: send(request, **options), _SCHEDULE.get().allowance(), self._url)


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
