"""Token usage per call, prices, and the run totals that `cost_summary()` reports.

Every model call returns its own `Usage`; the ledger adds records up per role. Nothing here
keeps "the last call" as state, so concurrent sub-calls are each counted exactly once.

What a server reports is not trusted: `token_count` accepts only a whole number from 0 to
`MAX_CALL_TOKENS`; the clients treat anything else as missing (estimated, and flagged). So
no reported figure can lower a total or slip a call past a budget. A price that cannot be
worked out makes the call's cost unknown (None, flagged in `cost_summary()`), never an error.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Usage", "CallRecord", "UsageLedger", "price_call", "is_local_endpoint", "token_count", "MAX_CALL_TOKENS"]

MAX_CALL_TOKENS = 10**9  # more tokens than any model reads or writes in one call: a figure past it is not believed


def token_count(value: object) -> int | None:
    """`value` as a token count of one call, or None when it cannot be one (negative, absurd, not an int)."""
    if type(value) is int and 0 <= value <= MAX_CALL_TOKENS:  # type(): True is an int, and no count
        return value
    return None


@dataclass(frozen=True)
class Usage:
    """Tokens of one call. `estimated` is True when the server reported none and we counted."""

    input_tokens: int = 0  # all prompt tokens, cached ones included
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write_tokens: int = 0  # prompt tokens written to it (providers that charge for that)
    estimated: bool = False

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            estimated=self.estimated or other.estimated,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class CallRecord:
    """One model call as counted: who made it, on which model, its usage and cost (None: unknown).

    `role` is "root" for a turn of an RLM loop (the top run's at depth 0, a child run's
    deeper) and "sub" for an `llm_query`; `cache_hit` marks a sub-call answered from the
    run's cache (no request, no cost).
    """

    role: str
    depth: int
    model: str
    usage: Usage
    cost: float | None
    cache_hit: bool = False


def is_local_endpoint(base_url: str) -> bool:
    """True for a server on a loopback or private address: its calls cost nothing."""
    host = urlsplit(base_url).hostname or ""
    if host in ("localhost", "host.docker.internal") or host.endswith(".local"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def price_call(model: str, base_url: str, usage: Usage) -> float | None:
    """Cost in USD of one call, 0.0 on a local server, None when the price is unknown."""
    if is_local_endpoint(base_url):
        return 0.0
    from genai_prices import Usage as PriceUsage, calc_price

    for hint in ({"provider_api_url": base_url}, {}):
        try:
            priced = PriceUsage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cached_tokens or None,
                cache_write_tokens=usage.cache_write_tokens or None,
            )
            price = float(calc_price(priced, model, **hint).total_price)
        except LookupError:
            continue
        except Exception:  # the price table is data we do not control: its failure makes the cost unknown, flagged
            return None
        return price if 0.0 <= price < float("inf") else None
    return None


class UsageLedger:
    """Thread-safe list of call records with the totals `cost_summary()` returns.

    It also keeps running totals after each record, so the budget check made before every
    model call costs O(1) instead of a scan of every call so far.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[CallRecord] = []
        self._running: list[tuple[float, int, int]] = []  # (cost, tokens, sub-calls) after each record

    def add(self, record: CallRecord) -> None:
        with self._lock:
            cost, tokens, sub_calls = self._running[-1] if self._running else (0.0, 0, 0)
            self._records.append(record)
            self._running.append((
                cost + (record.cost or 0.0),
                tokens + record.usage.total_tokens,
                sub_calls + (record.depth > 0 and not record.cache_hit),
            ))

    def records(self) -> list[CallRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._running.clear()

    def totals(self, since: int = 0) -> tuple[float, int, int]:
        """(known cost, tokens, sub-calls) of the records after the first `since`, for budgets."""
        with self._lock:
            end = self._running[-1] if self._running else (0.0, 0, 0)
            start = self._running[since - 1] if 0 < since <= len(self._running) else (0.0, 0, 0)
        return float(end[0] - start[0]), end[1] - start[1], end[2] - start[2]

    def summary(self, since: int = 0) -> dict:
        """Totals of the top root model and of everything below it, the total cost in USD, and
        a breakdown per (role, depth, model).

        `root` counts the top-level loop's calls (depth 0); `sub` every call below it: plain
        sub-calls and the calls of child RLM runs. `since` skips the first records (those of
        earlier runs). Cache hits are counted as calls with no tokens and no cost.
        """
        records = self.records()[since:]
        unpriced = sorted({r.model for r in records if r.cost is None})
        groups: dict[tuple[str, int, str], list[CallRecord]] = {}
        for record in records:
            groups.setdefault((record.role, record.depth, record.model), []).append(record)
        return {
            "total_cost": float(sum(r.cost for r in records if r.cost is not None)),
            "root": _totals([r for r in records if r.depth == 0]),
            "sub": _totals([r for r in records if r.depth > 0]),
            "total_calls": len(records),
            "total_input_tokens": sum(r.usage.input_tokens for r in records),
            "total_output_tokens": sum(r.usage.output_tokens for r in records),
            "cache_hits": sum(1 for r in records if r.cache_hit),
            "unpriced_models": unpriced,
            "cost_complete": not unpriced,
            "usage_estimated": any(r.usage.estimated for r in records),
            "breakdown": [
                {"role": role, "depth": depth, "model": model, **_totals(group)}
                for (role, depth, model), group in sorted(groups.items())
            ],
        }


def _totals(records: list[CallRecord]) -> dict:
    usage = sum((r.usage for r in records), Usage())
    return {
        "models": sorted({r.model for r in records}),
        "calls": len(records),
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_tokens": usage.cached_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_hits": sum(1 for r in records if r.cache_hit),
        "cost": float(sum(r.cost for r in records if r.cost is not None)),
    }
