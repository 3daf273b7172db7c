"""OpenTelemetry spans (extra `otel`), checked with the SDK's in-memory exporter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from helpers import make, repl
from rlm.otel import OTelListener, export_trajectory
from rlm.trajectory import load

RECORDING = Path(__file__).parent / "data" / "recorded_run.jsonl"


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def tree_model(messages: list[dict]) -> str:
    if messages[0]["role"] == "system":
        done = any(m["role"] == "assistant" for m in messages)
        return "FINAL(child answer)" if done else repl("print(llm_query('leaf ' + context))")
    return "reply: " + messages[0]["content"]


def run_with(listener: OTelListener, **options: Any) -> Any:
    code = "print(llm_query_batched(['a', 'b']))"
    rlm, _, _ = make([repl(code), repl("print(rlm_query('child?', context='ctx'))"), "FINAL(top)"], tree_model,
                     max_depth=2, on_event=listener, **options)
    assert rlm.completion(context="the context", query="top question") == "top"
    return rlm


def shape(finished: tuple[ReadableSpan, ...]) -> list[Any]:
    """[name, [children...]] from the one root span down, children in start order."""
    by_id = {span.context.span_id: span for span in finished}
    tree: dict[int, list[ReadableSpan]] = {}
    for span in finished:
        tree.setdefault(span.parent.span_id if span.parent else 0, []).append(span)

    def build(span: ReadableSpan) -> Any:
        children = sorted(tree.get(span.context.span_id, []), key=lambda s: s.start_time)
        return [span.name, [build(child) for child in children]]

    roots = tree[0]
    assert len(roots) == 1 and all(s.parent is None or s.parent.span_id in by_id for s in finished)
    return build(roots[0])


def test_spans_follow_the_run_tree_with_genai_attributes(spans: Any) -> None:
    provider, exporter = spans
    rlm = run_with(OTelListener(provider))
    finished = exporter.get_finished_spans()
    assert shape(finished) == ["invoke_agent rlm", [
        ["chat root-model", []],
        ["execute_tool repl", [["chat sub-model", []], ["chat sub-model", []]]],
        ["chat root-model", []],
        ["execute_tool repl", [["invoke_agent rlm", [
            ["chat sub-model", []], ["execute_tool repl", [["chat sub-model", []]]], ["chat sub-model", []]]]]],
        ["chat root-model", []],
    ]]
    assert len({span.context.trace_id for span in finished}) == 1
    top = next(s for s in finished if s.name == "invoke_agent rlm" and s.parent is None)
    assert top.attributes["gen_ai.operation.name"] == "invoke_agent" and top.attributes["gen_ai.agent.name"] == "rlm"
    assert top.attributes["gen_ai.request.model"] == "root-model" and top.attributes["rlm.status"] == "answered"
    costs = rlm.cost_summary()
    assert top.attributes["gen_ai.usage.input_tokens"] == costs["total_input_tokens"]
    chats = [s for s in finished if s.attributes["gen_ai.operation.name"] == "chat"]
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in chats) == costs["total_input_tokens"]
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in chats) == costs["total_output_tokens"]
    for chat in chats:
        assert chat.attributes["gen_ai.system"] == "openai" and chat.kind.name == "CLIENT"
        assert chat.attributes["gen_ai.request.model"] in ("root-model", "sub-model")
    cells = [s for s in finished if s.name == "execute_tool repl"]
    assert all(s.attributes["gen_ai.tool.name"] == "repl" for s in cells)
    for span in finished:  # every span lies within its parent
        if span.parent is not None:
            outer = next(s for s in finished if s.context.span_id == span.parent.span_id)
            assert outer.start_time <= span.start_time <= span.end_time <= outer.end_time


def test_content_is_left_out_unless_asked_and_then_redacted(spans: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAMPLE_API_KEY", "example-secret-1234567890")
    provider, exporter = spans
    run_with(OTelListener(provider))
    texts = [str(value) for span in exporter.get_finished_spans() for value in span.attributes.values()]
    assert not any("top question" in text or "reply: a" in text for text in texts)
    exporter.clear()
    code = "import os\nprint(os.environ['EXAMPLE_API_KEY'])"
    rlm, _, _ = make([repl(code), "FINAL(done)"], on_event=OTelListener(provider, capture_content=True))
    rlm.completion(context="c", query="top question")
    finished = exporter.get_finished_spans()
    texts = [str(value) for span in finished for value in span.attributes.values()]
    assert any("top question" in text for text in texts) and any("import os" in text for text in texts)
    assert not any("example-secret-1234567890" in text for text in texts)
    assert "[redacted]" in next(s for s in finished if s.name == "execute_tool repl").attributes["rlm.stdout"]


def test_failures_set_error_status(spans: Any) -> None:
    provider, exporter = spans
    rlm, _, _ = make([repl("1/0"), "FINAL(after)"], on_event=OTelListener(provider))
    assert rlm.completion(context="c", query="q") == "after"
    cell = next(s for s in exporter.get_finished_spans() if s.name == "execute_tool repl")
    assert cell.status.status_code is StatusCode.ERROR and cell.attributes["error.type"] == "cell_error"
    assert "ZeroDivisionError" in cell.status.description


def test_a_recorded_file_exports_the_same_shape(spans: Any) -> None:
    provider, exporter = spans
    export_trajectory(load(RECORDING), provider)
    tree = shape(exporter.get_finished_spans())
    assert tree[0] == "invoke_agent rlm" and [child[0] for child in tree[1]] == [
        "chat recorded-root", "execute_tool repl", "chat recorded-root", "execute_tool repl",
        "chat recorded-root", "execute_tool repl", "chat recorded-root"]
    child_runs = tree[1][5][1]
    assert [run[0] for run in child_runs] == ["invoke_agent rlm", "invoke_agent rlm"]
