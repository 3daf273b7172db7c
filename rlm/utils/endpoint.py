"""One JSON request to a model endpoint: caps, retries with backoff, and failures turned into our errors.

`JSONEndpoint` is what the OpenAI-compatible client sends through: per event loop an async
httpx2 client (proxies from the environment as httpx2 reads them); the blocking `post()`
and `get()` run the same code on a loop of their own, on a connection of their own. Every
answer is read under `ResponseLimits` (`rlm.utils.limits`); each attempt, from connecting
to the body's last byte, ends within `timeout` seconds (`read_within`: a server trickling
its answer cannot stretch it), and the whole call, retries and their waits included,
within twice `timeout` (`rlm.utils.retry.CallSchedule`).

Retries follow `rlm.utils.retry`: connection failures, a server silent past the timeout and
the statuses 408, 409, 429 and 5xx are retried up to `max_retries` times, with backoff and
jitter. An answer past a cap is never retried. Redirects are followed only within the
endpoint's origin (the prompt and the key go nowhere else).

`translated_errors` does the same translation for an SDK's exceptions (the Anthropic
client's), and `sdk_retried` the same retry rule. Every message names the URL and says what
to try.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import json
import ssl
import threading
import weakref
from typing import Any, Awaitable, Callable, NoReturn, TypeVar

import httpx2

from rlm.errors import ClientError, ConfigError, EndpointUnreachable, MalformedResponse, ResponseLimitExceeded
from rlm.utils.limits import ACCEPT_ENCODING, ResponseLimits, origin_of, response_hooks
from rlm.utils.overflow import overflow_error
from rlm.utils.retry import CallSchedule, check_timing, retried_status, told_wait

__all__ = [
    "JSONEndpoint", "LoopBound", "translated_errors", "sdk_retried", "decoded_json", "ssl_context",
    "guarded_options", "read_within", "run_blocking", "is_loopback",
]

_T = TypeVar("_T")
_CONNECT_TIMEOUT = 10.0
_MAX_REDIRECTS = 5
# httpx2's HTTP/1.1 parser (h11, through httpcore2) holds at most this much of an unfinished
# head and then fails with this text: a head that long is a cap hit, not a broken connection.
_HEAD_BUFFER = 100 * 1024
_HEAD_OVERFLOW = "Receive buffer too long"


class JSONEndpoint:
    """POST and GET JSON to one base URL with fixed headers, a timeout per attempt (twice it
    for the whole call, retries included), retries and caps."""

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout: float, max_retries: int,
                 limits: ResponseLimits | None = None) -> None:
        check_timing(timeout, max_retries)
        self.base_url = base_url
        self._timeout = float(timeout)
        self._max_retries = max_retries
        self._limits = limits or ResponseLimits()
        self._loopback = is_loopback(httpx2.URL(base_url).host)
        self._options: dict[str, Any] = {
            "base_url": base_url + "/",
            "headers": {"Accept-Encoding": ACCEPT_ENCODING, **headers},
            "timeout": httpx2.Timeout(timeout, connect=min(timeout, _CONNECT_TIMEOUT)),
            **guarded_options(self._limits),
        }
        # One async client per event loop: its connections belong to the loop that made them.
        self._async = LoopBound(self._new_async_client, close=lambda client: client.aclose())

    def post(self, path: str, body: dict) -> Any:
        """POST `body` as JSON to `path` (relative to the base URL); the decoded JSON reply."""
        return run_blocking(lambda: self.apost(path, body), self._async.aclose)

    async def apost(self, path: str, body: dict) -> Any:
        """The same, awaitable, over the current event loop's connections."""
        response = await self._exchange("POST", path, json.dumps(body).encode())
        return decoded_json(response, self.base_url)

    def get(self, path: str) -> tuple[Any, str]:
        """GET `path`; the decoded JSON reply and its text (for error messages)."""
        response = run_blocking(lambda: self._exchange("GET", path, None), self._async.aclose)
        return decoded_json(response, self.base_url), response.text

    def close(self) -> None:
        """Nothing to release: a blocking request closes its connection when done (async ones: `aclose()`)."""

    async def aclose(self) -> None:
        """Release the current event loop's connections (made again on the next `apost`)."""
        await self._async.aclose()

    async def _exchange(self, method: str, path: str, content: bytes | None) -> httpx2.Response:
        """The first answer not to be retried, read whole (under the caps); raises when attempts run out."""
        schedule = CallSchedule(self._timeout, self._max_retries, self._limits.max_retry_wait)
        client = self._async.get()
        while True:
            try:
                outcome: httpx2.Response | httpx2.TransportError = await self._attempt(
                    client, method, path, content, schedule.allowance()
                )
            except httpx2.RequestError as exc:
                outcome = self._failure(exc)
                if self._loopback and _refused(outcome):
                    self._give_up(outcome)  # nothing listens on this machine: waiting will not start it
            if isinstance(outcome, httpx2.Response) and not retried_status(outcome.status_code):
                if outcome.status_code >= 400:
                    self._give_up(outcome)
                return outcome
            told = told_wait(outcome.headers) if isinstance(outcome, httpx2.Response) else None
            if not await schedule.pause(told):
                self._give_up(outcome)

    async def _attempt(self, client: httpx2.AsyncClient, method: str, path: str, content: bytes | None,
                       allowance: float) -> httpx2.Response:
        """One attempt, redirects within the origin included, bounded as a whole by `allowance` seconds."""
        attempt = _Attempt(self.base_url)

        async def exchange() -> httpx2.Response:
            target: str | httpx2.URL = path
            for _ in range(_MAX_REDIRECTS + 1):
                request = client.build_request(method, target, content=content, headers=_JSON if content else None)
                response = await attempt.read(functools.partial(client.send, request, stream=True))
                location = self._redirect_target(response)
                if location is None:
                    return response
                target = location
            raise ClientError(f"the model endpoint {self.base_url} redirected more than {_MAX_REDIRECTS} times; "
                              "set RLM_API_URL (or api_url=) to the final URL", url=self.base_url)

        return await attempt.within(exchange(), allowance)

    def _redirect_target(self, response: httpx2.Response) -> httpx2.URL | None:
        """Where a redirect leads, when it may be followed: within the origin, keeping the method."""
        if not response.has_redirect_location:
            return None
        source = response.request.url
        target = source.join(response.headers["location"])
        status = response.status_code
        if origin_of(target) != origin_of(source):
            raise ClientError(
                f"the model endpoint {self.base_url} redirected the request (HTTP {status}) to {origin_of(target)}, "
                f"another origin; requests, with the prompt and the API key, go only to {origin_of(source)}. "
                "If that server is the right one, set RLM_API_URL (or api_url=) to it.",
                url=self.base_url, status=status,
            )
        if status in (307, 308) or response.request.method == "GET":
            return target
        raise ClientError(
            f"the model endpoint {self.base_url} redirected a {response.request.method} with HTTP {status} to "
            f"{target}, which would drop the request body; set RLM_API_URL (or api_url=) to the final URL",
            url=self.base_url, status=status,
        )

    def _failure(self, exc: httpx2.RequestError) -> httpx2.TransportError:
        """A failure worth another attempt; raises at once for those that no retry can mend."""
        url = self.base_url
        if isinstance(exc, httpx2.LocalProtocolError):  # we could not even write the request
            # Not the library's text: it quotes the header, API key included.
            raise ConfigError(
                f"cannot send a request to {url}: a header holds a character HTTP does not allow (often an API key "
                "read with its line ending). Check the API key and headers."
            ) from None
        if isinstance(exc, httpx2.DecodingError):
            raise MalformedResponse(f"the endpoint at {url} sent a body that cannot be decoded: {exc}", url=url) from exc
        tls = _tls_failure(exc)
        if tls is not None:
            raise tls_error(url, tls) from exc
        if isinstance(exc, httpx2.RemoteProtocolError) and _HEAD_OVERFLOW in str(exc):
            raise ResponseLimitExceeded(
                f"the model endpoint {url} sent a status line and headers past {_HEAD_BUFFER // 1024} KiB, "
                "the most the HTTP library reads (ResponseLimits.max_header_bytes applies below that)",
                url=url, limit="max_header_bytes",
            ) from exc
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

    def _new_async_client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(**self._options, verify=ssl_context())


