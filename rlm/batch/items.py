"""The input of a batch: one question a line, every line checked before the first item runs.

A line is a JSON object with an `id` (a string or a whole number, unique in the file), a
`query`, and the context either inline or by path:

    {"id": "q1", "query": "...", "context": "..."}               text, a list of texts, or any JSON object / array
    {"id": "q2", "query": "...", "context_path": "docs/a.txt"}    a UTF-8 file, read where the item runs

plus, if wanted, options for that item alone (`rlm.batch.options.PER_ITEM`: model,
sub_model, max_iterations, max_depth, the budgets, max_reply_tokens, system_prompt) and `meta`
(any JSON value of your own, not used). A relative `context_path` is taken from the input
file's folder. Blank lines are skipped. The caps are in `LIMITS`.

A file's items are not held in memory: it is read once to check every line and to note where
each item is and a digest of it; an item's line is read again when the item runs, and a line
whose digest changed meanwhile stops the batch (the input was edited under it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from rlm._text import is_utf8
from rlm.batch.options import PER_ITEM, check_options
from rlm.errors import ConfigError

__all__ = ["LIMITS", "BatchItem", "BatchInput", "item_key", "read_input"]

# The caps of the input, stated once.
LIMITS = {
    "line_bytes": 64 * 2**20,  # one line, inline context included: larger contexts go by context_path
    "items": 1_000_000,  # items in one batch
    "id_chars": 256,
    "query_chars": 1_000_000,
    "path_chars": 4096,
}
_FIELDS = ("id", "query", "context", "context_path", "meta")
_SHAPE = 'each line is a JSON object such as {"id": "q1", "query": "...", "context": "..."}'


@dataclass(frozen=True)
class BatchItem:
    """One checked item. `context_path` is absolute; `options` are the item's own."""

    id: str | int
    query: str
    context: Any = None
    context_path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return item_key(self.id)


def item_key(item_id: str | int) -> str:
    """What makes two ids the same: 7 and "7" are one id (they look alike in every report)."""
    return str(item_id)


@dataclass(frozen=True)
class _Entry:
    key: str
    line: int  # 1-based line of the file, or position in a list
    digest: str
    offset: int = -1  # where the line starts in the file (-1: the item is held in memory)
    length: int = 0
    item: BatchItem | None = None


class BatchInput:
    """The checked items of a batch, in input order, and the fingerprint of the whole input.

    `fingerprint` is the same for the same set of items whatever their order or the file's
    whitespace: a digest of each item's canonical JSON, sorted by id.
    """

    def __init__(self, source: str, entries: list[_Entry], path: Path | None, base: Path) -> None:
        self.source = source
        self.path = path
        self._base = base
        self._entries = entries
        self._by_key = {entry.key: entry for entry in entries}
        pairs = sorted((entry.key, entry.digest) for entry in entries)
        self.fingerprint = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def keys(self) -> list[str]:
        return [entry.key for entry in self._entries]

    def load(self, key: str) -> BatchItem:
        """The item with this key (read again from the file, which must not have changed)."""
        entry = self._by_key[key]
        if entry.item is not None:
            return entry.item
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            raw = handle.read(entry.length)
        where = f"{self.source}, line {entry.line}"
        changed = ConfigError(f"{where} changed while the batch ran; run it again when the input file stays as it is")
        try:
            item, digest = _parse_line(raw, where, self._base, first=entry.offset == 0)
        except ConfigError:
            raise changed from None
        if digest != entry.digest or item.key != key:
            raise changed
        return item


def read_input(items: str | os.PathLike | Iterable[Mapping[str, Any]]) -> BatchInput:
    """Check a batch's input: a JSONL file's path, or the items themselves (dicts in the same
    form as the lines). Raises ConfigError naming the line (or position) of the first problem."""
    if isinstance(items, (str, os.PathLike)):
        return _read_file(Path(items))
    if isinstance(items, Mapping) or not isinstance(items, Iterable):
        raise ConfigError("items must be a JSONL file's path or a list of dicts, " + _SHAPE)
    entries: list[_Entry] = []
    base = Path.cwd()
    for position, value in enumerate(items):
        where = f"item {position}"
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} is a {type(value).__name__}; {_SHAPE}")
        fields = {key: str(found) if key == "context_path" and isinstance(found, os.PathLike) else found
                  for key, found in value.items()}
        item = _check_item(fields, where, base)
        _add(entries, _Entry(item.key, position, _digest(fields, where), item=item), where)
    return _finish(entries, "the items given", None, base)


