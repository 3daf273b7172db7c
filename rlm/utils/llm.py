"""Model clients: one OpenAI-compatible client that speaks to any `/v1` server.

A client is anything with `model`, `base_url` and `complete(messages) -> Completion`. The
completion carries its own `Usage`, so concurrent calls never share state. The SDK's
errors are translated here, and only here, into `rlm.errors.ClientError` subclasses.

Configuration is read when a client is made, never at import: `RLM_API_URL` (default
`http://localhost:8080/v1`), `RLM_API_KEY` or else `OPENAI_API_KEY`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from rlm.errors import ClientError, ConfigError, EndpointUnreachable, MalformedResponse
from rlm.usage import Usage

__all__ = [
    "DEFAULT_API_URL",
    "Completion",
    "LLMClient",
    "OpenAICompatibleClient",
    "resolve_api_url",
    "resolve_api_key",
    "estimate_tokens",
    "context_window_of",
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

    Local servers need no key; the SDK insists on a non-empty one.
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
    on first use). Retries with backoff on 429, 5xx, timeouts and connection errors are the
    SDK's (`max_retries`).
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
    ) -> None:
        import openai

        if not model:
            raise ConfigError("model must be a model name or 'auto'")
        self.base_url = resolve_api_url(api_url)
        self._requested_model = model
        self._resolved: str | None = None if model == "auto" else model
        self._listing: list[dict] | None = None
        self._lock = threading.Lock()
        self._temperature = temperature
        self._options = {
            "base_url": self.base_url, "api_key": resolve_api_key(api_key), "timeout": timeout, "max_retries": max_retries
        }
        self._sdk = openai.OpenAI(**self._options, http_client=closing_http_client(openai.DefaultHttpxClient))
        # One async SDK client per event loop: its connections belong to the loop that made them.
        self._async = LoopBound(self._new_async_sdk)

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
            with translated_errors(self.base_url):
                raw = self._sdk.models.with_raw_response.list()
            payload = json_body(raw, self.base_url)
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
                raise MalformedResponse(
                    f"{self.base_url}/models did not return a model list; is this an OpenAI-compatible /v1 URL?",
                    url=self.base_url,
                    body=raw.text[:500],
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
        """Release the HTTP connections of the sync client (the async one: `aclose()`)."""
        self._sdk.close()

    async def aclose(self) -> None:
        """Release the async client's connections (made again on the next `acomplete`)."""
        await self._async.aclose()

    # Requests go through the SDK's generic `post` (retries, timeouts, error statuses) with the
    # body as we built it: the typed method's request-transform costs ~1.5 ms of CPU per call,
    # which serialises a fan-out of sub-calls on the event loop.

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        params = self._params(messages, max_tokens)
        started = time.perf_counter()
        with translated_errors(self.base_url):
            payload = self._sdk.post("/chat/completions", cast_to=object, body=params)
        return _completion(payload, messages, self.model, time.perf_counter() - started, self.base_url)

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        params = self._params(messages, max_tokens)
        started = time.perf_counter()
        with translated_errors(self.base_url):
            payload = await self._async.get().post("/chat/completions", cast_to=object, body=params)
        return _completion(payload, messages, self.model, time.perf_counter() - started, self.base_url)

    def _params(self, messages: list[dict], max_tokens: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "messages": messages}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if self._temperature is not None:
            params["temperature"] = self._temperature
        return params

    def _new_async_sdk(self) -> Any:
        import openai

        http = openai.DefaultAsyncHttpxClient(verify=ssl_context())
        return openai.AsyncOpenAI(**self._options, http_client=http)


class LoopBound:
    """One async SDK client per event loop: its connections belong to the loop that made them.

    `get()` makes a new client when called from another loop than the last one (each
    `completion()` runs its own loop); `aclose()` releases the current one.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._held: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._held is None or self._held[0] is not loop:
                self._held = (loop, self._make())
            return self._held[1]

    async def aclose(self) -> None:
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            await held[1].close()


@functools.lru_cache(maxsize=1)
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: building one per client costs ~40 ms."""
    return ssl.create_default_context()


def closing_http_client(base: type) -> Any:
    """An SDK's default sync HTTP client sharing our TLS context, closed when collected.

    (The SDKs close the HTTP clients they make themselves on collection; one passed in would
    otherwise leave its sockets open until exit.)
    """
    return _closing_subclass(base)(verify=ssl_context())


