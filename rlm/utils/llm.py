"""Model clients: one OpenAI-compatible client that speaks to any `/v1` server.

A client is anything with `model`, `base_url` and `complete(messages) -> Completion`. The
completion carries its own `Usage`, so concurrent calls never share state. Requests, retries
and the translation of failures into `rlm.errors.ClientError` subclasses are
`rlm.utils.endpoint`'s, over httpx2; what an answer may hold is capped by `ResponseLimits`
(`rlm.utils.limits`).

Configuration is read when a client is made, never at import: `RLM_API_URL` (default
`http://localhost:8080/v1`), `RLM_API_KEY` or else `OPENAI_API_KEY`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from rlm.errors import ClientError, ConfigError, MalformedResponse
from rlm.usage import Usage, token_count
from rlm.utils.endpoint import JSONEndpoint
from rlm.utils.limits import ResponseLimits

__all__ = [
    "DEFAULT_API_URL",
    "Completion",
    "LLMClient",
    "OpenAICompatibleClient",
    "resolve_api_url",
    "resolve_api_key",
    "estimate_tokens",
    "context_window_of",
    "ResponseLimits",
]

DEFAULT_API_URL = "http://localhost:8080/v1"
_CHARS_PER_TOKEN = 4
# Keys under which servers report a model's context window in GET /models.
_WINDOW_KEYS = ("context_window", "context_length", "max_model_len", "max_context_length", "n_ctx")


@dataclass(frozen=True)
class Completion:
    """One model reply. `text` is "" when the server sent no content (reasoning models may not)."""

    text: str
    usage: Usage
    model: str
    latency: float
    finish_reason: str | None = None
    content_missing: bool = False
    reasoning: str | None = None


@runtime_checkable
class LLMClient(Protocol):
    """What the RLM loop needs from a model client."""

    model: str
    base_url: str

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        """Send a chat conversation; return the reply with its usage."""
        ...

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        """The same, awaitable; the RLM loop uses this one."""
        ...

    def context_window(self) -> int | None:
        """The model's context window in tokens, when known."""
        ...

    async def aclose(self) -> None:
        """Release what `acomplete` holds for the current event loop (called at the end of a run)."""
        ...


def resolve_api_url(api_url: str | None = None) -> str:
    """The endpoint to use: the argument, else `RLM_API_URL`, else the default; no trailing slash."""
    url = api_url or os.environ.get("RLM_API_URL") or DEFAULT_API_URL
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"API URL {url!r} must start with http:// or https:// (set RLM_API_URL or api_url=)")
    return url.rstrip("/")


