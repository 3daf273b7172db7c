"""OpenTelemetry spans for RLM runs, using the GenAI semantic conventions (extra `otel`).

    pip install 'rlm[otel]'
    from rlm.otel import OTelListener
    rlm = RLM_REPL(..., on_event=OTelListener())          # the global tracer provider
    rlm = RLM_REPL(..., on_event=OTelListener(provider))  # or your own

Spans (names and `gen_ai.operation.name` as the conventions define them):

    invoke_agent rlm          one per run (the top run, and each child run of rlm_query)
      chat <model>            each root-model call of that run
      execute_tool repl       each code cell
        chat <sub-model>      each sub-call the cell made
        invoke_agent rlm      each child run the cell started (its own calls and cells inside)

Events are written when a step ends, so the listener keeps a call tree's events and makes
its spans, with their real start and end times, when the top run ends. Prompts, replies and
code go into spans only with `capture_content=True` (redacted like trajectory files).
`export_trajectory(load(path))` sends a recorded run the same way.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from rlm.trajectory import Cell, RunNode, Trajectory, Turn, from_events
from rlm.utils.trace_sink import Redactor
from rlm.utils.tracing import Event

__all__ = ["OTelListener", "export_trajectory"]

_NS = 1_000_000_000


def _otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError as exc:
        from rlm.errors import ConfigError

        raise ConfigError(f"OpenTelemetry spans need the optional extra: pip install 'rlm[otel]' ({exc})") from None
    return trace


class OTelListener:
    """An `on_event` listener that turns each finished call tree into spans."""

    def __init__(self, tracer_provider: Any = None, *, capture_content: bool = False, system: str = "openai") -> None:
        from rlm import __version__

        trace = _otel()
        provider = tracer_provider or trace.get_tracer_provider()
        self._tracer = provider.get_tracer("rlm", __version__)
        self._capture = capture_content
        self._system = system
        self._lock = threading.Lock()
        self._trees: dict[str, list[dict]] = {}  # top run id -> its tree's events so far
        self._top_of: dict[str, str] = {}  # run id -> top run id

    def __call__(self, event: Event) -> None:
        record = event.to_dict()
        with self._lock:
            if record["type"] == "run_start":
                parent = record.get("parent_id")
                self._top_of[record["run_id"]] = self._top_of.get(parent, parent) if parent else record["run_id"]
            top = self._top_of.get(record["run_id"], record["run_id"])
            self._trees.setdefault(top, []).append(record)
            finished = record["type"] == "run_end" and not record.get("parent_id")
            events = self._trees.pop(top) if finished else None
            if finished:
                self._top_of = {run: root for run, root in self._top_of.items() if root != top}
        if events is not None:
            export_trajectory(from_events(events), tracer=self._tracer, capture_content=self._capture,
                              system=self._system)


def export_trajectory(
    trajectory: Trajectory, tracer_provider: Any = None, *, tracer: Any = None,
    capture_content: bool = False, system: str = "openai",
) -> None:
    """Make the spans of a whole call tree (a loaded file, or events) on a tracer."""
    if tracer is None:
        from rlm import __version__

        tracer = (tracer_provider or _otel().get_tracer_provider()).get_tracer("rlm", __version__)
    _Exporter(tracer, capture_content, system).run(trajectory.root, None)


class _Exporter:
    def __init__(self, tracer: Any, capture: bool, system: str) -> None:
        self.tracer = tracer
        self.capture = capture
        self.system = system
        self.redactor = Redactor() if capture else None
        self.trace = _otel()

    def run(self, run: RunNode, parent: Any) -> None:
        start, end = _run_times(run)
        info = run.start or {}
        attributes = {
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "rlm", "gen_ai.system": self.system,
            "gen_ai.provider.name": self.system, "gen_ai.request.model": str(info.get("root_model", "")),
            "rlm.run_id": run.run_id, "rlm.depth": run.depth, "rlm.status": run.status, "rlm.turns": len(run.turns),
        }
        usage = (run.end or {}).get("usage") or {}
        if usage:
            attributes.update({"gen_ai.usage.input_tokens": int(usage.get("total_input_tokens") or 0),
                               "gen_ai.usage.output_tokens": int(usage.get("total_output_tokens") or 0),
                               "rlm.cost_usd": float(usage.get("total_cost") or 0.0)})
        if self.capture:
            attributes.update(self._content({"rlm.query": run.query, "rlm.answer": run.answer}))
        span = self._start("invoke_agent rlm", parent, start, attributes)
        if run.status == "error":
            message = run.errors[-1].get("message") if run.errors else "the run failed"
            self._fail(span, run.errors[-1].get("kind") if run.errors else "error", message)
        for turn in run.turns:
            self._turn(turn, span)
        for child in run.children:
            self.run(child, span)
        span.end(end_time=_ns(end))

    def _turn(self, turn: Turn, parent: Any) -> None:
        if turn.call is not None:
            self._model_call(turn.call, parent, root=True)
        for cell in turn.cells:
            self._cell(cell, parent)
        for event in turn.sub_calls:
            self._model_call(event, parent, root=False)
        for child in turn.children:
            self.run(child, parent)

    def _cell(self, cell: Cell, parent: Any) -> None:
        record = cell.exec or {}
        nested = [e["ts"] - float(e.get("latency") or 0) for e in cell.sub_calls]
        end = float(record.get("ts") or max([e["ts"] for e in cell.sub_calls], default=0.0))
        start = end - float(record.get("duration") or 0) if record else min(nested, default=end)
        attributes = {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "repl", "gen_ai.tool.type": "function",
            "rlm.turn": cell.turn, "rlm.cell": cell.index, "rlm.sub_calls": len(cell.sub_calls),
        }
        if self.capture:
            attributes.update(self._content({"rlm.code": record.get("code"), "rlm.stdout": record.get("stdout")}))
        span = self._start("execute_tool repl", parent, min([start, *nested]), attributes)
        if record.get("error") or record.get("timed_out"):
            kind = "timeout" if record.get("timed_out") else "cell_error"
            self._fail(span, kind, str(record.get("error") or "timed out"))
        for event in cell.sub_calls:
            self._model_call(event, span, root=False)
        for child in cell.children:
            self.run(child, span)
        span.end(end_time=_ns(max([end, *(e["ts"] for e in cell.sub_calls)])))

    def _model_call(self, event: dict, parent: Any, *, root: bool) -> None:
        usage = event.get("usage") or {}
        model = str(event.get("model", ""))
        attributes = {
            "gen_ai.operation.name": "chat", "gen_ai.system": self.system, "gen_ai.provider.name": self.system,
            "gen_ai.request.model": model, "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": int(usage.get("input_tokens") or 0),
            "gen_ai.usage.output_tokens": int(usage.get("output_tokens") or 0),
            "rlm.turn": int(event.get("turn") or 0), "rlm.role": "root" if root else "sub",
        }
        if event.get("cost") is not None:
            attributes["rlm.cost_usd"] = float(event["cost"])
        if root and event.get("finish_reason"):
            attributes["gen_ai.response.finish_reasons"] = [str(event["finish_reason"])]
        if not root:
            attributes.update({"rlm.kind": str(event.get("kind")), "rlm.cache_hit": bool(event.get("cache_hit"))})
            if event.get("batch_index") is not None:
                attributes["rlm.batch_index"] = int(event["batch_index"])
        if self.capture:
            sent = event.get("new_messages") if root else [{"role": "user", "content": event.get("prompt")}]
            received = [{"role": "assistant", "content": event.get("reply")}]
            attributes.update(self._content({"gen_ai.input.messages": json.dumps(sent, ensure_ascii=False),
                                             "gen_ai.output.messages": json.dumps(received, ensure_ascii=False)}))
        end = float(event["ts"])
        span = self._start(f"chat {model}", parent, end - float(event.get("latency") or 0), attributes,
                           kind=self.trace.SpanKind.CLIENT)
        if event.get("error"):
            self._fail(span, "sub_call_failed", str(event["error"]))
        span.end(end_time=_ns(end))

    def _start(self, name: str, parent: Any, start: float, attributes: dict, kind: Any = None) -> Any:
        context = self.trace.set_span_in_context(parent) if parent is not None else None
        options = {"kind": kind} if kind is not None else {}
        return self.tracer.start_span(name, context=context, start_time=_ns(start), attributes=attributes, **options)

    def _fail(self, span: Any, kind: str, message: str) -> None:
        span.set_attribute("error.type", kind)
        span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, message[:500]))

    def _content(self, values: dict[str, Any]) -> dict[str, str]:
        assert self.redactor is not None
        return {key: self.redactor.text(str(value)) for key, value in values.items() if value is not None}


def _run_times(run: RunNode) -> tuple[float, float]:
    """A run's start and end: run_end's duration back from its time, else its events' span."""
    stamps: list[float] = []
    for event in (run.start, run.end, run.final, *run.errors):
        if event:
            stamps.append(float(event["ts"]))
    for turn in run.turns:
        if turn.call:
            stamps += [float(turn.call["ts"]) - float(turn.call.get("latency") or 0), float(turn.call["ts"])]
        for cell in turn.cells:
            if cell.exec:
                stamps += [float(cell.exec["ts"]) - float(cell.exec.get("duration") or 0), float(cell.exec["ts"])]
    end = max(stamps, default=0.0)
    start = min(stamps, default=end)
    if run.end is not None and run.end.get("duration") is not None:
        start = min(start, float(run.end["ts"]) - float(run.end["duration"]))
    return start, end


def _ns(seconds: float) -> int:
    return int(seconds * _NS)
