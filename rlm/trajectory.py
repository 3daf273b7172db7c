"""Reading trajectory files: a run's JSONL events as a tree, and where runs are kept.

    from rlm.trajectory import load
    run = load("runs/20250101T120000Z-1a2b3c4d.jsonl")
    for turn in run.root.turns:
        for cell in turn.cells:
            print(turn.number, cell.index, len(cell.sub_calls), [child.run_id for child in cell.children])

The tree: a `RunNode` has `Turn`s (one root-model call each); a turn has `Cell`s (the code
blocks it ran); a cell has the sub-calls its code made and the child runs it started
(`rlm_query`), each a `RunNode` again. Events stay plain dicts with the fields documented in
docs/trajectory.md. A file written by a newer major version of the format is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlm.errors import ConfigError
from rlm.utils.trace_sink import STORED_ONCE
from rlm.utils.tracing import SCHEMA_VERSION, Event

__all__ = [
    "SUPPORTED_VERSION", "TrajectoryError", "Trajectory", "RunNode", "Turn", "Cell", "RunSummary",
    "load", "read_events", "from_events", "summarize", "default_log_dir", "cli_log_dir", "find_runs",
]

SUPPORTED_VERSION = SCHEMA_VERSION  # the newest major version this reader understands
KNOWN_TYPES = {"run_start", "llm_call", "sub_call", "tool_call", "compaction", "exec", "final", "error", "run_end"}


class TrajectoryError(ConfigError):
    """A trajectory file that cannot be read: missing, damaged, or written by a newer rlm."""


@dataclass
class Cell:
    """One code block a turn ran: its exec event (None if the run stopped while it ran), the
    sub-calls its code made and the child runs it started."""

    index: int
    turn: int
    exec: dict | None = None
    sub_calls: list[dict] = field(default_factory=list)
    children: list["RunNode"] = field(default_factory=list)


@dataclass
class Turn:
    """One root-model call of a run and what followed it. Sub-calls and child runs whose cell
    is not recorded (files from before cells were traced) are kept on the turn itself."""

    number: int
    call: dict | None = None
    cells: list[Cell] = field(default_factory=list)
    sub_calls: list[dict] = field(default_factory=list)
    children: list["RunNode"] = field(default_factory=list)
    final: dict | None = None
    errors: list[dict] = field(default_factory=list)


@dataclass
class RunNode:
    """One RLM loop: the top-level run, or a child run started by `rlm_query`."""

    run_id: str
    parent_id: str | None = None
    depth: int = 0
    start: dict | None = None
    end: dict | None = None
    final: dict | None = None
    turns: list[Turn] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    children: list["RunNode"] = field(default_factory=list)  # placed nowhere more precise

    @property
    def status(self) -> str:
        """run_end's status; for a run without one: "answered" or "unfinished"."""
        if self.end is not None:
            return str(self.end.get("status"))
        return "answered" if self.final is not None else "unfinished"

    @property
    def answer(self) -> str | None:
        if self.end is not None and self.end.get("answer") is not None:
            return self.end["answer"]
        return self.final.get("answer") if self.final is not None else None

    @property
    def query(self) -> str:
        return str(self.start.get("query", "")) if self.start else ""

    def turn(self, number: int) -> Turn:
        """The turn with this number, made if new (turns stay in order)."""
        for existing in self.turns:
            if existing.number == number:
                return existing
        made = Turn(number)
        self.turns.append(made)
        self.turns.sort(key=lambda item: item.number)
        return made

    def cell(self, turn: int, index: int) -> Cell:
        """The cell with this index (cells are numbered across the whole run), made if new."""
        for existing in self.turns:
            for cell in existing.cells:
                if cell.index == index:
                    return cell
        made = Cell(index, turn)
        cells = self.turn(turn).cells
        cells.append(made)
        cells.sort(key=lambda item: item.index)
        return made


@dataclass
class Trajectory:
    """A whole file: every event (long texts restored), the runs by id, and the top run."""

    path: Path | None
    events: list[dict]
    runs: dict[str, RunNode]
    root: RunNode
    truncated: bool = False  # the last line was cut short (the process died while writing)
    unknown: list[dict] = field(default_factory=list)  # events of types this reader does not know

    def walk(self) -> Iterator[RunNode]:
        """Every run, depth first from the top one."""
        stack = [self.root]
        while stack:
            run = stack.pop()
            yield run
            nested = [*run.children]
            for turn in run.turns:
                nested.extend(turn.children)
                for cell in turn.cells:
                    nested.extend(cell.children)
            stack.extend(reversed(nested))

    def totals(self) -> dict[str, Any]:
        """Calls, tokens, cost and time of the whole tree, from its events."""
        return _totals(self.events)


def load(path: str | os.PathLike) -> Trajectory:
    """Read a trajectory file into a tree. Raises TrajectoryError with what to do."""
    events, truncated = read_events(path)
    trajectory = from_events(events)
    trajectory.path = Path(path)
    trajectory.truncated = truncated
    return trajectory