@functools.lru_cache(maxsize=None)
def _closing_subclass(base: type) -> type:
    def __del__(self: Any) -> None:
        if not self.is_closed:
            self.close()

    return type(f"Closing{base.__name__}", (base,), {"__del__": __del__})


def context_window_of(entry: dict) -> int | None:
    """The context window a `GET /models` entry reports (under any of the usual keys), or None."""
    for source in (entry, entry.get("meta") or {}):
        for key in _WINDOW_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def json_body(raw: Any, url: str) -> Any:
    try:
        return json.loads(raw.text)
    except ValueError:
        raise MalformedResponse(
            f"the endpoint at {url} answered with something that is not JSON; check that the URL ends in /v1",
            url=url,
            body=raw.text[:500],
        ) from None


def _completion(payload: Any, messages: list[dict], model: str, latency: float, url: str) -> Completion:
    if isinstance(payload, (str, bytes)):
        raise MalformedResponse(
            f"the endpoint at {url} answered with something that is not JSON; check that the URL ends in /v1",
            url=url,
            body=str(payload)[:500],
        )
    try:
        choice = payload["choices"][0]
        message = choice["message"]
        if not isinstance(message, dict):
            raise TypeError("message is not an object")
    except (KeyError, IndexError, TypeError):
        raise MalformedResponse(
            f"the endpoint at {url} returned JSON without choices[0].message", url=url, body=json.dumps(payload)[:500]
        ) from None
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return Completion(
        text=text,
        usage=_usage(payload.get("usage"), messages, text),
        model=str(payload.get("model") or model),
        latency=latency,
        finish_reason=choice.get("finish_reason") if isinstance(choice, dict) else None,
        content_missing=not isinstance(content, str),
        reasoning=reasoning if isinstance(reasoning, str) else None,
    )


def _usage(raw: Any, messages: list[dict], reply: str) -> Usage:
    if isinstance(raw, dict) and isinstance(raw.get("prompt_tokens"), int):
        details = raw.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        output = raw.get("completion_tokens")
        return Usage(
            input_tokens=raw["prompt_tokens"],
            output_tokens=output if isinstance(output, int) else estimate_tokens(reply),
            cached_tokens=cached if isinstance(cached, int) else 0,
            estimated=not isinstance(output, int),
        )
    prompt_chars = sum(len(m.get("content") or "") for m in messages)
    return Usage(
        input_tokens=estimate_tokens(prompt_chars),
        output_tokens=estimate_tokens(reply),
        estimated=True,
    )


class translated_errors:
    """Turns an SDK's exceptions into ours, naming the URL and saying what to try.

    `sdk` is the `openai` or `anthropic` module: both name their errors the same way.
    """

    def __init__(self, url: str, sdk: Any = None) -> None:
        self.url = url
        self.sdk = sdk

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None:
            return False
        sdk = self.sdk
        if sdk is None:
            import openai as sdk
        if isinstance(exc, sdk.APIConnectionError):  # includes APITimeoutError
            what = "did not answer in time" if isinstance(exc, sdk.APITimeoutError) else "could not be reached"
            raise EndpointUnreachable(
                f"the model endpoint {self.url} {what}. Start your server there, or point RLM_API_URL "
                "(or --api-url) at one.",
                url=self.url,
            ) from exc
        if isinstance(exc, sdk.APIStatusError):
            body = exc.response.text[:500] if exc.response is not None else ""
            raise ClientError(
                f"the model endpoint {self.url} answered HTTP {exc.status_code}: {_brief(body)}{_hint(exc.status_code)}",
                url=self.url,
                status=exc.status_code,
                body=body,
            ) from exc
        if isinstance(exc, sdk.APIError):
            raise ClientError(f"the model endpoint {self.url} failed: {exc}", url=self.url) from exc
        if isinstance(exc, ValueError):  # a body that claims to be JSON and is not
            raise MalformedResponse(
                f"the endpoint at {self.url} answered with something that is not JSON ({exc}); "
                "check that the URL ends in /v1",
                url=self.url,
                body=str(getattr(exc, "doc", ""))[:500],  # json.JSONDecodeError keeps the text
            ) from exc
        return False


def _brief(body: str) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:200] or "(empty body)"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:300]
    return body[:200]


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (set RLM_API_KEY or OPENAI_API_KEY to a valid key)"
    if status == 404:
        return " (check the model name and that the URL ends in /v1)"
    if status == 429:
        return " (rate limited even after retries; wait or lower the concurrency)"
    return ""
