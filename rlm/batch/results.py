"""The answers file of a batch: one JSON line per finished item, appended whole and made durable.

    answers.jsonl         {"id", "answer", "status", "usage", "wall_time", "trajectory", "error"} a line
    answers.batch.json    what the answers were made from: the input's fingerprint and the
                          options that shape answers (written once, before the first answer)

Guarantees, which the resume relies on:
- one process at a time: the file is locked (`flock`) while a batch writes to it;
- each line goes in one `write` of the whole line, then `fsync`: a line on disk is complete
  unless the process died inside that write, and then it is the last line;
- such a torn last line (no newline, or not JSON) is cut off when the file is opened again,
  before anything is appended; any other line that is not a result stops the batch;
- answers made from another input or with other options are never mixed in: the manifest is
  compared first, and a mismatch is refused with what differs.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container

from rlm import __version__
from rlm.errors import ConfigError
from rlm.result import STATUSES

__all__ = ["FIELDS", "ResultsFile", "Existing", "sibling"]

FIELDS = ("id", "answer", "status", "usage", "wall_time", "trajectory", "error")
_MANIFEST_VERSION = 1


def sibling(out: Path, suffix: str) -> Path:
    """A file beside `out` named after it: answers.jsonl -> answers<suffix>."""
    named = out.with_suffix(suffix) if out.suffix else out.with_name(out.name + suffix)
    return named if named != out else out.with_name(out.name + suffix)


@dataclass
class Existing:
    """What the answers file holds: the latest status of each id, and what every line cost."""

    latest: dict[str, str] = field(default_factory=dict)  # key -> status of its last line
    errors: dict[str, str] = field(default_factory=dict)  # key -> error of its last line, when it failed
    finished: set[str] = field(default_factory=set)  # keys with a line whose status is not "error"
    lines: int = 0
    cost: float = 0.0  # USD over every line, failed attempts included (known prices)
    cost_complete: bool = True
    repaired_bytes: int = 0  # a torn last line, cut off

    def add(self, key: str, record: dict[str, Any]) -> None:
        """Count one result line."""
        status = record["status"]
        self.latest[key] = status
        if status == "error":
            self.errors[key] = str(record.get("error"))
        else:
            self.finished.add(key)
            self.errors.pop(key, None)
        usage = record.get("usage") if isinstance(record.get("usage"), dict) else {}
        cost = usage.get("total_cost", 0.0)
        self.cost += cost if isinstance(cost, (int, float)) and not isinstance(cost, bool) else 0.0
        self.cost_complete = self.cost_complete and usage.get("cost_complete", True) is not False
        self.lines += 1


class ResultsFile:
    """The answers file, locked and open for appending; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest_path = sibling(path, ".batch.json")
        self._fd: int | None = None

    def __enter__(self) -> "ResultsFile":
        if self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a folder; give the answers file's path, such as answers.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another batch is writing to {self.path}; wait for it to end, or give another --out"
            ) from None
        self._fd = fd
        if created:
            _sync_folder(self.path.parent)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def read(self, known: Container[str]) -> Existing:
        """Read the lines already there (cutting a torn last one); `known` holds the input's keys."""
        existing = Existing()
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            offset = 0
            for number, raw in enumerate(handle, start=1):
                record = _record(raw) if raw.endswith(b"\n") else None
                if record is None:
                    if offset + len(raw) == size:  # the last line: torn by a process that died writing it
                        existing.repaired_bytes = len(raw)
                        os.ftruncate(self._fd, offset)
                        os.fsync(self._fd)
                        break
                    raise ConfigError(
                        f"line {number} of {self.path} is not a result of rlm batch; give another --out, "
                        "or remove that line"
                    )
                key = str(record["id"])
                if key not in known:
                    raise ConfigError(
                        f"line {number} of {self.path} answers id {key!r}, which the input does not have; give another "
                        "--out, or remove that line"
                    )
                existing.add(key, record)
                offset += len(raw)
        return existing

    def check_manifest(self, manifest: dict[str, Any], has_results: bool) -> None:
        """Refuse answers made from another input or with other options; write the manifest if new."""
        previous = self._manifest() if self.manifest_path.exists() else None
        if previous is None and has_results:
            raise ConfigError(
                f"{self.path} holds answers but {self.manifest_path} is missing, so what they were made from is "
                "unknown; give another --out, or delete the answers file to start over"
            )
        if previous is not None and has_results:
            differences = _differences(previous, manifest)
            if differences:
                raise ConfigError(
                    f"{self.path} holds answers made {'; and '.join(differences)}; give another --out, or delete "
                    f"{self.path} and {self.manifest_path} to start over"
                )
            return
        _write_atomically(self.manifest_path, json.dumps(
            {"v": _MANIFEST_VERSION, "rlm": __version__, "created": time.time(), **manifest}, indent=2,
        ) + "\n")

    def append(self, record: dict[str, Any]) -> None:
        """Append one result as a whole line and make it durable before returning."""
        text = json.dumps({name: record.get(name) for name in FIELDS}, ensure_ascii=False) + "\n"
        data = text.encode("utf-8", "backslashreplace")  # a lone surrogate becomes its JSON escape, \udXXX
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def _manifest(self) -> dict[str, Any]:
        try:
            value = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.manifest_path} cannot be read ({exc}); delete it and the answers to start over") from None
        if not isinstance(value, dict) or value.get("v") != _MANIFEST_VERSION:
            raise ConfigError(f"{self.manifest_path} was written by another version of rlm; give another --out")
        return value


def _record(raw: bytes) -> dict[str, Any] | None:
    """A result line, or None when the line is not one."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("status") not in STATUSES:
        return None
    if isinstance(value.get("id"), bool) or not isinstance(value.get("id"), (str, int)):
        return None
    return value


def _differences(previous: dict[str, Any], now: dict[str, Any]) -> list[str]:
    found = []
    before, after = previous.get("input", {}), now["input"]
    if before.get("fingerprint") != after["fingerprint"]:
        found.append(
            f"from another input ({before.get('source')}, {before.get('items')} items; now {after['source']}, "
            f"{after['items']} items)"
        )
    old, new = previous.get("options", {}), now["options"]
    changed = [
        f"{name} {old.get(name, 'default')!r} (now {new.get(name, 'default')!r})"
        for name in sorted({*old, *new}) if old.get(name) != new.get(name)
    ]
    if changed:
        found.append("with other options: " + ", ".join(changed))
    return found


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a new or renamed file's name durable too."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
