"""Earlier runs as the MCP tools `rlm_runs` and `rlm_trajectory` return them: short and bounded.

Both read the server's log directory (the one `rlm runs` and `rlm view` read) with
`rlm.trajectory`. A run id from a request must have the form of one (UTC time and 8 hex
digits: `20250101T120000Z-1a2b3c4d`), so it can only name a file in that directory. Texts are
cut in the middle to `TEXT_CAP` characters and at most `TURN_CAP` turns are outlined (the
first and last halves), so one answer stays small whatever the run did; the JSONL file and
`rlm view FILE` have everything.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from rlm._text import truncate_middle
from rlm.errors import ConfigError
from rlm.trajectory import Cell, RunNode, Turn, TrajectoryError, find_runs, load, summarize

__all__ = ["recent_runs", "outline", "RUN_ID", "TEXT_CAP", "TURN_CAP"]

RUN_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
TEXT_CAP = 2_000
TURN_CAP = 40


def recent_runs(log_dir: Path, limit: int) -> list[dict[str, Any]]:
    """The `limit` newest runs in `log_dir`: when, status, turns, sub-calls, cost, question, answer."""
    rows = []
    for path in find_runs(log_dir)[:limit]:
        try:
            summary = summarize(path)
        except TrajectoryError as exc:
            rows.append({"run_id": path.stem, "status": "unreadable", "error": str(exc)})
            continue
        rows.append({
            "run_id": summary.run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(summary.started)),
            "status": summary.status, "turns": summary.turns, "sub_calls": summary.sub_calls, "cost": summary.cost,
            "query": _cut(summary.query, 300), "answer": _cut(summary.answer, 500), "file": str(summary.path),
        })
    return rows


def outline(log_dir: Path, run_id: Any) -> dict[str, Any]:
    """One run, turn by turn: the model's replies, each cell's code and output, sub-calls and
    child runs counted, the answer and the totals."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"run_id {str(run_id)[:60]!r} is not a run id (like 20250101T120000Z-1a2b3c4d); see rlm_runs")
    path = log_dir / f"{run_id}.jsonl"
    if not path.is_file():
        raise ConfigError(f"no run {run_id} in {log_dir}; rlm_runs lists the runs kept there")
    trajectory = load(path)
    root = trajectory.root
    turns = root.turns if len(root.turns) <= TURN_CAP else [
        *root.turns[: TURN_CAP // 2], *root.turns[-TURN_CAP // 2:]]
    return {
        "run_id": root.run_id, "file": str(path), "query": _cut(root.query), "status": root.status,
        "answer": _cut(root.answer), "totals": trajectory.totals(),
        "turns": [_turn(turn) for turn in turns], "turns_omitted": len(root.turns) - len(turns),
        "errors": [_cut(str(event.get("message"))) for event in root.errors],
        "see_also": f"rlm view {path} (the whole run as one HTML page)",
    }


def _turn(turn: Turn) -> dict[str, Any]:
    call = turn.call or {}
    return {
        "turn": turn.number, "reply": _cut(call.get("reply")), "cells": [_cell(cell) for cell in turn.cells],
        "sub_calls": len(turn.sub_calls), "child_runs": _children(turn.children),
        "final": _cut((turn.final or {}).get("answer")),
    }


def _cell(cell: Cell) -> dict[str, Any]:
    event = cell.exec or {}
    return {
        "index": cell.index, "code": _cut(event.get("code")), "stdout": _cut(event.get("stdout")),
        "stderr": _cut(event.get("stderr")), "error": _cut(event.get("error")),
        "sub_calls": len(cell.sub_calls), "child_runs": _children(cell.children),
    }


def _children(children: list[RunNode]) -> list[dict[str, Any]]:
    return [{"run_id": child.run_id, "query": _cut(child.query, 300), "answer": _cut(child.answer, 500)}
            for child in children]


def _cut(text: Any, limit: int = TEXT_CAP) -> str | None:
    return None if text is None else truncate_middle(str(text), limit)
