"""Where the wall time of a run went: lanes of time spans, and a breakdown in seconds.

Events are written when a step ends; its start is `ts - latency` (model calls) or
`ts - duration` (cells). Lanes: the top run's model calls, its cells, every call below it
(sub-calls and child runs' model calls, merged where they overlap) and the child runs.
"""

from __future__ import annotations

from typing import Any

from rlm.trajectory import RunNode, Trajectory

__all__ = ["timeline", "merge"]

_MAX_SPANS = 1500  # per lane; closer spans are merged to stay under it
Span = tuple[float, float]


def timeline(trajectory: Trajectory) -> dict[str, Any]:
    """Lanes of spans in seconds from the run's start, and the breakdown of its wall time."""
    numbers = {run.run_id: number for number, run in enumerate(trajectory.walk())}
    root = trajectory.root
    calls = [(e["ts"] - float(e.get("latency") or 0), e["ts"], e) for e in trajectory.events
             if e["type"] == "llm_call" and e["run_id"] == root.run_id]
    cells = [(e["ts"] - float(e.get("duration") or 0), e["ts"], e) for e in trajectory.events
             if e["type"] == "exec" and e["run_id"] == root.run_id]
    below = [(e["ts"] - float(e.get("latency") or 0), e["ts"]) for e in trajectory.events if _below_root(e, root)]
    children = [_run_span(run) for run in trajectory.walk() if run is not root]
    stamps = [start for start, _, _ in calls + cells] + [start for start, _ in below]
    stamps += [float(e["ts"]) for e in trajectory.events if isinstance(e.get("ts"), (int, float))]
    t0 = min(stamps) if stamps else 0.0
    wall = max(max(stamps) - t0, 1e-9) if stamps else 1e-9
    busy = merge(sorted(below))
    lanes = [
        {"name": "root model", "spans": [_span(s, e, t0, f"turn {ev['turn']}", f"r0.t{ev['turn']}")
                                         for s, e, ev in calls]},
        {"name": "code", "spans": [_span(s, e, t0, f"turn {ev['turn']}, cell {ev['index']}",
                                         f"r0.t{ev['turn']}.c{ev['index']}") for s, e, ev in cells]},
        {"name": "sub-calls", "spans": [_span(s, e, t0, "calls below the root model", None)
                                        for s, e in _thin(busy, wall)]},
        {"name": "child runs", "spans": [_span(s, e, t0, f"child run {numbers[run.run_id]}", f"r{numbers[run.run_id]}")
                                         for s, e, run in children if e > s]},
    ]
    return {"wall": wall, "lanes": lanes, "breakdown": _breakdown(calls, cells, busy, below, wall)}


def _below_root(event: dict, root: RunNode) -> bool:
    """A real request below the top run's model: a sub-call (not a cache hit) or a child run's call."""
    if event["type"] == "sub_call":
        return not event.get("cache_hit")
    return event["type"] == "llm_call" and event["run_id"] != root.run_id


def _run_span(run: RunNode) -> tuple[float, float, RunNode]:
    stamps = [float(event["ts"]) for event in _run_events(run)]
    first = run.turns[0].call if run.turns and run.turns[0].call else None
    start = first["ts"] - float(first.get("latency") or 0) if first else min(stamps, default=0.0)
    return min([start, *stamps]), max(stamps, default=start), run


def _run_events(run: RunNode) -> list[dict]:
    events = [event for event in (run.start, run.end, run.final) if event]
    for turn in run.turns:
        events += [turn.call] if turn.call else []
        events += [cell.exec for cell in turn.cells if cell.exec]
    return events


def _span(start: float, end: float, t0: float, label: str, target: str | None) -> list[Any]:
    return [round(start - t0, 6), round(max(end, start) - t0, 6), label, target]


def merge(spans: list[Span], gap: float = 0.0) -> list[Span]:
    """Sorted spans with those closer than `gap` joined."""
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def _thin(spans: list[Span], wall: float) -> list[Span]:
    gap = 0.0
    while len(spans) > _MAX_SPANS:
        gap = gap * 2 if gap else wall / 2000
        spans = merge(spans, gap)
    return spans


def _overlap(spans: list[Span], busy: list[Span]) -> float:
    total = 0.0
    for start, end in spans:
        for busy_start, busy_end in busy:
            if busy_start >= end:
                break
            total += max(0.0, min(end, busy_end) - max(start, busy_start))
    return total


def _breakdown(calls: list, cells: list, busy: list[Span], below: list[Span], wall: float) -> list[dict[str, Any]]:
    model = sum(end - start for start, end, _ in calls)
    cell_spans = [(start, end) for start, end, _ in cells]
    waiting = _overlap(cell_spans, busy)
    code = max(0.0, sum(end - start for start, end in cell_spans) - waiting)
    other = max(0.0, wall - model - code - waiting)
    summed = sum(end - start for start, end in below)
    return [
        {"name": "root model", "seconds": model},
        {"name": "code", "seconds": code},
        {"name": "waiting on sub-calls", "seconds": waiting, "note": f"{summed:.2f} s of calls in all"},
        {"name": "other (start-up, context, overhead)", "seconds": other},
    ]
