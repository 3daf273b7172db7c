"""One JSON request to a model endpoint: retries with backoff, and failures turned into our errors.

`JSONEndpoint` is what the OpenAI-compatible client sends through: a blocking httpx2 client
for `complete()` and `GET /models`, and per event loop an async one over `LeanTransport`
for `acomplete()`, both with the same retry policy: connection failures, timeouts and the
statuses 408, 409, 429 and 5xx are retried `max_retries` times, waiting what the server
asks (`Retry-After`, `retry-after-ms`; up to a minute) or else 0.5 s doubling to 8 s, less
up to a quarter at random so that a fan-out does not retry in lockstep.

`translated_errors` does the same translation for an SDK's exceptions (the Anthropic
client's). Every message names the URL and says what to try.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import functools
import itertools
import json
import random
import ssl
import threading
import time
import weakref
from typing import Any, Callable, NoReturn

import httpx2

from rlm.errors import ClientError, ConfigError, EndpointUnreachable, MalformedResponse
from rlm.utils.http import LeanTransport, proxied

__all__ = [
    "JSONEndpoint", "LoopBound", "translated_errors", "decoded_json", "lean_transport", "ssl_context", "closing_http_client",
]

_RETRIED_STATUSES = frozenset({408, 409, 429})
_LONGEST_TOLD_WAIT = 60.0  # seconds; a longer Retry-After is not waited for
_FIRST_WAIT, _LONGEST_WAIT = 0.5, 8.0
_CONNECT_TIMEOUT = 10.0


class JSONEndpoint:
    """POST and GET JSON to one base URL with fixed headers, a timeout and retries."""

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout: float, max_retries: int) -> None:
        self.base_url = base_url
        self._max_retries = max_retries
        self._options: dict[str, Any] = {
            "base_url": base_url + "/",
            "headers": headers,
            "timeout": httpx2.Timeout(timeout, connect=min(timeout, _CONNECT_TIMEOUT)),
            "follow_redirects": True,
        }
        self._sync = closing_http_client(httpx2.Client, **self._options)
        # One async client per event loop: its connections belong to the loop that made them.
        self._async = LoopBound(self._new_async_client, close=lambda client: client.aclose())

    def post(self, path: str, body: dict) -> Any:
        """POST `body` as JSON to `path` (relative to the base URL); the decoded JSON reply."""
        content = json.dumps(body).encode()
        return self._decoded(self._request(lambda: self._sync.post(path, content=content, headers=_JSON)))

    async def apost(self, path: str, body: dict) -> Any:
        """The same, awaitable, over the current event loop's connections."""
        content = json.dumps(body).encode()
        client = self._async.get()
        for attempt in itertools.count():
            try:
                outcome: httpx2.Response | httpx2.TransportError = await client.post(path, content=content, headers=_JSON)
            except httpx2.RequestError as exc:
                outcome = self._failure(exc)
            if isinstance(outcome, httpx2.Response) and not _retried(outcome.status_code):
                return self._decoded(outcome)
            await asyncio.sleep(self._wait(attempt, outcome))

    def get(self, path: str) -> tuple[Any, str]:
        """GET `path`; the decoded JSON reply and its text (for error messages)."""
        response = self._request(lambda: self._sync.get(path))
        return self._decoded(response), response.text

    def close(self) -> None:
        """Release the blocking client's connections (the async ones: `aclose()`)."""
        self._sync.close()

    async def aclose(self) -> None:
        """Release the current event loop's connections (made again on the next `apost`)."""
        await self._async.aclose()

    def _request(self, send: Callable[[], httpx2.Response]) -> httpx2.Response:
        """The first response that is not to be retried; raises when the attempts run out."""
        for attempt in itertools.count():
            try:
                outcome: httpx2.Response | httpx2.TransportError = send()
            except httpx2.RequestError as exc:
                outcome = self._failure(exc)
            if isinstance(outcome, httpx2.Response) and not _retried(outcome.status_code):
                return outcome
            time.sleep(self._wait(attempt, outcome))

    def _wait(self, attempt: int, outcome: httpx2.Response | httpx2.TransportError) -> float:
        """Seconds to wait after failed attempt number `attempt` (from 0); raises after the last."""
        if attempt >= self._max_retries:
            self._give_up(outcome)
        told = _told_wait(outcome.headers) if isinstance(outcome, httpx2.Response) else None
        if told is not None and 0 <= told <= _LONGEST_TOLD_WAIT:
            return told
        return min(_FIRST_WAIT * 2**attempt, _LONGEST_WAIT) * (1 - 0.25 * random.random())

    def _failure(self, exc: httpx2.RequestError) -> httpx2.TransportError:
        """A failure worth another attempt; raises at once for those that no retry can mend."""
        url = self.base_url
        if isinstance(exc, httpx2.LocalProtocolError):  # we could not even write the request
            raise ConfigError(f"cannot send a request to {url}: {exc}. Check the API key and headers.") from exc
        if isinstance(exc, httpx2.DecodingError):
            raise MalformedResponse(f"the endpoint at {url} sent a body that cannot be decoded: {exc}", url=url) from exc
        if isinstance(exc, httpx2.TransportError):
            return exc
        raise ClientError(f"the request to the model endpoint {url} failed: {exc}", url=url) from exc

    def _give_up(self, outcome: httpx2.Response | httpx2.TransportError) -> NoReturn:
        url = self.base_url
        if isinstance(outcome, (httpx2.TimeoutException, httpx2.ConnectError)):
            raise unreachable(url, timed_out=isinstance(outcome, httpx2.TimeoutException)) from outcome
        if isinstance(outcome, httpx2.TransportError):
            raise ClientError(
                f"the model endpoint {url} broke off the exchange ({outcome}); its log may say why", url=url
            ) from outcome
        raise status_error(url, outcome.status_code, outcome.text[:500])

    def _decoded(self, response: httpx2.Response) -> Any:
        if response.status_code >= 400:
            self._give_up(response)
        return decoded_json(response, self.base_url)

    def _new_async_client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(**self._options, verify=ssl_context(), transport=lean_transport(self.base_url))


