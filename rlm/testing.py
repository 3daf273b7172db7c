"""Fakes for testing code that uses `rlm`, without a real model.

- `ScriptedModel`: an in-memory client that answers from a list or a function.
- `FakeOpenAIServer`: a real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions
  protocol (`GET /v1/models`, `POST /v1/chat/completions`) and a minimal Anthropic Messages
  API (`POST /v1/messages`), with faults on demand: error statuses, Retry-After, delays,
  malformed bodies, `content: null`, missing usage; a request longer than its window is
  refused as llama.cpp (or Anthropic) refuses it.
- `HostileServer`: a raw HTTP/1.1 server on 127.0.0.1 answering with one `Fault` (the
  named cases are in `FAULTS`: compression bombs, huge or trickled bodies, header floods,
  redirects elsewhere, HTML, unasked-for streams, usage figures that cannot be true), to
  test a client, or code built on one, against servers that answer badly.
- `replay_clients(path)`: clients that answer from a recorded trajectory (record once,
  replay in CI; see `rlm.replay`).

Root-model requests are told apart from sub-calls by their system prompt: the root loop
always sends one (a first system message, or Anthropic's `system` field); `llm_query` sends
a single user message.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

from rlm._hostile import FAULTS, Fault, HostileServer, RecordedRequest, chat_body, redirect
from rlm.errors import RLMError
from rlm.usage import Usage
from rlm.utils.llm import Completion, estimate_tokens

if TYPE_CHECKING:
    from pathlib import Path

    from rlm.replay import ReplaySession

__all__ = [
    "FakeReply", "ScriptedModel", "FakeOpenAIServer", "is_root_request", "message_text", "replay_clients",
    "HostileServer", "Fault", "FAULTS", "RecordedRequest", "chat_body", "redirect",
]


@dataclass
class FakeReply:
    """How the fake server answers one chat request.

    `content` is the message text (None sends `"content": null`); `status` other than 200
    sends an error body (OpenAI's shape, or Anthropic's on its route); `raw` replaces the whole body with these bytes;
    `delay` waits before answering; `usage` is "auto" (counted), None (omitted) or a dict.
    `anthropic_usage` is the `usage` object sent on the Anthropic route (default: counted,
    no cache reads or writes; `usage=None` omits it there too).
    """

    content: str | None = ""
    status: int = 200
    raw: bytes | None = None
    delay: float = 0.0
    usage: Any = "auto"
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str = "stop"
    anthropic_usage: dict | None = None


Reply = Union[str, None, FakeReply]
Responder = Callable[[dict], Reply]


def is_root_request(request: dict) -> bool:
    """True for a root-model request: it has a system prompt (OpenAI: a first system message;
    Anthropic: a `system` field)."""
    if request.get("system"):
        return True
    messages = request.get("messages") or [{}]
    return messages[0].get("role") == "system"


def message_text(message: dict) -> str:
    """The text of one request message, whether its content is a string or a list of blocks."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return content or ""


def _prompt_chars(request: dict) -> int:
    system = request.get("system")
    chars = len(message_text({"content": system})) if system else 0
    return chars + sum(len(message_text(m)) for m in request.get("messages", []))


def _from_script(script: Iterable[Reply] | Callable[[dict], Reply], name: str) -> Responder:
    if callable(script):
        return script
    queue = deque(script)
    lock = threading.Lock()

    def next_reply(request: dict) -> Reply:
        with lock:
            if not queue:
                raise RLMError(f"the {name} script ran out of replies after {len(request.get('messages', []))} messages")
            return queue.popleft()

    return next_reply