def _read_file(path: Path) -> BatchInput:
    if str(path) == "-":
        raise ConfigError("a batch reads its questions from a file (a rerun reads it again); save them to one first")
    if not path.is_file():
        raise ConfigError(f"the questions file {str(path)!r} does not exist or is not a file")
    base = path.resolve().parent
    entries: list[_Entry] = []
    limit = LIMITS["line_bytes"]
    with open(path, "rb") as handle:
        offset, number = 0, 0
        while raw := handle.readline(limit + 1):
            number += 1
            where = f"{path}, line {number}"
            if len(raw) > limit:
                raise ConfigError(f"{where} is longer than {limit // 2**20} MiB; give large contexts by context_path")
            if raw.strip():
                item, digest = _parse_line(raw, where, base, first=number == 1)
                _add(entries, _Entry(item.key, number, digest, offset, len(raw)), where)
            offset += len(raw)
    return _finish(entries, str(path), path, base)


def _add(entries: list[_Entry], entry: _Entry, where: str) -> None:
    if len(entries) >= LIMITS["items"]:
        raise ConfigError(f"{where}: a batch holds at most {LIMITS['items']:,} items; split the input")
    entries.append(entry)


def _finish(entries: list[_Entry], source: str, path: Path | None, base: Path) -> BatchInput:
    if not entries:
        raise ConfigError(f"{source} holds no items; {_SHAPE}")
    seen: dict[str, int] = {}
    for entry in entries:
        if entry.key in seen:
            place = "line" if path is not None else "item"
            raise ConfigError(
                f"{source}: the id {entry.key!r} of {place} {entry.line} is already the id of {place} "
                f"{seen[entry.key]}; every id must be unique"
            )
        seen[entry.key] = entry.line
    return BatchInput(source, entries, path, base)


def _parse_line(raw: bytes, where: str, base: Path, *, first: bool = False) -> tuple[BatchItem, str]:
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a byte order mark some editors write
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}); convert the file first") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where} is not JSON ({exc}); {_SHAPE}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is a JSON {type(value).__name__}, not an object; {_SHAPE}")
    return _check_item(value, where, base), _digest(value, where)


def _digest(value: Mapping[str, Any], where: str) -> str:
    try:
        canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} holds a value that is not JSON ({exc})") from None
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _check_item(value: Mapping[str, Any], where: str, base: Path) -> BatchItem:
    unknown = [key for key in value if key not in _FIELDS and key not in PER_ITEM]
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(_FIELDS)} and the options "
            f"{', '.join(PER_ITEM)} (put data of your own under \"meta\")"
        )
    item_id = value.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id).strip():
        raise ConfigError(f"{where}: id must be a non-empty string or a whole number, got {item_id!r}")
    if len(str(item_id)) > LIMITS["id_chars"] or not is_utf8(str(item_id)):
        raise ConfigError(f"{where}: id must be text of at most {LIMITS['id_chars']} characters")
    query = value.get("query")
    if not isinstance(query, str) or not query.strip() or len(query) > LIMITS["query_chars"] or not is_utf8(query):
        raise ConfigError(f"{where}: query must be a non-empty string of at most {LIMITS['query_chars']:,} characters")
    options = check_options({key: value[key] for key in PER_ITEM if key in value}, where=where, per_item=True)
    context, path = _check_context(value, where, base)
    return BatchItem(id=item_id, query=query, context=context, context_path=path, options=options)


def _check_context(value: Mapping[str, Any], where: str, base: Path) -> tuple[Any, str | None]:
    if ("context" in value) == ("context_path" in value):
        raise ConfigError(f"{where}: give the context either inline as \"context\" or as a file by \"context_path\"")
    if "context" in value:
        context = value["context"]
        if not isinstance(context, (str, list, dict)):
            raise ConfigError(f"{where}: context must be a string, a list or an object, got {type(context).__name__}")
        if isinstance(context, str) and not is_utf8(context):
            raise ConfigError(f"{where}: context holds a lone surrogate escape (\\ud800-\\udfff), which is not text")
        return context, None
    path = value["context_path"]
    if not isinstance(path, str) or not path.strip() or len(path) > LIMITS["path_chars"] or "\0" in path:
        raise ConfigError(f"{where}: context_path must be a file path of at most {LIMITS['path_chars']} characters")
    if not is_utf8(path):
        raise ConfigError(f"{where}: context_path holds a lone surrogate escape, which is not a path")
    return None, str(base / Path(path).expanduser())