_JSON = {"Content-Type": "application/json"}


def _retried(status: int) -> bool:
    return status in _RETRIED_STATUSES or status >= 500


def _told_wait(headers: httpx2.Headers) -> float | None:
    """The wait a server asked for in `retry-after-ms` or `Retry-After` (seconds or a date)."""
    try:
        return float(headers["retry-after-ms"]) / 1000
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError):  # a header we cannot read: wait our own way
        return None
    if moment.tzinfo is None:  # asctime form and "-0000": HTTP dates are always UTC
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp() - time.time()


# -- our errors, with the same messages whichever way the request went --------------------------


def decoded_json(response: httpx2.Response, url: str) -> Any:
    """The JSON body of a response from the endpoint at `url`; MalformedResponse when it is not JSON."""
    try:
        return json.loads(response.content)
    except ValueError:
        raise not_json(url, response.text) from None


def unreachable(url: str, *, timed_out: bool) -> EndpointUnreachable:
    what = "did not answer in time" if timed_out else "could not be reached"
    return EndpointUnreachable(
        f"the model endpoint {url} {what}. Start your server there, or point RLM_API_URL (or --api-url) at one.",
        url=url,
    )


def status_error(url: str, status: int, body: str) -> ClientError:
    return ClientError(
        f"the model endpoint {url} answered HTTP {status}: {_brief(body)}{_hint(status)}", url=url, status=status, body=body
    )


def not_json(url: str, body: str, detail: str = "") -> MalformedResponse:
    return MalformedResponse(
        f"the endpoint at {url} answered with something that is not JSON{detail}; check that the URL ends in /v1",
        url=url,
        body=body[:500],
    )


class translated_errors:
    """Turns an SDK's exceptions into ours. `sdk` is the SDK's module (`anthropic`)."""

    def __init__(self, url: str, sdk: Any) -> None:
        self.url = url
        self.sdk = sdk

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None:
            return False
        sdk = self.sdk
        if isinstance(exc, sdk.APIConnectionError):  # includes APITimeoutError
            raise unreachable(self.url, timed_out=isinstance(exc, sdk.APITimeoutError)) from exc
        if isinstance(exc, sdk.APIStatusError):
            body = exc.response.text[:500] if exc.response is not None else ""
            raise status_error(self.url, exc.status_code, body) from exc
        if isinstance(exc, sdk.APIError):
            raise ClientError(f"the model endpoint {self.url} failed: {exc}", url=self.url) from exc
        if isinstance(exc, ValueError):  # a body that claims to be JSON and is not
            raise not_json(self.url, str(getattr(exc, "doc", "")), f" ({exc})") from exc
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


# -- HTTP clients shared with the SDK-based clients -----------------------------------------------


class LoopBound:
    """One async client per event loop: its connections belong to the loop that made them.

    `get()` gives the running loop's client, made on first use (each `completion()` runs its
    own loop; threads may run theirs at the same time); `aclose()` releases the running loop's
    client with `close`. A loop's client is dropped with the loop.
    """

    def __init__(self, make: Callable[[], Any], *, close: Callable[[Any], Any]) -> None:
        self._make = make
        self._close = close
        self._held: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._held.get(loop)
            if client is None:
                client = self._held[loop] = self._make()
            return client

    async def aclose(self) -> None:
        with self._lock:
            client = self._held.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await self._close(client)


def lean_transport(url: str) -> LeanTransport | None:
    """Our lean transport for requests to `url`, or None (httpx2's own) when a proxy is to carry them."""
    return None if proxied(url) else LeanTransport(ssl_context())


@functools.lru_cache(maxsize=1)
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: building one per client costs ~40 ms."""
    return ssl.create_default_context()


def closing_http_client(base: type, **options: Any) -> Any:
    """A blocking httpx2 client (or an SDK's subclass) sharing our TLS context, closed when collected.

    (The SDKs close the HTTP clients they make themselves on collection; one passed in would
    otherwise leave its sockets open until exit.)
    """
    return _closing_subclass(base)(verify=ssl_context(), **options)


@functools.lru_cache(maxsize=None)
def _closing_subclass(base: type) -> type:
    def __del__(self: Any) -> None:
        if not self.is_closed:
            self.close()

    return type(f"Closing{base.__name__}", (base,), {"__del__": __del__})