def read_events(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """The file's events with stored-once texts restored, and whether its last line was cut."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TrajectoryError(f"cannot read trajectory {str(path)!r} ({exc.strerror}); check the path") from None
    lines = raw.decode("utf-8", errors="replace").split("\n")
    complete = raw.endswith(b"\n")
    if lines and lines[-1] == "":
        lines.pop()
    events: list[dict] = []
    truncated = False
    for number, line in enumerate(lines, start=1):
        try:
            event = json.loads(line)
        except ValueError as exc:
            if number == len(lines) and not complete and events:
                truncated = True  # a run killed while writing its last event
                break
            if not events:
                raise TrajectoryError(_NOT_A_TRAJECTORY.format(path=path)) from None
            raise TrajectoryError(f"{path}, line {number}: not JSON ({exc}); the file is damaged") from None
        _check_event(event, path, number)
        events.append(event)
    if not events:
        raise TrajectoryError(f"{path} holds no events: " + _NOT_A_TRAJECTORY.format(path="it"))
    _restore_texts(events, path)
    return events, truncated


_NOT_A_TRAJECTORY = (
    "{path} is not an rlm trajectory (a run's <run_id>.jsonl file, one JSON event a line); "
    "rlm runs lists the runs kept, and rlm view without a file opens the latest"
)


def _check_event(event: Any, path: Path, number: int) -> None:
    if not isinstance(event, dict) or not isinstance(event.get("v"), int) or "run_id" not in event:
        if number == 1:
            raise TrajectoryError(_NOT_A_TRAJECTORY.format(path=path))
        raise TrajectoryError(f"{path}, line {number}: not an rlm trajectory event (no 'v' or 'run_id')")
    if event["v"] > SUPPORTED_VERSION:
        raise TrajectoryError(
            f"{path} uses trajectory format version {event['v']}, newer than this rlm reads "
            f"(version {SUPPORTED_VERSION}); upgrade rlm (pip install -U rlm) to read it"
        )


def _restore_texts(events: list[dict], path: Path) -> None:
    """Put back the texts written once: `<field>: null` with `<field>_ref: <line>`."""
    for number, event in enumerate(events, start=1):
        for name in STORED_ONCE.get(str(event.get("type")), ()):
            ref = event.get(f"{name}_ref")
            if event.get(name) is not None or ref is None:
                continue
            if not isinstance(ref, int) or not 1 <= ref < number or events[ref - 1].get(name) is None:
                raise TrajectoryError(f"{path}, line {number}: {name}_ref {ref!r} points at no earlier text")
            event[name] = events[ref - 1][name]


def from_events(events: Iterable[dict | Event]) -> Trajectory:
    """Build the tree from events (dicts as read from a file, or `rlm.trace` events)."""
    dicts = [event.to_dict() if isinstance(event, Event) else event for event in events]
    runs: dict[str, RunNode] = {}
    unknown: list[dict] = []
    for event in dicts:
        kind = event.get("type")
        if kind not in KNOWN_TYPES:
            unknown.append(event)
            continue
        run = runs.get(event["run_id"])
        if run is None:
            run = runs[event["run_id"]] = RunNode(event["run_id"], event.get("parent_id"), int(event.get("depth", 0)))
        _place(run, event, runs)
    if not runs:
        raise TrajectoryError("no run events found (run_start, llm_call...): this is not an rlm trajectory")
    top = [run for run in runs.values() if run.parent_id is None or run.parent_id not in runs]
    return Trajectory(path=None, events=dicts, runs=runs, root=top[0], unknown=unknown)


def _place(run: RunNode, event: dict, runs: dict[str, RunNode]) -> None:
    kind = event["type"]
    if kind == "run_start":
        run.start, run.parent_id, run.depth = event, event.get("parent_id"), int(event.get("depth", 0))
        parent = runs.get(run.parent_id) if run.parent_id else None
        if parent is not None:
            _attach_child(parent, run, event)
    elif kind == "llm_call":
        run.turn(int(event["turn"])).call = event
    elif kind == "exec":
        run.cell(int(event["turn"]), int(event["index"])).exec = event
    elif kind in ("sub_call", "tool_call"):  # a host tool's call is shown among its cell's sub-calls
        if event.get("cell"):
            run.cell(int(event["turn"]), int(event["cell"])).sub_calls.append(event)
        else:
            run.turn(int(event["turn"])).sub_calls.append(event)
    elif kind == "compaction":  # the summary of old turns, shown with the turn whose request it shortened
        run.turn(int(event["turn"])).sub_calls.append(event)
    elif kind == "final":
        run.final = event
        run.turn(int(event["turn"])).final = event
    elif kind == "error":
        run.errors.append(event)
        if event.get("turn"):
            run.turn(int(event["turn"])).errors.append(event)
    elif kind == "run_end":
        run.end = event


def _attach_child(parent: RunNode, child: RunNode, start: dict) -> None:
    turn, cell = start.get("parent_turn"), start.get("parent_cell")
    if turn and cell:
        parent.cell(int(turn), int(cell)).children.append(child)
    elif turn:
        parent.turn(int(turn)).children.append(child)
    else:
        parent.children.append(child)


def _totals(events: list[dict]) -> dict[str, Any]:
    totals = {"model_calls": 0, "sub_calls": 0, "cache_hits": 0, "failed_calls": 0, "cells": 0,
              "input_tokens": 0, "output_tokens": 0, "cost": 0.0, "unpriced_calls": 0, "runs": 0,
              "model_seconds": 0.0, "cell_seconds": 0.0, "sub_call_seconds": 0.0}
    for event in events:
        kind = event.get("type")
        if kind == "run_start":
            totals["runs"] += 1
        elif kind == "exec":
            totals["cells"] += 1
            totals["cell_seconds"] += float(event.get("duration") or 0)
        elif kind in ("llm_call", "sub_call", "compaction"):  # a compaction is a call of the root model
            _add_call(totals, event)
    duration = [e.get("duration") for e in events if e.get("type") == "run_end" and not e.get("parent_id")]
    stamps = [float(e["ts"]) for e in events if isinstance(e.get("ts"), (int, float))]
    totals["duration"] = float(duration[-1]) if duration else (max(stamps) - min(stamps) if stamps else 0.0)
    return totals


def _add_call(totals: dict[str, Any], event: dict) -> None:
    sub = event["type"] == "sub_call"
    if sub and event.get("cache_hit"):
        totals["cache_hits"] += 1
        return
    totals["sub_calls" if sub else "model_calls"] += 1
    totals["sub_call_seconds" if sub else "model_seconds"] += float(event.get("latency") or 0)
    if event.get("error"):
        totals["failed_calls"] += 1
        return
    usage = event.get("usage") or {}
    totals["input_tokens"] += int(usage.get("input_tokens") or 0)
    totals["output_tokens"] += int(usage.get("output_tokens") or 0)
    if event.get("cost") is None:
        totals["unpriced_calls"] += 1
    else:
        totals["cost"] += float(event["cost"])


# -- the runs kept on disk ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """One line of `rlm runs`: read from a file's first and last lines only."""

    path: Path
    run_id: str
    started: float
    query: str
    answer: str | None
    status: str
    turns: int
    sub_calls: int
    cost: float | None


def summarize(path: str | os.PathLike) -> RunSummary:
    """The summary of one run file (fast: its first and last lines, or the whole file if the
    run has no run_end yet)."""
    path = Path(path)
    first, last = _first_line(path), _last_line(path)
    try:
        start, end = json.loads(first), json.loads(last)
    except ValueError:
        start = end = None
    if not _is_type(start, "run_start") or not _is_type(end, "run_end"):
        return _summary_from_tree(path)
    _check_event(start, path, 1)
    usage = end.get("usage") or {}
    return RunSummary(
        path=path, run_id=str(start.get("run_id")), started=float(start.get("ts") or 0),
        query=str(start.get("query", "")), answer=end.get("answer"), status=str(end.get("status")),
        turns=int(end.get("turns") or 0),
        sub_calls=int((usage.get("sub") or {}).get("calls") or 0),
        cost=float(usage["total_cost"]) if usage.get("total_cost") is not None else None,
    )


def _is_type(event: Any, kind: str) -> bool:
    return isinstance(event, dict) and event.get("type") == kind


def _summary_from_tree(path: Path) -> RunSummary:
    trajectory = load(path)
    root, totals = trajectory.root, trajectory.totals()
    below_root = [e for e in trajectory.events if e["type"] == "sub_call" or (e["type"] == "llm_call" and e["depth"])]
    return RunSummary(
        path=path, run_id=root.run_id, started=float((root.start or trajectory.events[0]).get("ts") or 0),
        query=root.query, answer=root.answer, status=root.status, turns=len(root.turns),
        sub_calls=len(below_root), cost=totals["cost"],
    )


def _first_line(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.readline().decode("utf-8", errors="replace")
    except OSError as exc:
        raise TrajectoryError(f"cannot read trajectory {str(path)!r} ({exc.strerror}); check the path") from None


def _last_line(path: Path, block: int = 65536) -> str:
    """The last complete line, read from the end (files may be large)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        data = b""
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            data = handle.read(end - start) + data
            end = start
            if data.rstrip(b"\n").count(b"\n") >= 1:
                break
    return data.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")


def default_log_dir() -> Path:
    """Where the CLI keeps runs when asked to and no directory is given: the per-user data
    directory (on Linux ~/.local/share/rlm/runs)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("rlm", appauthor=False)) / "runs"


def cli_log_dir(option: str | os.PathLike | None) -> Path:
    """The log directory of the CLI: the option, else `RLM_LOG_DIR`, else `default_log_dir()`."""
    value = option if option is not None else os.environ.get("RLM_LOG_DIR")
    return Path(value).expanduser() if value else default_log_dir()


def find_runs(log_dir: Path) -> list[Path]:
    """The trajectory files in `log_dir`, newest first (run ids start with their UTC time)."""
    if not log_dir.is_dir():
        return []
    files = [path for path in log_dir.glob("*.jsonl") if path.is_file()]
    return sorted(files, key=lambda path: (path.stat().st_mtime, path.name), reverse=True)
