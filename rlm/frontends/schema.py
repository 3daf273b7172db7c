"""What a request to `rlm mcp` or `rlm api` may ask for, and the caps it is held to.

Whoever can reach a server is untrusted, so this is the one place where a request's run
options are read, for both front ends. The server's settings (`ServerSettings`, from its
command line) are the ceiling: a request may choose at or below them, never above.

| field | accepted | otherwise |
|---|---|---|
| `query` | non-empty text | ConfigError |
| `context` | text, a list of texts, or a JSON object or array; at most `max_request_bytes` as UTF-8 / JSON | ConfigError |
| `context_path` | a regular file whose real path (links resolved) is under an allowed directory; a relative path is taken from the server's working directory | PathNotAllowed, ContextError |
| `model`, `sub_model` | `auto`, a plain name for the server's endpoint (1-256 characters, no spaces or control characters), or the server's own `provider:name` | ConfigError |
| `max_iterations`, `max_depth` | whole numbers (at least 1 and 0), at most the server's | ConfigError |
| `max_cost`, `max_time` | positive numbers, at most the server's when it sets one | ConfigError |
| `max_tokens`, `max_sub_calls` | positive whole numbers, at most the server's when it sets one | ConfigError |

Exactly one of `context` and `context_path` is given. Another `provider:name` than the
server's own is refused: a request must not spend a provider key the operator did not
choose. A context file is opened by the REPL worker, never read by the server, so its size
is bounded by the worker's memory limit, not by the request cap.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from rlm.errors import ConfigError, ContextError, PathNotAllowed
from rlm.providers import split_spec
from rlm.sandbox import AUTO
from rlm.sandbox.base import SandboxLimits
from rlm.utils.tracing import Event

__all__ = ["ServerSettings", "RunRequest", "parse_run_request", "resolve_context_path", "allowed_dirs", "repl_options"]

MiB = 1 << 20
_MODEL_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")
_MAX_PATH = 4096
# name -> (a whole number, 0 allowed); every other value must be above 0.
_NUMBERS = {
    "max_iterations": (True, False), "max_depth": (True, True), "max_tokens": (True, False),
    "max_sub_calls": (True, False), "max_cost": (False, False), "max_time": (False, False),
}


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How a server runs every request: its models, sandbox and limits (the ceiling of what a
    request may ask), where it logs, which directories `context_path` may name, the request
    size cap, how many runs go at once, and the bearer key of its HTTP transport."""

    model: str = "auto"
    sub_model: str = "auto"
    api_url: str | None = None
    max_iterations: int = 20
    max_depth: int = 1
    sandbox: str = AUTO
    exec_timeout: float = 120.0
    memory_limit: int | None = SandboxLimits.memory
    cpu_time_limit: float | None = None
    prompt: str = "default"
    max_retries: int = 3
    max_cost: float | None = None
    max_tokens: int | None = None
    max_sub_calls: int | None = None
    max_time: float | None = None
    log_dir: Path | None = None
    allow_dirs: tuple[Path, ...] = ()
    max_request_bytes: int = 32 * MiB
    max_runs: int = 8
    key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """One checked request: the query, the context (a value, or a `Path` under an allowed
    directory), the models, and the limits of its run."""

    query: str
    context: Any
    model: str
    sub_model: str
    max_iterations: int
    max_depth: int
    max_cost: float | None
    max_tokens: int | None
    max_sub_calls: int | None
    max_time: float | None


def parse_run_request(fields: Mapping[str, Any], settings: ServerSettings) -> RunRequest:
    """Check a request's fields (None or missing: the server's value) against `settings`."""
    query = fields.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("the query must be non-empty text")
    if _utf8_size(query) > settings.max_request_bytes:
        raise ConfigError(f"the query is larger than this server's request cap ({settings.max_request_bytes:,} bytes)")
    limits = {name: _at_most(name, fields.get(name), getattr(settings, name)) for name in _NUMBERS}
    return RunRequest(
        query=query,
        context=_context(fields.get("context"), fields.get("context_path"), settings),
        model=_model("model", fields.get("model"), settings.model, settings),
        sub_model=_model("sub_model", fields.get("sub_model"), settings.sub_model, settings),
        **limits,
    )


