"""Writing a trajectory to disk: one JSON object a line, secrets removed, repeated big texts once.

Two rules apply to every event before it is written (see docs/trajectory.md):

- **Redaction.** The values of API-key environment variables (`RLM_API_KEY`, `OPENAI_API_KEY`,
  every `*_API_KEY`) and keys given to the clients are replaced by `[redacted]` wherever they
  appear, and so is anything shaped like a key (`sk-...`, `Bearer ...`, an `Authorization:`
  or `x-api-key:` header value).
- **Stored once.** A long text that an earlier event of the same type already holds in the
  same field (a child run's system prompt; a sub-call prompt or reply sent again, as on a
  cache hit) is written as `null` plus `<field>_ref`: the 1-based line number of that event.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

__all__ = ["REDACTED", "Redactor", "JsonlSink", "STORED_ONCE", "key_values_from_env"]

REDACTED = "[redacted]"
# Fields whose long texts are written once per file, by event type.
STORED_ONCE: dict[str, tuple[str, ...]] = {"run_start": ("system_prompt",), "sub_call": ("prompt", "reply")}
_MIN_SHARED = 256  # shorter texts cost less to repeat than to look up
_MIN_SECRET = 8  # shorter values would redact ordinary words
_PLACEHOLDER_KEYS = {"not-needed", "EMPTY", "none", "dummy"}

_SHAPED_LIKE_A_KEY = re.compile(
    r"\b(?:sk-[A-Za-z0-9_\-]{20,}|gsk_[A-Za-z0-9]{20,}|AIza[0-9A-Za-z_\-]{30,}|xai-[A-Za-z0-9]{20,})"
    r"|(?i:\bbearer\s+)[A-Za-z0-9._~+/=\-]{12,}"
)
_KEY_WORDS = ("sk-", "gsk_", "aiza", "xai-", "bearer")
_HEADER_WORDS = ("authorization", "api-key")
_HEADER = re.compile(
    r"(?i)(\b(?:authorization|x-api-key|api-key)[\"']?\s*[:=]\s*[\"']?)"  # the header name and separator: kept
    r"(?:(?:bearer|basic)\s+)?[^\s\"',;}]+"  # its value: redacted
)


def key_values_from_env() -> list[str]:
    """Values of the environment variables that hold API keys (read now, never cached)."""
    names = {"RLM_API_KEY", "OPENAI_API_KEY"}
    return [value for name, value in os.environ.items() if name in names or name.endswith("_API_KEY")]


class Redactor:
    """Replaces secrets in every string of an event (keys and values, nested)."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        values = {value for value in (*secrets, *key_values_from_env()) if _is_secret(value)}
        self._values = sorted(values, key=len, reverse=True)  # longest first: no partial leftovers

    def text(self, text: str) -> str:
        """`text` with every known key value and key-shaped string replaced."""
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        lowered = text.lower()  # the patterns run only where a cheap check finds their start
        if any(word in lowered for word in _HEADER_WORDS):
            text = _HEADER.sub(lambda match: match.group(1) + REDACTED, text)
        if any(word in lowered for word in _KEY_WORDS):
            text = _SHAPED_LIKE_A_KEY.sub(REDACTED, text)
        return text

    def value(self, value: Any) -> Any:
        """A copy of a JSON value with every string redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(key)): self.value(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(item) for item in value]
        return value


def _is_secret(value: str | None) -> bool:
    return bool(value) and len(value) >= _MIN_SECRET and value not in _PLACEHOLDER_KEYS


class JsonlSink:
    """Appends events to one JSONL file, redacted, with repeated long texts stored once.

    Not thread-safe by itself: the tracer calls `write` under its lock.
    """

    def __init__(self, path: Path, redactor: Redactor) -> None:
        self.path = path
        self._redactor = redactor
        self._lines = 0
        self._seen: dict[tuple[str, str, bytes], int] = {}

    def write(self, record: dict[str, Any]) -> None:
        """Append one event (a dict from `Event.to_dict()`)."""
        record = self._redactor.value(record)
        self._lines += 1
        self._store_once(record)
        with open(self.path, "a", encoding="utf-8", errors="replace") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _store_once(self, record: dict[str, Any]) -> None:
        for name in STORED_ONCE.get(str(record.get("type")), ()):
            text = record.get(name)
            if not isinstance(text, str) or len(text) < _MIN_SHARED:
                continue
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            first = self._seen.setdefault((record["type"], name, digest), self._lines)
            if first != self._lines:
                record[name] = None
                record[f"{name}_ref"] = first