class ScriptedModel:
    """A client that answers from a script instead of a server.

    `replies` is a list of reply texts used in order, or a function of the message list.
    Every request is kept in `requests` (a copy of its messages). Usage counts 4
    characters per token; the base URL is a loopback one, so calls cost $0.
    """

    base_url = "http://127.0.0.1/scripted"

    def __init__(
        self,
        replies: Iterable[str | None] | Callable[[list[dict]], str | None],
        *,
        model: str = "scripted",
        window: int | None = None,
        delay: float = 0.0,
    ) -> None:
        self.model = model
        self.requests: list[list[dict]] = []
        self._window = window
        self._delay = delay
        self._lock = threading.Lock()
        if callable(replies):
            self._next: Callable[[list[dict]], str | None] = replies
        else:
            responder = _from_script(replies, f"ScriptedModel {model!r}")
            self._next = lambda messages: responder({"messages": messages})

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        if self._delay:
            time.sleep(self._delay)
        return self._answer(messages)

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        if self._delay:
            await asyncio.sleep(self._delay)
        # In a thread: a scripted reply function may block (sleep) like a slow server would.
        return await asyncio.to_thread(self._answer, messages)

    def _answer(self, messages: list[dict]) -> Completion:
        with self._lock:
            self.requests.append([dict(message) for message in messages])
        text = self._next(messages)
        reply = text if isinstance(text, str) else ""
        prompt_chars = sum(len(message_text(message)) for message in messages)
        usage = Usage(input_tokens=estimate_tokens(prompt_chars), output_tokens=estimate_tokens(reply))
        return Completion(text=reply, usage=usage, model=self.model, latency=self._delay, content_missing=text is None)

    def context_window(self) -> int | None:
        return self._window

    async def aclose(self) -> None:
        return None