def resolve_api_key(api_key: str | None = None) -> str:
    """The key to send: the argument, else `RLM_API_KEY`, else `OPENAI_API_KEY`, else a placeholder.

    Local servers need no key and ignore the placeholder; some proxies insist on one.
    """
    return api_key or os.environ.get("RLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "not-needed"


def estimate_tokens(text: str | int) -> int:
    """A rough token count (4 characters a token) of a text or a number of characters.

    Used only when a server reports no usage, and by the test fakes.
    """
    chars = text if isinstance(text, int) else len(text)
    return (chars + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


class OpenAICompatibleClient:
    """A client for any OpenAI-compatible chat completions endpoint.

    `model="auto"` asks the endpoint's `GET /models` and takes the first model listed (once,
    on first use). Failed requests are retried `max_retries` times with backoff (see
    `rlm.utils.retry`); `timeout` bounds each attempt, in seconds, from connecting to the
    answer's last byte, and twice it the whole call, every retry and wait included (a retry
    gets only what remains); `limits` caps what an answer may hold (default `ResponseLimits()`).
    """

    def __init__(
        self,
        model: str = "auto",
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        temperature: float | None = None,
        limits: ResponseLimits | None = None,
    ) -> None:
        if not model:
            raise ConfigError("model must be a model name or 'auto'")
        self.base_url = resolve_api_url(api_url)
        self._resolved: str | None = None if model == "auto" else model
        self._listing: list[dict] | None = None
        self._lock = threading.Lock()
        self._temperature = temperature
        headers = {"Authorization": f"Bearer {resolve_api_key(api_key)}", "User-Agent": f"rlm/{_version()}"}
        self._endpoint = JSONEndpoint(
            self.base_url, headers, timeout=timeout, max_retries=max_retries, limits=limits
        )

    @property
    def model(self) -> str:
        """The model name sent with each request ('auto' resolved on first use)."""
        if self._resolved is None:
            with self._lock:
                if self._resolved is None:
                    models = self.list_models()
                    if not models:
                        raise ClientError(
                            f"{self.base_url}/models lists no models; name one with model=... or --model",
                            url=self.base_url,
                        )
                    self._resolved = str(models[0]["id"])
        return self._resolved

    def list_models(self) -> list[dict]:
        """The endpoint's `GET /models` entries (each a dict with at least 'id')."""
        if self._listing is None:
            payload, text = self._endpoint.get("models")
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
                raise MalformedResponse(
                    f"{self.base_url}/models did not return a model list; is this an OpenAI-compatible /v1 URL?",
                    url=self.base_url,
                    body=text[:500],
                )
            self._listing = data
        return self._listing

    def context_window(self) -> int | None:
        """The model's context window in tokens when the server says it, else None."""
        try:
            listing = self.list_models()
        except ClientError:
            return None
        for entry in listing:
            if entry.get("id") == self.model:
                return context_window_of(entry)
        return None

    def close(self) -> None:
        """Release the HTTP connections of the blocking client (the async ones: `aclose()`)."""
        self._endpoint.close()

    async def aclose(self) -> None:
        """Release the async client's connections (made again on the next `acomplete`)."""
        await self._endpoint.aclose()

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        params = self._params(messages, max_tokens)
        started = time.perf_counter()
        payload = self._endpoint.post("chat/completions", params)
        return _completion(payload, messages, self.model, time.perf_counter() - started, self.base_url)

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        params = self._params(messages, max_tokens)
        started = time.perf_counter()
        payload = await self._endpoint.apost("chat/completions", params)
        return _completion(payload, messages, self.model, time.perf_counter() - started, self.base_url)

    def _params(self, messages: list[dict], max_tokens: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "messages": messages}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if self._temperature is not None:
            params["temperature"] = self._temperature
        return params


@functools.lru_cache(maxsize=1)
def _version() -> str:
    try:
        return importlib.metadata.version("rlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def context_window_of(entry: dict) -> int | None:
    """The context window a `GET /models` entry reports (under any of the usual keys), or None."""
    meta = entry.get("meta")
    for source in (entry, meta if isinstance(meta, dict) else {}):
        for key in _WINDOW_KEYS:
            value = token_count(source.get(key))
            if value:  # a count a server could mean: not a boolean, not negative, not absurd
                return value
    return None


def _completion(payload: Any, messages: list[dict], model: str, latency: float, url: str) -> Completion:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        what = "an empty choices list (a content filter may have removed the reply)" if choices == [] else "no choices"
        raise _malformed(url, f"returned JSON with {what}", payload)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _malformed(url, "returned JSON without choices[0].message", payload)
    text = _content_text(message.get("content"), url, payload)
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    finish = choice.get("finish_reason")
    return Completion(
        text=text or "",
        usage=_usage(payload.get("usage"), messages, text or ""),
        model=_text_field(payload.get("model")) or model,
        latency=latency,
        finish_reason=_text_field(finish),
        content_missing=text is None,
        reasoning=reasoning if isinstance(reasoning, str) else None,
    )


def _content_text(content: Any, url: str, payload: Any) -> str | None:
    """The message text: a string, or the text parts of a list of parts joined; None when there is none."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        texts = [part.get("text") for part in content if part.get("type") in ("text", "output_text")]
        if all(isinstance(text, str) for text in texts):
            return "".join(texts) if texts else None  # type: ignore[arg-type]  (no text part: no text)
    raise _malformed(url, f"returned a message whose content is {_kind(content)}, not text", payload)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list of something other than text parts"
    return {bool: "a boolean", int: "a number", float: "a number", dict: "an object"}.get(type(value), type(value).__name__)


def _text_field(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) and value else None


def _malformed(url: str, what: str, payload: Any) -> MalformedResponse:
    return MalformedResponse(
        f"the endpoint at {url} {what}; it is not a chat completion this client can use",
        url=url, body=json.dumps(payload)[:500],
    )


def _usage(raw: Any, messages: list[dict], reply: str) -> Usage:
    """The usage a server reported; counts that cannot be true are estimated instead (and flagged)."""
    raw = raw if isinstance(raw, dict) else {}
    prompt, output = token_count(raw.get("prompt_tokens")), token_count(raw.get("completion_tokens"))
    details = raw.get("prompt_tokens_details")
    cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if prompt is None:
        prompt_chars = sum(len(m.get("content") or "") for m in messages)
        prompt, cached = estimate_tokens(prompt_chars), None
    return Usage(
        input_tokens=prompt,
        output_tokens=output if output is not None else estimate_tokens(reply),
        cached_tokens=min(cached or 0, prompt),
        estimated=token_count(raw.get("prompt_tokens")) is None or output is None,
    )
