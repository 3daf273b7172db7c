"""Scorers, as published for each benchmark. Every score is a float in [0, 1]; no answer scores 0.

- S-NIAH: 1 when the gold value is a case-insensitive substring of the reply.
- OOLONG numeric: 0.75 ** |gold - reply|, the reply read as a number (see `parse_number`).
- OOLONG other answers: exact match after normalizing case, spaces, quotes, a trailing
  period, and a leading "Answer:" / "Label:".
- OOLONG-Pairs: F1 of the set of pairs in the reply against the gold set; pairs are
  unordered (`(2, 1)` is `(1, 2)`); both empty scores 1.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

__all__ = [
    "score",
    "score_substring",
    "score_numeric",
    "score_exact",
    "score_pairs",
    "parse_number",
    "parse_pairs",
    "normalize",
]

_MARKER = re.compile(r"\b(?:final answer|answer|label)\s*:\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_PAIR = re.compile(r"[(\[]\s*(\d+)\s*,\s*(\d+)\s*[)\]]")


def score(kind: str, reply: str | None, gold: Any) -> float:
    """Score `reply` against `gold` with the scorer for `kind` (a `Task.kind`)."""
    if reply is None:
        return 0.0
    if kind == "substring":
        return score_substring(reply, str(gold))
    if kind == "numeric":
        return score_numeric(reply, gold)
    if kind == "exact":
        return score_exact(reply, str(gold))
    if kind == "pairs":
        return score_pairs(reply, gold)
    raise ValueError(f"no scorer for answer kind {kind!r}")


def score_substring(reply: str, gold: str) -> float:
    """S-NIAH: 1.0 when `gold` appears in `reply`, ignoring case."""
    return 1.0 if gold.strip().lower() in reply.lower() else 0.0


def _after_marker(reply: str) -> str:
    parts = _MARKER.split(reply)
    return parts[-1] if len(parts) > 1 else reply


def parse_number(reply: str) -> float | None:
    """The number a reply gives: the text after a last "Answer:" if any, read whole when it
    is a number (commas and a trailing period allowed), else its first number; None if none."""
    text = _after_marker(reply).strip().strip("*`'\" ").rstrip(".")
    whole = _NUMBER.fullmatch(text)
    found = whole or _NUMBER.search(text)
    if found is None:
        return None
    return float(found.group(0).replace(",", ""))


def score_numeric(reply: str, gold: Any) -> float:
    """OOLONG numeric answers: 0.75 ** |gold - reply|; 0 when the reply has no number."""
    value = parse_number(reply)
    if value is None:
        return 0.0
    return 0.75 ** abs(float(gold) - value)


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or markup, no trailing period, no "Answer:"."""
    text = _after_marker(text)
    text = " ".join(text.lower().split())
    return text.strip("*`'\" ").rstrip(".").strip("*`'\" ")


def score_exact(reply: str, gold: str) -> float:
    """OOLONG non-numeric answers: 1.0 on an exact match after `normalize`."""
    return 1.0 if normalize(reply) == normalize(gold) else 0.0


def parse_pairs(reply: str) -> set[tuple[int, int]]:
    """Every `(a, b)` or `[a, b]` in the reply, as (smaller, larger); a pair of one id twice is dropped."""
    pairs = set()
    for first, second in _PAIR.findall(reply):
        a, b = int(first), int(second)
        if a != b:
            pairs.add((min(a, b), max(a, b)))
    return pairs


def score_pairs(reply: str, gold: Iterable[Iterable[int]]) -> float:
    """OOLONG-Pairs: F1 of the reply's pairs against the gold pairs (1.0 when both are empty)."""
    expected = {(min(a, b), max(a, b)) for a, b in (tuple(pair) for pair in gold)}
    found = parse_pairs(reply)
    if not expected and not found:
        return 1.0
    hits = len(expected & found)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(found), hits / len(expected)
    return 2 * precision * recall / (precision + recall)