class FakeOpenAIServer:
    """An OpenAI-compatible HTTP server on 127.0.0.1 for tests; use as a context manager.

    `root` answers root-model requests and `sub` answers `llm_query` sub-calls; each is a
    list of replies (str, None or FakeReply) used in order, or a function of the request
    JSON. `responder` answers every chat request instead. `models_reply` overrides the
    `GET /models` answer (a FakeReply), for fault tests. Requests to the Anthropic route
    (base URL `root_url`, as the Anthropic SDK adds `/v1/messages` itself) are answered
    and recorded the same way, in Anthropic's response shape.

    `context_window` is the window `GET /models` reports; a request whose prompt is longer
    than `enforced_window` tokens (default: `context_window`; counted as its usage is, 4
    characters a token) is refused with HTTP 400 in the words llama.cpp (or Anthropic) uses.
    """

    def __init__(
        self,
        *,
        root: Iterable[Reply] | Responder | None = None,
        sub: Iterable[Reply] | Responder | None = None,
        responder: Responder | None = None,
        models: list[str] | None = None,
        context_window: int | None = None,
        latency: float = 0.0,
        models_reply: FakeReply | None = None,
        enforced_window: int | None = None,
    ) -> None:
        self.models = models or ["fake-model"]
        self.context_window = context_window
        self.enforced_window = enforced_window or context_window
        self.latency = latency
        self.models_reply = models_reply
        self.requests: list[dict] = []
        self.request_headers: list[dict[str, str]] = []  # headers of every request, GET included
        self._root = _from_script(root, "root") if root is not None else None
        self._sub = _from_script(sub, "sub") if sub is not None else (lambda request: "ok")
        self._responder = responder
        self._faults: deque[FakeReply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL to give an OpenAI-compatible client, ending in /v1."""
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        """Base URL without /v1: what the Anthropic SDK takes (it posts to /v1/messages)."""
        if self._server is None:
            raise RuntimeError("the fake server is not running; use it in a with block or call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, *replies: FakeReply) -> None:
        """Answer the next chat requests with these replies first (faults, in order)."""
        with self._lock:
            self._faults.extend(replies)

    def chat_requests(self, root: bool | None = None) -> list[dict]:
        """Received chat requests; only root (True) or only sub-calls (False) if asked."""
        with self._lock:
            requests = list(self.requests)
        if root is None:
            return requests
        return [request for request in requests if is_root_request(request) == root]

    def start(self) -> "FakeOpenAIServer":
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval: stop() waits up to one interval for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- answering ---------------------------------------------------------------------------

    def _chat_reply(self, request: dict, anthropic: bool = False) -> FakeReply:
        with self._lock:
            self.requests.append(request)
            if self._faults:
                return self._faults.popleft()
        prompt = estimate_tokens(_prompt_chars(request))
        if self.enforced_window and prompt > self.enforced_window:
            return _overflow_reply(prompt, self.enforced_window, anthropic)
        if self._responder is not None:
            reply = self._responder(request)
        elif is_root_request(request):
            if self._root is None:
                raise RLMError("FakeOpenAIServer got a root request but has no root script")
            reply = self._root(request)
        else:
            reply = self._sub(request)
        return reply if isinstance(reply, FakeReply) else FakeReply(content=reply)

    def _record_headers(self, headers: dict[str, str]) -> None:
        with self._lock:
            self.request_headers.append(headers)

    def _models_body(self) -> dict:
        entries = []
        for name in self.models:
            entry: dict[str, Any] = {"id": name, "object": "model", "owned_by": "rlm-testing"}
            if self.context_window:
                entry["context_window"] = self.context_window
            entries.append(entry)
        return {"object": "list", "data": entries}

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 drops connections when 16+ sub-calls arrive at once


def _completion_body(request: dict, reply: FakeReply) -> dict:
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake-model"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply.content}, "finish_reason": reply.finish_reason}
        ],
    }
    if reply.usage == "auto":
        prompt = _prompt_chars(request)
        completion = estimate_tokens(reply.content or "")
        body["usage"] = {
            "prompt_tokens": estimate_tokens(prompt),
            "completion_tokens": completion,
            "total_tokens": estimate_tokens(prompt) + completion,
        }
    elif reply.usage is not None:
        body["usage"] = reply.usage
    return body


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def _messages_body(request: dict, reply: FakeReply) -> dict:
    """An Anthropic Messages API response."""
    body: dict[str, Any] = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "fake-model"),
        "content": [] if reply.content is None else [{"type": "text", "text": reply.content}],
        "stop_reason": _STOP_REASONS.get(reply.finish_reason, reply.finish_reason),
        "stop_sequence": None,
    }
    if reply.anthropic_usage is not None:
        body["usage"] = reply.anthropic_usage
    elif reply.usage is not None:
        body["usage"] = {
            "input_tokens": estimate_tokens(_prompt_chars(request)),
            "output_tokens": estimate_tokens(reply.content or ""),
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        }
    return body


def _overflow_reply(prompt: int, window: int, anthropic: bool) -> FakeReply:
    """The refusal of a prompt longer than the window, as llama.cpp's server (or Anthropic) words it."""
    if anthropic:
        return FakeReply(status=400, content=f"prompt is too long: {prompt} tokens > {window} maximum")
    body = {"error": {
        "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": prompt, "n_ctx": window,
        "message": f"request ({prompt} tokens) exceeds the available context size ({window} tokens), try increasing it",
    }}
    return FakeReply(status=400, raw=json.dumps(body).encode())


def _error_body(reply: FakeReply, anthropic: bool) -> bytes:
    message = reply.content or f"fake error {reply.status}"
    if anthropic:
        return json.dumps({"type": "error", "error": {"type": "fake_error", "message": message}}).encode()
    return json.dumps({"error": {"message": message, "type": "fake_error", "code": reply.status}}).encode()


def _handler_for(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Without this, a response split over two writes waits ~40 ms for a delayed ACK.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            return None

        def do_GET(self) -> None:
            server._record_headers(dict(self.headers))
            if self.path.rstrip("/").endswith("/models"):
                if server.models_reply is not None:
                    self._send_reply({}, server.models_reply, lambda: {})
                else:
                    self._send(200, json.dumps(server._models_body()).encode())
            else:
                self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())

        def do_POST(self) -> None:
            server._record_headers(dict(self.headers))
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, b'{"error": {"message": "request body is not JSON"}}')
                return
            path = self.path.rstrip("/")
            if path.endswith("/chat/completions"):
                shape = _completion_body
            elif path.endswith("/messages"):  # Anthropic: the SDK posts to <root>/v1/messages
                shape = _messages_body
            else:
                self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
                return
            server._wait(server.latency)
            reply = server._chat_reply(request, anthropic=shape is _messages_body)
            self._send_reply(request, reply, lambda: shape(request, reply), anthropic=shape is _messages_body)

        def _send_reply(
            self, request: dict, reply: FakeReply, body: Callable[[], dict], anthropic: bool = False
        ) -> None:
            server._wait(reply.delay)
            if reply.raw is not None:
                payload = reply.raw
            elif reply.status != 200:
                payload = _error_body(reply, anthropic)
            else:
                payload = json.dumps(body()).encode()
            self._send(reply.status, payload, reply.headers)

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test); nothing to answer

    return Handler


def replay_clients(path: "str | Path") -> "ReplaySession":
    """A `rlm.replay.ReplaySession` for a trajectory file: pass `.root` and `.sub` as `client=`
    and `sub_client=` of an `RLM_REPL`, run the same query and context, then call
    `.assert_same(answer)` (or read `.divergence`)."""
    from rlm.replay import ReplaySession
    from rlm.trajectory import load

    return ReplaySession(load(path))
