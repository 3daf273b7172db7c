"""What the viewer page is given: the run tree as compact JSON, long texts in one shared table.

Every text (prompts, replies, code, output) is stored once in `texts` and referred to by its
index, so a prompt answered from the cache a hundred times costs one copy in the page.
"""

from __future__ import annotations

from typing import Any

from rlm.trajectory import Cell, RunNode, Trajectory, Turn
from rlm.viewer.timeline import timeline

__all__ = ["page_data"]


class _Texts:
    """The shared text table: each distinct string once."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def ref(self, text: Any) -> int | None:
        if text is None:
            return None
        text = str(text)
        found = self._index.get(text)
        if found is None:
            found = self._index[text] = len(self.items)
            self.items.append(text)
        return found


def page_data(trajectory: Trajectory) -> dict[str, Any]:
    """The JSON object the page renders: meta, totals, timeline, the run tree and the texts."""
    texts = _Texts()
    numbers = {run.run_id: number for number, run in enumerate(trajectory.walk())}
    root = trajectory.root
    error, reason = _ending(root)
    return {
        "meta": {
            "file": trajectory.path.name if trajectory.path else None, "run_id": root.run_id,
            "query": texts.ref(root.query), "answer": texts.ref(root.answer), "status": root.status,
            "error": texts.ref(error), "reason": texts.ref(reason),
            "started": (root.start or trajectory.events[0]).get("ts"), "truncated": trajectory.truncated,
            "version": trajectory.events[0].get("v"),
        },
        "totals": trajectory.totals(),
        "timeline": timeline(trajectory),
        "root": _run(root, texts, numbers),
        "texts": texts.items,
    }


def _ending(run: RunNode) -> tuple[str | None, str | None]:
    """What ended a run without an answer: its error ("Kind: message"), and the stop reason its
    run_end gives when that says more (why no answer came: no progress, turns used up)."""
    error = next((f"{event.get('kind')}: {event.get('message')}" for event in reversed(run.errors)), None)
    reason = (run.end or {}).get("reason")
    return error, reason if reason and reason != error else None


def _run(run: RunNode, texts: _Texts, numbers: dict[str, int]) -> dict[str, Any]:
    start = run.start or {}
    return {
        "id": numbers.get(run.run_id, 0), "run_id": run.run_id, "depth": run.depth,
        "query": texts.ref(run.query), "status": run.status, "answer": texts.ref(run.answer),
        "model": start.get("root_model"), "sub_model": start.get("sub_model"),
        "context": start.get("context"), "system": texts.ref(start.get("system_prompt")),
        "max_iterations": start.get("max_iterations"), "batch_index": start.get("batch_index"),
        "turns": [_turn(turn, texts, numbers) for turn in run.turns],
        "children": [_run(child, texts, numbers) for child in run.children],
        "errors": [_error(event, texts) for event in run.errors if not event.get("turn")],
        "end": {"duration": run.end.get("duration"), "turns": run.end.get("turns")} if run.end else None,
    }


def _turn(turn: Turn, texts: _Texts, numbers: dict[str, int]) -> dict[str, Any]:
    call = turn.call or {}
    messages = [
        {"role": message.get("role"), "text": texts.ref(message.get("content") or "")}
        for message in call.get("new_messages") or []
    ]
    return {
        "n": turn.number, "has_call": turn.call is not None, "model": call.get("model"),
        "messages": messages, "reply": texts.ref(call.get("reply")), "reasoning": texts.ref(call.get("reasoning")),
        "usage": _usage(call.get("usage")), "cost": call.get("cost"), "latency": call.get("latency"),
        "ts": call.get("ts"), "finish": call.get("finish_reason"), "prefix": call.get("prefix_unchanged"),
        "shortened": call.get("shortened_outputs") or 0,
        "cells": [_cell(cell, texts, numbers) for cell in turn.cells],
        "subs": [_sub(event, texts) for event in turn.sub_calls],
        "children": [_run(child, texts, numbers) for child in turn.children],
        "final": texts.ref(turn.final.get("answer")) if turn.final else None,
        "final_source": turn.final.get("source") if turn.final else None,
        "errors": [_error(event, texts) for event in turn.errors],
    }


def _cell(cell: Cell, texts: _Texts, numbers: dict[str, int]) -> dict[str, Any]:
    run = cell.exec or {}
    return {
        "i": cell.index, "ran": cell.exec is not None, "code": texts.ref(run.get("code")),
        "stdout": texts.ref(run.get("stdout") or None), "stderr": texts.ref(run.get("stderr") or None),
        "error": texts.ref(run.get("error")), "duration": run.get("duration"), "ts": run.get("ts"),
        "timed_out": bool(run.get("timed_out")), "restarted": bool(run.get("restarted")),
        "subs": [_sub(event, texts) for event in cell.sub_calls],
        "children": [_run(child, texts, numbers) for child in cell.children],
    }


def _sub(event: dict, texts: _Texts) -> dict[str, Any]:
    if event.get("type") == "tool_call":  # a host tool: its arguments and result in place of prompt and reply
        return {
            "kind": f"tool {event.get('name')}", "tool": True, "model": None,
            "prompt": texts.ref(event.get("arguments")),
            "reply": texts.ref(event.get("result")), "usage": [0, 0], "cost": 0.0, "latency": event.get("latency"),
            "ts": event.get("ts"), "index": None, "size": None, "error": texts.ref(event.get("error")),
            "cache_hit": False, "note": None,
        }
    if event.get("type") == "compaction":  # the root model's summary of old turns: the turns, then the summary
        turns = ", ".join(str(turn) for turn in event.get("removed_turns") or [])
        return {
            "kind": "compaction", "model": None, "prompt": texts.ref(f"summarise turns {turns}"),
            "reply": texts.ref(event.get("summary") or None), "usage": _usage(event.get("usage")),
            "cost": event.get("cost"), "latency": None, "ts": event.get("ts"), "index": None, "size": None,
            "error": texts.ref(event.get("error")), "cache_hit": False, "note": None,
        }
    return {
        "kind": event.get("kind"), "model": event.get("model"), "prompt": texts.ref(event.get("prompt")),
        "reply": texts.ref(event.get("reply")), "usage": _usage(event.get("usage")), "cost": event.get("cost"),
        "latency": event.get("latency"), "ts": event.get("ts"), "index": event.get("batch_index"),
        "size": event.get("batch_size"), "error": texts.ref(event.get("error")),
        "cache_hit": bool(event.get("cache_hit")), "note": event.get("note"),
    }


def _usage(usage: dict | None) -> list[int]:
    usage = usage or {}
    return [int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)]


def _error(event: dict, texts: _Texts) -> dict[str, Any]:
    return {"kind": event.get("kind"), "message": texts.ref(event.get("message"))}