def resolve_context_path(text: Any, allowed: tuple[Path, ...]) -> Any:
    """A requested context file, opened for binary reading, if it lies under one of `allowed`.

    Links are resolved before the check, so a link inside an allowed directory that points
    outside is refused. Nothing is said about a path outside (not even whether it exists).
    The file is opened here and checked again by what was opened (its path as the kernel
    gives it, and its type), then passed on open: swapping the path for a link after the
    check cannot make the run read another file. The caller closes it.
    """
    if not isinstance(text, str) or not text or "\x00" in text or len(text) > _MAX_PATH:
        raise ConfigError(f"context_path must be a file path of 1 to {_MAX_PATH} characters")
    real = Path(os.path.realpath(Path.cwd() / text))
    if not any(real.is_relative_to(directory) for directory in allowed):
        where = ", ".join(str(directory) for directory in allowed) or "none"
        raise PathNotAllowed(
            f"context_path {text!r} is outside the directories this server reads (allowed: {where}); "
            "put the file there, or start the server with --allow-dir for its directory"
        )
    refused = ContextError(f"context_path {text!r} is not a regular file; name a text file")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise refused from None
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not any(opened.is_relative_to(directory) for directory in allowed):
            raise PathNotAllowed(f"context_path {text!r} changed while it was being opened; try again")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refused
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb")  # noqa: SIM115: the run's owner closes it


def allowed_dirs(directories: list[Path]) -> tuple[Path, ...]:
    """The real paths of `--allow-dir` directories (default: the working directory)."""
    chosen = directories or [Path.cwd()]
    resolved = []
    for directory in chosen:
        real = Path(os.path.realpath(directory))
        if not real.is_dir():
            raise ConfigError(f"--allow-dir {str(directory)!r} is not a directory")
        resolved.append(real)
    return tuple(resolved)


def repl_options(settings: ServerSettings, request: RunRequest, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """The `RLM_REPL` arguments of one request's run."""
    return {
        "model": request.model, "recursive_model": request.sub_model, "max_iterations": request.max_iterations,
        "api_url": settings.api_url, "sandbox": settings.sandbox, "memory_limit": settings.memory_limit,
        "cpu_time_limit": settings.cpu_time_limit, "system_prompt": settings.prompt,
        "max_retries": settings.max_retries, "max_depth": request.max_depth, "max_cost": request.max_cost,
        "max_tokens": request.max_tokens, "max_sub_calls": request.max_sub_calls, "max_time": request.max_time,
        "log_dir": str(settings.log_dir) if settings.log_dir is not None else None, "on_event": on_event,
        "exec_timeout": settings.exec_timeout,
    }


# -- the checks ----------------------------------------------------------------------------------


def _context(value: Any, path: Any, settings: ServerSettings) -> Any:
    if (value is None) == (path is None):
        raise ConfigError("give the context either as text (context) or as a file (context_path), one of the two")
    if path is not None:
        return resolve_context_path(path, settings.allow_dirs)
    if isinstance(value, bool) or not isinstance(value, (str, list, dict)):
        raise ConfigError("context must be text, a list of texts, or a JSON object or array")
    if _json_size(value) > settings.max_request_bytes:
        raise ConfigError(
            f"the context is larger than this server's request cap ({settings.max_request_bytes:,} bytes); "
            "pass a file with context_path instead"
        )
    return value


def _at_most(name: str, asked: Any, ceiling: int | float | None) -> Any:
    whole, zero = _NUMBERS[name]
    if asked is None:
        return ceiling
    kinds = (int,) if whole else (int, float)
    valid = not isinstance(asked, bool) and isinstance(asked, kinds) and math.isfinite(asked)
    if not valid or not (asked > 0 or (zero and asked == 0)):
        what = "a whole number" if whole else "a number"
        raise ConfigError(f"{name} must be {what} {'of 0 or more' if zero else 'above 0'}, got {asked!r:.40}")
    if ceiling is not None and asked > ceiling:
        raise ConfigError(
            f"{name} {asked:g} is above this server's limit of {ceiling:g}; ask for {ceiling:g} or less "
            "(a request may lower the server's limits, never raise them)"
        )
    return asked


def _model(name: str, asked: Any, default: str, settings: ServerSettings) -> str:
    if asked is None:
        return default
    if not isinstance(asked, str) or not _MODEL_NAME.fullmatch(asked):
        raise ConfigError(f"{name} must be a model name of 1 to 256 characters without spaces, got {asked!r:.80}")
    if split_spec(asked)[0] is not None and asked not in (settings.model, settings.sub_model):
        raise ConfigError(
            f"{name} {asked!r} names a provider; this server uses its own endpoint, and of providers only "
            f"its own models ({settings.model}, {settings.sub_model}): ask for a plain model name or 'auto'"
        )
    return asked


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _json_size(value: Any) -> int:
    if isinstance(value, str):
        return _utf8_size(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return sum(_utf8_size(item) for item in value)
    try:
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        raise ConfigError("context must be text, a list of texts, or a JSON object or array") from None
