"""When a request to a model server is tried again, and how long one call may take in all.

Both clients (`rlm.utils.endpoint.JSONEndpoint` and the Anthropic client) follow this one
policy. Connection failures, a server silent past the timeout and the statuses 408, 409,
429 and 5xx are worth another attempt. After a failure the client waits what the server
asks (`Retry-After`, `retry-after-ms`; up to `ResponseLimits.max_retry_wait`) or else 0.5 s
doubling to 8 s, both with jitter so that a fan-out does not retry in lockstep.

`CallSchedule` keeps one call within twice its timeout, whatever the server does: each
attempt may take the timeout, a retry only what remains, and a wait that would end past
the call's deadline is not taken (the last failure is raised instead).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import random
import time
from typing import Mapping

from rlm.errors import ConfigError

__all__ = ["CallSchedule", "retried_status", "told_wait", "check_timing"]

_RETRIED_STATUSES = frozenset({408, 409, 429})
_FIRST_WAIT, _LONGEST_WAIT = 0.5, 8.0
_MAX_RETRIES = 20
# Attempts and waits of one call end within this many timeouts; the rest of twice the
# timeout is room to close the connection and raise, so the call ends within 2x.
_CALL_SPAN = 1.9


def check_timing(timeout: float, max_retries: int) -> None:
    """ConfigError unless `timeout` is a finite number of seconds above 0 and `max_retries` 0 to 20."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ConfigError(f"the request timeout must be a number of seconds above 0, got {timeout!r}")
    if type(max_retries) is not int or not 0 <= max_retries <= _MAX_RETRIES:
        raise ConfigError(f"max_retries must be a whole number from 0 to {_MAX_RETRIES}, got {max_retries!r}")


class CallSchedule:
    """The time of one call (start it when the call starts): how long the next attempt may
    take, and whether and how long to wait after a failure.

    Each attempt gets at most `timeout` seconds; all of them and the waits between end
    within 1.9 x `timeout`, so that the call, closing included, ends within twice it.
    """

    def __init__(self, timeout: float, max_retries: int, max_retry_wait: float) -> None:
        self._timeout = timeout
        self._max_retries = max_retries
        self._max_retry_wait = max_retry_wait
        self._deadline = time.monotonic() + _CALL_SPAN * timeout
        self._failures = 0

    def allowance(self) -> float:
        """Seconds the next attempt may take: the timeout, or what remains of the call if less."""
        return max(0.0, min(self._timeout, self._deadline - time.monotonic()))

    async def pause(self, told: float | None) -> bool:
        """After a failed attempt, wait before the next one and return True; return False at once
        when no attempt is left: `max_retries` were made, or the wait would end past the deadline.
        `told` is the wait the server asked for (None: it asked nothing)."""
        failures = self._failures
        self._failures += 1
        if failures >= self._max_retries:
            return False
        if told is not None and 0 <= told <= self._max_retry_wait:
            wait = told * (1 + 0.1 * random.random())
        else:
            wait = min(_FIRST_WAIT * 2**failures, _LONGEST_WAIT) * (1 - 0.25 * random.random())
        if time.monotonic() + wait >= self._deadline:
            return False
        await asyncio.sleep(wait)
        return True


def retried_status(status: int) -> bool:
    """Whether an answer with this HTTP status is worth another attempt."""
    return status in _RETRIED_STATUSES or status >= 500


def told_wait(headers: Mapping[str, str]) -> float | None:
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
