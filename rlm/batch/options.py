"""The options of a batch, and which of them one input line may set for itself.

`OPTIONS` is the one table. For each option: what its value must be, whether an input line
may give it for its own item (`per_item`), whether it is recorded with the results
(`recorded`: options that shape the answers; a rerun with other values is refused) or may
change between runs (where and how fast: `api_url`, `max_retries`, `request_timeout`), and
the `RLM_REPL` argument it becomes. A `null` budget on an input line lifts the batch's
budget for that item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from rlm._text import is_utf8
from rlm.errors import ConfigError
from rlm.sandbox import AUTO, SANDBOXES

__all__ = ["OPTIONS", "Option", "check_options", "recorded", "rlm_arguments"]

_Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Option:
    """One option: `check(value)` says whether a value is allowed, `expected` says what is."""

    check: _Check
    expected: str
    per_item: bool = False
    recorded: bool = True
    argument: str | None = None  # the RLM_REPL argument, when not the option's own name


def _text(limit: int) -> tuple[_Check, str]:
    def check(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip()) and len(value) <= limit and is_utf8(value)

    return check, f"a non-empty string of at most {limit:,} characters"


def _whole(low: int, high: int, *, nullable: bool = False) -> tuple[_Check, str]:
    def check(value: Any) -> bool:
        if value is None:
            return nullable
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    return check, f"a whole number from {low:,} to {high:,}" + (", or null for none" if nullable else "")


def _positive(high: float, *, nullable: bool = False) -> tuple[_Check, str]:
    def check(value: Any) -> bool:
        if value is None:
            return nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return math.isfinite(value) and 0 < value <= high

    return check, f"a number above 0, at most {high:g}" + (", or null for none" if nullable else "")


def _choice(*names: str) -> tuple[_Check, str]:
    return (lambda value: value in names), "one of " + ", ".join(names)


def _option(rule: tuple[_Check, str], **flags: Any) -> Option:
    return Option(rule[0], rule[1], **flags)


OPTIONS: dict[str, Option] = {
    "model": _option(_text(256), per_item=True),
    "sub_model": _option(_text(256), per_item=True, argument="recursive_model"),
    "max_iterations": _option(_whole(1, 10_000), per_item=True),
    "max_depth": _option(_whole(0, 16), per_item=True),
    "max_cost": _option(_positive(1e9, nullable=True), per_item=True),
    "max_tokens": _option(_whole(1, 10**12, nullable=True), per_item=True),
    "max_sub_calls": _option(_whole(1, 10**9, nullable=True), per_item=True),
    "max_time": _option(_positive(1e7, nullable=True), per_item=True),
    "max_reply_tokens": _option(_whole(1, 10**7, nullable=True), per_item=True),
    "system_prompt": _option(_text(1_000_000), per_item=True),
    "sandbox": _option(_choice(AUTO, *sorted(SANDBOXES))),
    "exec_timeout": _option(_positive(1e6)),
    "memory_limit": _option(_whole(1, 2**50, nullable=True)),
    "cpu_time_limit": _option(_positive(1e7, nullable=True)),
    "api_url": _option(_text(2048), recorded=False),
    "max_retries": _option(_whole(0, 20), recorded=False),
    "request_timeout": _option(_positive(1e5), recorded=False),
}
PER_ITEM = tuple(name for name, option in OPTIONS.items() if option.per_item)


def check_options(values: Mapping[str, Any], *, where: str, per_item: bool = False) -> dict[str, Any]:
    """`values` checked against `OPTIONS` (only per-item ones with `per_item`); a copy.

    Raises ConfigError naming `where` (such as "line 7") and the option.
    """
    allowed = PER_ITEM if per_item else tuple(OPTIONS)
    checked = {}
    for name, value in values.items():
        option = OPTIONS.get(name)
        if option is None or name not in allowed:
            raise ConfigError(f"{where}: unknown option {name!r}; the options are: {', '.join(allowed)}")
        if not option.check(value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ConfigError(f"{where}: {name} must be {option.expected}, got {shown}")
        checked[name] = value
    return checked


def recorded(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that shape the answers, as stored with the results: every one, its default
    (`RLM_REPL`'s) filled in when not given, so that naming a default changes nothing."""
    import inspect

    from rlm.rlm_repl import RLM_REPL

    defaults = inspect.signature(RLM_REPL.__init__).parameters
    return {
        name: options[name] if name in options else defaults[option.argument or name].default
        for name, option in sorted(OPTIONS.items()) if option.recorded
    }


def rlm_arguments(batch: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
    """The `RLM_REPL` arguments of one item: the batch's options, then the item's own over them."""
    merged = {**batch, **item}
    return {OPTIONS[name].argument or name: value for name, value in merged.items()}
