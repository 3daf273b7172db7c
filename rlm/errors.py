"""The exceptions `rlm` raises: one tree rooted at `RLMError`.

    RLMError
     +-- ConfigError            bad argument or environment value; fix the call
     +-- ContextError           the context cannot be loaded (bad type, missing file)
     |    +-- PathNotAllowed         a server was asked for a file outside the directories it allows
     +-- ClientError            the model endpoint failed (has .url, .status, .body)
     |    +-- EndpointUnreachable    nothing answered at the URL
     |    +-- MalformedResponse      the server answered something that is not a completion
     |    |    +-- ResponseLimitExceeded  the answer broke a cap of the client (size, ratio, time)
     |    +-- ContextWindowExceeded  a request does not fit the model's context window (has .window, .request_tokens)
     +-- SandboxError           the REPL worker could not be started or talked to
     |    +-- SandboxUnavailable     this machine cannot provide the isolation level asked for
     +-- BudgetExceeded         a cost / token / call / time limit of the run was reached

    UserWarning
     +-- IsolationWarning       sandbox="auto" found no isolation on this machine (see the message)

Errors in model-written code are not exceptions of ours: they are shown to the model.
"""

from __future__ import annotations

__all__ = [
    "RLMError",
    "ConfigError",
    "ContextError",
    "PathNotAllowed",
    "ClientError",
    "EndpointUnreachable",
    "MalformedResponse",
    "ResponseLimitExceeded",
    "ContextWindowExceeded",
    "SandboxError",
    "SandboxUnavailable",
    "BudgetExceeded",
    "IsolationWarning",
]


class RLMError(Exception):
    """Base class of every error raised by `rlm`."""


class ConfigError(RLMError):
    """An argument or environment variable has a value we cannot use."""


class ContextError(RLMError):
    """The context given to `completion()` cannot be loaded into the REPL."""


class PathNotAllowed(ContextError):
    """A request to `rlm mcp` or `rlm api` named a context file outside the directories the
    server allows (`--allow-dir`); the message names them."""


class ClientError(RLMError):
    """The model endpoint failed: an HTTP error status, or a failure to reach it.

    `status` is the HTTP status (None when no response came back), `body` the start of the
    response body, `url` the endpoint's base URL.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.body = body

    @property
    def is_request_error(self) -> bool:
        """True when the server rejected this particular request (for example a prompt too long).

        Such an error is the caller's to handle; any other failure means the endpoint itself
        is not usable.
        """
        return self.status in (400, 413, 422)


class EndpointUnreachable(ClientError):
    """Nothing answered at the endpoint URL (connection refused, DNS failure, timeout)."""


class MalformedResponse(ClientError):
    """The endpoint answered, but not with a chat completion we can read."""


class ResponseLimitExceeded(MalformedResponse):
    """The endpoint's answer broke one of the client's caps and was refused unread.

    `limit` names the cap: a field of `ResponseLimits` ("max_body_bytes",
    "max_compression_ratio", "max_header_bytes"), "timeout" (the answer did not finish within
    the request timeout) or "encoding" (a body that cannot be decoded).
    """

    def __init__(self, message: str, *, url: str, limit: str) -> None:
        super().__init__(message, url=url)
        self.limit = limit


class ContextWindowExceeded(ClientError):
    """A request does not fit the model's context window.

    Raised when a server refuses a request as too long for its window (`status` 400 or 413,
    `body` its answer), and by the root loop itself when even its shortest request (the
    system prompt, the first message, the latest turn and room for the reply) cannot fit.
    The root loop first removes old turns and, after a server's refusal, retries once with
    the sizes the server reported; this is raised when that is not enough.

    `window` is the window in tokens and `request_tokens` the size of the request, each None
    when unknown; `reply_tokens` the room kept for the reply.
    """

    def __init__(
        self, message: str, *, url: str, window: int | None = None, request_tokens: int | None = None,
        reply_tokens: int | None = None, status: int | None = None, body: str = "",
    ) -> None:
        super().__init__(message, url=url, status=status, body=body)
        self.window = window
        self.request_tokens = request_tokens
        self.reply_tokens = reply_tokens

    @property
    def is_request_error(self) -> bool:
        """Always True: this request is too long; the endpoint itself works (a sub-call's
        overflow fails that call only)."""
        return True


class SandboxError(RLMError):
    """The REPL worker could not be started, or stopped talking the protocol."""


class SandboxUnavailable(SandboxError):
    """The isolation level asked for needs something this machine lacks; the message says what.

    Raised when the sandbox is created, never later: a level is not replaced by a weaker one.
    """


class BudgetExceeded(RLMError):
    """A limit of the run (`max_cost`, `max_tokens`, `max_sub_calls`, `max_time`) was reached.

    `limit` names it, `allowed` and `spent` are its value and what was used when the run
    stopped. `partial_answer` is the root model's last reply (its best attempt so far) and
    `usage` the run's `cost_summary()`-shaped totals; both are filled in by the time the
    exception reaches the caller.
    """

    def __init__(self, limit: str, allowed: float, spent: float) -> None:
        super().__init__(
            f"the run reached its {limit} limit ({spent:g} of {allowed:g}); raise {limit} or narrow the question"
        )
        self.limit = limit
        self.allowed = allowed
        self.spent = spent
        self.partial_answer: str | None = None
        self.usage: dict = {}


class IsolationWarning(UserWarning):
    """`sandbox="auto"` found no isolation level on this machine and runs model code in a plain
    worker process, with the user's own rights. Issued once per process; the message says what
    to install (bubblewrap, or Landlock and libseccomp) to get one."""