_JSON = {"Content-Type": "application/json"}


def guarded_options(limits: ResponseLimits) -> dict[str, Any]:
    """httpx2 async client options that read every answer under `limits` and follow no redirect by themselves."""
    return {"event_hooks": response_hooks(limits), "follow_redirects": False}


class _Attempt:
    """One attempt at a request, bounded in time as a whole.

    `within(work, seconds)` runs `work`, which gets its answers through `read`, for at most
    `seconds`. Cut off while waiting for an answer, it raises `httpx2.ReadTimeout` (worth
    another attempt); cut off while a body was arriving, `ResponseLimitExceeded` (a server
    trickling its answer would do it again).
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._reading = False

    async def read(self, send: Callable[[], Awaitable[httpx2.Response]]) -> httpx2.Response:
        """The answer `send()` gets (its headers), with its body read whole and the stream closed."""
        self._reading = False
        response = await send()
        self._reading = True
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def within(self, work: Awaitable[_T], seconds: float) -> _T:
        try:
            return await asyncio.wait_for(work, seconds)
        except asyncio.TimeoutError:
            if self._reading:
                raise ResponseLimitExceeded(
                    f"the model endpoint {self._url} did not finish sending its answer within the request timeout "
                    f"(cut off after {seconds:.3g} s: an attempt, body included, may take the timeout, and a call "
                    "with its retries twice it); a server that trickles its answer is cut off there",
                    url=self._url, limit="timeout",
                ) from None
            raise httpx2.ReadTimeout(f"no answer within {seconds:.3g} s") from None


async def read_within(send: Callable[[], Awaitable[httpx2.Response]], seconds: float, url: str) -> httpx2.Response:
    """The answer `send()` gets, its body read whole, within `seconds` (see `_Attempt.within`)."""
    attempt = _Attempt(url)
    return await attempt.within(attempt.read(send), seconds)


def run_blocking(work: Callable[[], Awaitable[_T]], release: Callable[[], Awaitable[None]]) -> _T:
    """Run `work()` on an event loop of its own (in a helper thread when this one runs a loop),
    then `release()` what it held on that loop."""
    async def once() -> _T:
        try:
            return await work()
        finally:
            await release()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(once())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, once()).result()


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refused(failure: BaseException) -> bool:
    """Whether a failed connection was refused (nothing listens at that port)."""
    seen: BaseException | None = failure
    for _ in range(8):  # the chain is short; a loop in it must not hang us
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error under a connection failure, if that is what it was."""
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short; a loop in it must not hang us
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# -- our errors, with the same messages whichever way the request went --------------------------


