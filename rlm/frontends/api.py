"""`rlm api`: an OpenAI-compatible HTTP endpoint whose models are RLMs (Starlette, served by uvicorn).

    GET  /v1/models             "rlm:auto", and "rlm:<id>" for each model of the configured endpoint
    POST /v1/chat/completions   model "rlm:<root model>": one RLM run per request

A chat request becomes a run: the last message (the user's) is the query; the text of the
messages before it, in order, is the context (one message: its text; several: a list of
texts, one chunk each), unless the body names `context` or `context_path`, which then take
the place of the earlier messages. Other fields of the body (run options; every one may only
lower the server's own, see `rlm.frontends.schema`):

| field | meaning |
|---|---|
| `context` / `context_path` | the context as text (or a list of texts, or JSON), or a file under an allowed directory |
| `sub_model` | the sub-model (a plain name, or "auto") |
| `max_iterations`, `max_depth` | root turns, recursion depth |
| `max_cost`, `max_time`, `max_sub_calls`, `max_total_tokens` | budgets of the call tree (`max_total_tokens` is the RLM's `max_tokens`: OpenAI's own `max_tokens` means one reply's length, and is ignored like the other sampling fields) |
| `stream`, `stream_options.include_usage` | as in OpenAI's API |

The answer is `choices[0].message.content` with `finish_reason` "stop"; a run without a final
answer (max_iterations, or a budget reached) has content null and `finish_reason` "length".
`usage` is the whole call tree's; an `rlm` object adds status, run id, turns, seconds, cost,
error and trajectory. With `stream: true`, progress lines come as `reasoning_content` deltas
(clients that do not know the field skip them), then the answer as one `content` delta.

Statuses: 400 a bad request (ConfigError, ContextError), 401 no or wrong key, 403 a path
outside the allowed directories (PathNotAllowed) or a non-loopback Host, 413 a body over the
cap, 415 not JSON, 502 the model endpoint failed (ClientError), 503 the sandbox failed
(SandboxError), 500 anything else. A client that disconnects cancels its run, and the run's
worker is closed.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import time
import uuid
from typing import Any, Callable

from rlm import errors
from rlm.errors import ClientError, ConfigError, ContextError, PathNotAllowed, RLMError, SandboxError
from rlm.frontends.http import LoopbackOnly, RequireKey, send_error
from rlm.frontends.runs import RunHandle
from rlm.frontends.schema import ServerSettings, parse_run_request
from rlm.providers import split_spec
from rlm.sandbox.protocol import ProtocolViolation, check_items

__all__ = ["create_app", "MODEL_PREFIX"]

MODEL_PREFIX = "rlm:"
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
_MAX_MESSAGES = 100_000
MAX_BODY_VALUES = 500_000  # JSON values ("," "[" "{" outside strings) a request body may hold
_KEEPALIVE = 15.0  # seconds of silence in a stream before a comment line is sent
_RUN_OPTIONS = {  # body field -> run option
    "context": "context", "context_path": "context_path", "sub_model": "sub_model",
    "max_iterations": "max_iterations", "max_depth": "max_depth", "max_cost": "max_cost", "max_time": "max_time",
    "max_sub_calls": "max_sub_calls", "max_total_tokens": "max_tokens",
}
# Most specific first: (error class, HTTP status, OpenAI error type).
_STATUS = (
    (PathNotAllowed, 403, "permission_error"),
    (ConfigError, 400, "invalid_request_error"),
    (ContextError, 400, "invalid_request_error"),
    (ClientError, 502, "upstream_error"),
    (SandboxError, 503, "sandbox_error"),
    (RLMError, 500, "server_error"),
)


class _Refused(Exception):
    """A request refused before it is read as a run: too large, not JSON."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class _ClientGone(Exception):
    """The client left before its request was read: there is nobody to answer."""