def decoded_json(response: httpx2.Response, url: str) -> Any:
    """The JSON body of a response from the endpoint at `url`; MalformedResponse, saying what came
    instead, when it is not JSON."""
    kind = response.headers.get("content-type", "").lower()
    content = response.content
    start = content.lstrip()[:16].lower()
    if "text/event-stream" in kind or start.startswith((b"data:", b"event:")):
        raise MalformedResponse(
            f"the endpoint at {url} answered with a server-sent event stream, though the request did not ask to "
            "stream; a proxy in between may force streaming", url=url, body=response.text[:500],
        )
    try:
        return json.loads(content)
    except RecursionError:
        raise not_json(url, "", " (its JSON is nested too deeply to read)") from None
    except ValueError:
        if "text/html" in kind or start.startswith((b"<!doctype", b"<html", b"<")):
            raise MalformedResponse(
                f"the endpoint at {url} answered with an HTML page, not JSON: a web server, a login page or a proxy "
                "answers there. Check that the URL is the API's base (it usually ends in /v1)",
                url=url, body=response.text[:500],
            ) from None
        raise not_json(url, response.text) from None


def unreachable(url: str, *, timed_out: bool) -> EndpointUnreachable:
    what = "did not answer in time" if timed_out else "could not be reached"
    return EndpointUnreachable(
        f"the model endpoint {url} {what}. Start your server there, or point RLM_API_URL (or --api-url) at one.",
        url=url,
    )


def tls_error(url: str, error: ssl.SSLError) -> ClientError:
    if isinstance(error, ssl.SSLCertVerificationError):
        return ClientError(
            f"the TLS certificate of the model endpoint {url} was not accepted ({error.verify_message or error}). "
            "If the server is yours, trust its certificate authority with SSL_CERT_FILE=/path/to/ca.pem",
            url=url,
        )
    return ClientError(
        f"the TLS handshake with the model endpoint {url} failed ({error}); check that it serves https there "
        "(or use http:// for a plain server)", url=url,
    )


def status_error(url: str, status: int, body: str) -> ClientError:
    overflow = overflow_error(url, status, body, _brief(body))
    if overflow is not None:
        return overflow
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
        ours = exc.__cause__ or exc.__context__
        if isinstance(exc, sdk.APIConnectionError) and isinstance(ours, ClientError):
            raise ours from None  # a cap of ours, hit while the SDK read the answer
        tls = _tls_failure(exc) if isinstance(exc, sdk.APIConnectionError) else None
        if tls is not None:
            raise tls_error(self.url, tls) from exc
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


def sdk_retried(exc: BaseException, sdk: Any) -> bool:
    """Whether an SDK's exception is worth another attempt, by the rule of `rlm.utils.retry`: a
    retried status, or no answer (but not a cap of ours hit, nor a TLS failure)."""
    if isinstance(exc, sdk.APIStatusError):
        return retried_status(exc.status_code)
    if isinstance(exc, sdk.APIConnectionError):
        return not isinstance(exc.__cause__ or exc.__context__, ClientError) and _tls_failure(exc) is None
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


@functools.lru_cache(maxsize=1)
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: building one per client costs ~40 ms."""
    return ssl.create_default_context()