def create_app(settings: ServerSettings, *, loopback: bool) -> Callable:
    """The ASGI app of `rlm api`: the key and (on a loopback address) the Host checks around
    Starlette's routes."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    async def http_error(request: Any, exc: HTTPException) -> Any:
        from starlette.responses import JSONResponse

        message = f"{request.method} {request.url.path}: {exc.detail}; this server serves GET /v1/models and " \
                  "POST /v1/chat/completions"
        return JSONResponse(_error_body(exc.status_code, "invalid_request_error", message), status_code=exc.status_code)

    slots = asyncio.Semaphore(settings.max_runs)
    app = Starlette(
        routes=[
            Route("/v1/models", _models_endpoint(settings), methods=["GET"]),
            Route("/v1/chat/completions", _ChatCompletions(settings, slots), methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    keyed = RequireKey(app, settings.key)
    return LoopbackOnly(keyed) if loopback else keyed


# -- GET /v1/models ------------------------------------------------------------------------------


def _models_endpoint(settings: ServerSettings) -> Callable:
    async def models(request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            names = await asyncio.to_thread(_model_names, settings)
        except ClientError as exc:
            return JSONResponse(_error_body(502, "upstream_error", f"listing the endpoint's models failed: {exc}"),
                                status_code=502)
        data = [{"id": MODEL_PREFIX + name, "object": "model", "created": 0, "owned_by": "rlm"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    return models


def _model_names(settings: ServerSettings) -> list[str]:
    """The models to list: "auto", the server's own `provider:name` models, and the models of
    the configured endpoint (asked only when one of the server's models is served there)."""
    from rlm.utils.llm import OpenAICompatibleClient

    names = ["auto"] + [spec for spec in (settings.model, settings.sub_model) if split_spec(spec)[0] is not None]
    if all(split_spec(spec)[0] is not None for spec in (settings.model, settings.sub_model)):
        return list(dict.fromkeys(names))
    client = OpenAICompatibleClient(api_url=settings.api_url, max_retries=settings.max_retries)
    try:
        listing = client.list_models()
    finally:
        client.close()
    for entry in listing:
        name = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(name, str) and 0 < len(name) <= 256:
            names.append(name)
    return list(dict.fromkeys(names))


# -- POST /v1/chat/completions -------------------------------------------------------------------


class _ChatCompletions:
    """The chat endpoint as a plain ASGI app: it reads the body under the cap itself, and
    watches for the client leaving while the run goes on."""

    def __init__(self, settings: ServerSettings, slots: asyncio.Semaphore) -> None:
        self.settings = settings
        self.slots = slots

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            body = await _json_body(scope, receive, self.settings.max_request_bytes)
            fields, reply = _read_chat(body)
            handle = await RunHandle.start(self.settings, parse_run_request(fields, self.settings), self.slots)
        except _ClientGone:
            return
        except _Refused as exc:
            await send_error(send, exc.status, exc.kind, str(exc))
            return
        except RLMError as exc:
            await send_error(send, *_status_of(type(exc)), str(exc))
            return
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            if reply["stream"]:
                await _stream(send, handle, gone, reply)
            else:
                await _respond(send, handle, gone, reply)
        finally:
            gone.cancel()
            if not handle.task.done():  # the client left, or the server is stopping
                await handle.stop()


async def _respond(send: Callable, handle: RunHandle, gone: asyncio.Future, reply: dict) -> None:
    await asyncio.wait({handle.task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not handle.task.done():
        return
    try:
        result = handle.task.result()
    except RLMError as exc:
        await send_error(send, *_status_of(type(exc)), str(exc))
        return
    if result.status == "error":
        await send_error(send, *_failed_status(result.error), result.error or "the run failed")
        return
    finish, content = ("stop", str(result.answer)) if result.status == "final" else ("length", None)
    body = json.dumps({
        **_chunk_head(reply, "chat.completion"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                     "logprobs": None}],
        "usage": _usage(result.usage), "rlm": _run_facts(result),
    }).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Callable, handle: RunHandle, gone: asyncio.Future, reply: dict) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no")]})
    await _event(send, _delta(reply, {"role": "assistant", "content": ""}))
    while True:
        line = asyncio.ensure_future(handle.lines.get())
        done, _ = await asyncio.wait({line, handle.task, gone}, timeout=_KEEPALIVE, return_when=asyncio.FIRST_COMPLETED)
        if gone in done:
            line.cancel()
            return
        if line in done:
            await _event(send, _delta(reply, {"reasoning_content": line.result() + "\n"}))
            continue
        line.cancel()
        if not done:  # a long quiet cell: an SSE comment keeps proxies from closing the stream
            await send({"type": "http.response.body", "body": b": keepalive\n\n", "more_body": True})
            continue
        break
    while not handle.lines.empty():
        await _event(send, _delta(reply, {"reasoning_content": handle.lines.get_nowait() + "\n"}))
    await _stream_end(send, handle, reply)


async def _stream_end(send: Callable, handle: RunHandle, reply: dict) -> None:
    try:
        result = handle.task.result()
        failure = _failed_status(result.error) + (result.error or "",) if result.status == "error" else None
    except RLMError as exc:
        failure = (*_status_of(type(exc)), str(exc))
    if failure is not None:  # the OpenAI SDK raises APIError on an event holding "error"
        status, kind, message = failure
        await _event(send, {"error": {"message": message, "type": kind, "param": None, "code": status}})
    else:
        if result.status == "final":
            await _event(send, _delta(reply, {"content": str(result.answer)}))
        final = _delta(reply, {}, "stop" if result.status == "final" else "length")
        await _event(send, {**final, "rlm": _run_facts(result)})
        if reply["include_usage"]:
            await _event(send, {**_chunk_head(reply, "chat.completion.chunk"), "choices": [],
                                "usage": _usage(result.usage)})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- reading the request ---------------------------------------------------------------------------


async def _json_body(scope: dict, receive: Callable, cap: int) -> dict:
    headers = {key.lower(): value for key, value in scope.get("headers", ())}
    if headers.get(b"content-type", b"").split(b";")[0].strip().lower() != b"application/json":
        raise _Refused(415, "invalid_request_error", "send the body as JSON, with Content-Type: application/json")
    declared = headers.get(b"content-length")
    too_large = _Refused(413, "invalid_request_error",
                         f"the request is larger than this server's cap ({cap:,} bytes, --max-request-size); "
                         "pass a large context as a file with context_path")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise too_large if declared.isdigit() else _Refused(400, "invalid_request_error", "bad Content-Length")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    data = b"".join(chunks)
    try:
        # Bounded before parsing (an empty object costs ~20 times its 3 bytes once parsed), and
        # parsed off the event loop, so that one large body does not stall the other requests.
        check_items(data, MAX_BODY_VALUES)
    except ProtocolViolation:
        raise _Refused(413, "invalid_request_error",
                       f"the body holds more than {MAX_BODY_VALUES:,} JSON values; pass a large context as a file") from None
    try:
        body = await asyncio.to_thread(json.loads, data)
    except (ValueError, RecursionError):
        raise _Refused(400, "invalid_request_error", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Refused(400, "invalid_request_error", "the body must be a JSON object")
    return body


def _read_chat(body: dict) -> tuple[dict, dict]:
    """The run's fields, and how to reply (model name, id, stream, usage chunk)."""
    model = body.get("model")
    if not isinstance(model, str) or not model.startswith(MODEL_PREFIX):
        raise ConfigError(f'model must be "{MODEL_PREFIX}<root model>", such as "{MODEL_PREFIX}auto" (see GET /v1/models)')
    query, earlier = _split_messages(body.get("messages"))
    fields = {option: body.get(name) for name, option in _RUN_OPTIONS.items()}
    fields["query"] = query
    name = model[len(MODEL_PREFIX):]
    fields["model"] = None if name == "auto" else name
    if fields["context"] is None and fields["context_path"] is None:
        if not earlier:
            raise ConfigError("no context: send it as messages before the question, or as context / context_path")
        fields["context"] = earlier[0] if len(earlier) == 1 else earlier
    stream, options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ConfigError("stream must be true or false, and stream_options an object")
    reply = {"model": model, "id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "stream": stream,
             "include_usage": options.get("include_usage") is True}
    return fields, reply


def _split_messages(messages: Any) -> tuple[str, list[str]]:
    if not isinstance(messages, list) or not messages or len(messages) > _MAX_MESSAGES:
        raise ConfigError(f"messages must be a list of 1 to {_MAX_MESSAGES:,} messages, the last one the question")
    texts = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ConfigError(f"messages[{index}] must be an object with a role ({', '.join(sorted(_ROLES))})")
        texts.append(_message_text(message.get("content"), index))
    if messages[-1]["role"] != "user" or not texts[-1].strip():
        raise ConfigError("the last message must be the user's question, with text")
    return texts[-1], texts[:-1]


def _message_text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ConfigError(f"messages[{index}]: only text content is supported, not {str(kind)[:40]!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise ConfigError(f"messages[{index}].content must be text or a list of text parts")


async def _disconnected(receive: Callable) -> None:
    """Returns when the client has gone (after the body, `receive` only says that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# -- writing the reply -----------------------------------------------------------------------------


def _chunk_head(reply: dict, kind: str) -> dict:
    return {"id": reply["id"], "object": kind, "created": reply["created"], "model": reply["model"]}


def _delta(reply: dict, delta: dict, finish: str | None = None) -> dict:
    return {**_chunk_head(reply, "chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


async def _event(send: Callable, payload: dict) -> None:
    await send({"type": "http.response.body", "body": b"data: " + json.dumps(payload).encode() + b"\n\n",
                "more_body": True})


def _usage(summary: dict) -> dict:
    """OpenAI's usage object from a `cost_summary()`: the whole call tree's tokens."""
    prompt = int(summary.get("total_input_tokens") or 0)
    completion = int(summary.get("total_output_tokens") or 0)
    cached = sum(int((summary.get(part) or {}).get("cached_tokens") or 0) for part in ("root", "sub"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _run_facts(result: Any) -> dict:
    usage = result.usage or {}
    return {"status": result.status, "run_id": result.run_id, "iterations": result.iterations,
            "wall_time": round(result.wall_time, 3), "cost": usage.get("total_cost"),
            "cost_complete": usage.get("cost_complete"), "error": result.error,
            "trajectory": result.trajectory_path}


def _error_body(status: int, kind: str, message: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _status_of(failure: type[BaseException]) -> tuple[int, str]:
    for kind, status, name in _STATUS:
        if issubclass(failure, kind):
            return status, name
    return 500, "server_error"


def _failed_status(error: str | None) -> tuple[int, str]:
    """The status of a run that ended with status "error", from its error's type name."""
    name = (error or "").partition(":")[0]
    found = getattr(errors, name, None) if name in errors.__all__ else getattr(builtins, name, None)
    if isinstance(found, type) and issubclass(found, OSError):  # a context file that could not be read
        return 400, "invalid_request_error"
    return _status_of(found) if isinstance(found, type) and issubclass(found, BaseException) else (500, "server_error")
