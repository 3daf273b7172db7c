"""Trajectory files: the tree the reader builds, linear growth, stored-once texts, versions, secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import make, repl
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer
from rlm.trajectory import SUPPORTED_VERSION, TrajectoryError, from_events, load, summarize
from rlm.utils.trace_sink import REDACTED, Redactor

BATCH = "r = llm_query_batched(['alpha', 'beta', 'gamma'])\nprint(r)"
CHILDREN = "print(rlm_query_batched(['first child?', 'second child?']))"


def tree_model(messages: list[dict]) -> str:
    """Sub-model: child runs (they have a system prompt) call one sub-call, then answer."""
    if messages[0]["role"] == "system":
        turn = sum(1 for m in messages if m["role"] == "assistant") + 1
        return repl("print(llm_query('leaf of ' + context[:12]))") if turn == 1 else "FINAL(child done)"
    return "reply to " + messages[0]["content"]


def recorded_tree(tmp_path: Path) -> tuple[RLM_REPL, Path]:
    """A run with a batch of sub-calls (turn 1) and two child runs (turn 2), written to tmp_path."""
    rlm, _, _ = make([repl(BATCH), repl(CHILDREN), "FINAL(top)"], tree_model, max_depth=2, log_dir=str(tmp_path))
    assert rlm.completion(context="some context text", query="the question") == "top"
    return rlm, rlm.tracer.path


def test_the_reader_nests_sub_calls_and_child_runs_under_the_cell_that_made_them(tmp_path: Path) -> None:
    rlm, path = recorded_tree(tmp_path)
    trajectory = load(path)
    root = trajectory.root
    assert root.run_id == rlm.trace[0].run_id and root.status == "answered" and root.answer == "top"
    assert [turn.number for turn in root.turns] == [1, 2, 3]
    batch_cell = root.turns[0].cells[0]
    assert sorted(s["prompt"] for s in batch_cell.sub_calls) == ["alpha", "beta", "gamma"]
    assert {s["batch_size"] for s in batch_cell.sub_calls} == {3} and batch_cell.children == []
    child_cell = root.turns[1].cells[0]
    assert child_cell.index == 2 and child_cell.sub_calls == []
    children = sorted(child_cell.children, key=lambda run: run.start["batch_index"])
    assert [child.query for child in children] == ["first child?", "second child?"]
    for child in children:
        assert child.parent_id == root.run_id and child.depth == 1 and child.status == "answered"
        assert child.answer == "child done"
        leaf = child.turns[0].cells[0].sub_calls
        assert len(leaf) == 1 and leaf[0]["reply"].startswith("reply to leaf of ")
        assert child.turns[0].cells[0].exec["parent_id"] == root.run_id  # every event of a child names its parent
    assert root.turns[2].final["answer"] == "top" and root.turns[2].cells == []
    assert [run.depth for run in trajectory.walk()] == [0, 1, 1]


def test_totals_agree_with_cost_summary(tmp_path: Path) -> None:
    rlm, path = recorded_tree(tmp_path)
    totals, costs = load(path).totals(), rlm.cost_summary()
    assert totals["input_tokens"] == costs["total_input_tokens"]
    assert totals["output_tokens"] == costs["total_output_tokens"]
    assert totals["model_calls"] + totals["sub_calls"] + totals["cache_hits"] == costs["total_calls"]
    assert totals["runs"] == 3 and totals["cells"] == 4


def test_from_events_builds_the_same_tree_from_memory(tmp_path: Path) -> None:
    rlm, path = recorded_tree(tmp_path)
    in_memory, on_disk = from_events(rlm.trace), load(path)
    assert [r.run_id for r in in_memory.walk()] == [r.run_id for r in on_disk.walk()]
    assert in_memory.totals() == on_disk.totals()


def test_summaries_come_from_the_first_and_last_lines(tmp_path: Path) -> None:
    rlm, path = recorded_tree(tmp_path)
    summary = summarize(path)
    assert (summary.query, summary.answer, summary.status, summary.turns) == ("the question", "top", "answered", 3)
    assert summary.sub_calls == rlm.cost_summary()["sub"]["calls"] and summary.cost == 0.0
    cut = tmp_path / "unfinished.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    cut.write_text("".join(lines[:-1]), encoding="utf-8")
    no_end = summarize(cut)  # no run_end: read in full
    assert no_end.status == "answered" and no_end.turns == 3 and no_end.answer == "top"  # from its final event
    cut.write_text("".join(lines[:-2]), encoding="utf-8")
    assert summarize(cut).status == "unfinished"


# -- size: each text once -------------------------------------------------------------------------


def _file_for(turns: int, tmp_path: Path) -> Path:
    printing = [repl(f"print('x' * 20000)  # pass {n}") for n in range(turns - 1)]  # no reply repeats the last
    rlm, _, _ = make(printing + ["FINAL(done)"], log_dir=str(tmp_path / str(turns)))
    assert rlm.completion(context="c", query="q") == "done"
    return rlm.tracer.path


def test_files_grow_linearly_with_the_number_of_turns(tmp_path: Path) -> None:
    small, large = _file_for(6, tmp_path).stat().st_size, _file_for(12, tmp_path).stat().st_size
    assert 1.8 < (large / small) < 2.4  # a quadratic log (full prompt each turn) would be ~4x
    lines = [json.loads(line) for line in _file_for(6, tmp_path).read_text(encoding="utf-8").splitlines()]
    # 5 outputs of 20,000 characters: once in an exec event and once in the next user message
    assert sum(json.dumps(line).count("x" * 20000) for line in lines) == 10


def test_the_system_prompt_is_written_once_per_distinct_text(tmp_path: Path) -> None:
    rlm, path = recorded_tree(tmp_path)
    text = path.read_text(encoding="utf-8")
    starts = [e for e in rlm.trace if e.type == "run_start"]
    root_prompt, child_prompt = starts[0].system_prompt, starts[1].system_prompt
    assert root_prompt != child_prompt and starts[2].system_prompt == child_prompt
    assert text.count(json.dumps(root_prompt)[1:-1]) == 1  # not repeated in the first llm_call
    assert text.count(json.dumps(child_prompt)[1:-1]) == 1  # the second child refers to the first
    second = json.loads(text.splitlines()[[e.run_id for e in rlm.trace].index(starts[2].run_id)])
    assert second["system_prompt"] is None and isinstance(second["system_prompt_ref"], int)
    assert [r.start["system_prompt"] for r in load(path).walk()] == [root_prompt, child_prompt, child_prompt]


def test_repeated_long_sub_call_texts_are_stored_once_and_restored(tmp_path: Path) -> None:
    prompt = "summarise this long passage please " * 20
    code = ("p = 'summarise this long passage please ' * 20\n"
            "print(llm_query(p)[:10], llm_query(p)[:10], llm_query_batched([p, p])[0][:10])")
    rlm, _, sub = make([repl(code), "FINAL(ok)"], lambda m: "R" * 400, log_dir=str(tmp_path))
    assert rlm.completion(context="c", query="q") == "ok"
    assert len(sub.requests) == 1  # the rest were cache hits
    text = rlm.tracer.path.read_text(encoding="utf-8")
    assert text.count(prompt) == 1 and text.count("R" * 400) == 1
    calls = [s for turn in load(rlm.tracer.path).root.turns for c in turn.cells for s in c.sub_calls]
    assert len(calls) == 4 and all(c["prompt"] == prompt and c["reply"] == "R" * 400 for c in calls)


# -- reading: versions and damage -----------------------------------------------------------------


def _write(path: Path, events: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail, encoding="utf-8")
    return path


def _start(**extra: Any) -> dict[str, Any]:
    return {"type": "run_start", "v": 1, "run_id": "r1", "parent_id": None, "depth": 0, "ts": 1.0, "query": "q",
            "context": {}, "root_model": "m", "sub_model": "m", "sandbox": "inprocess", "max_iterations": 3,
            "system_prompt": "s", **extra}


def test_a_newer_major_version_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = _write(tmp_path / "new.jsonl", [_start(v=SUPPORTED_VERSION + 1)])
    with pytest.raises(TrajectoryError) as caught:
        load(path)
    message = str(caught.value)
    assert f"version {SUPPORTED_VERSION + 1}" in message and "upgrade rlm" in message and str(path) in message
    with pytest.raises(TrajectoryError, match="upgrade"):
        summarize(path)


def test_unknown_fields_and_event_types_are_ignored(tmp_path: Path) -> None:
    future = {"type": "heartbeat", "v": 1, "run_id": "r1", "ts": 2.0}
    path = _write(tmp_path / "additive.jsonl", [_start(new_field={"any": 1}), future])
    trajectory = load(path)
    assert trajectory.root.start["new_field"] == {"any": 1} and trajectory.unknown == [future]


def test_a_cut_last_line_is_tolerated_but_a_damaged_line_is_not(tmp_path: Path) -> None:
    cut = load(_write(tmp_path / "cut.jsonl", [_start()], tail='{"type": "llm_ca'))
    assert cut.truncated and cut.root.status == "unfinished"
    broken = _write(tmp_path / "broken.jsonl", [_start()], tail="not json\n" + json.dumps(_start()) + "\n")
    with pytest.raises(TrajectoryError, match="line 2"):
        load(broken)
    with pytest.raises(TrajectoryError, match="no events"):
        load(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(TrajectoryError, match="not an rlm trajectory"):
        load(_write(tmp_path / "other.jsonl", [{"hello": "world"}]))


# -- secrets --------------------------------------------------------------------------------------

ENV_KEY = "sk-envkey0123456789abcdefghijkl"
OPENAI_KEY = "opnai-0123456789-secret-value"
GIVEN_KEY = "given-key-0123456789-zyxw"


def test_api_keys_never_reach_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_API_KEY", ENV_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    leak = ("import os\nprint(os.environ['RLM_API_KEY'], os.environ['OPENAI_API_KEY'])\n"
            f"print(llm_query('Authorization: Bearer {GIVEN_KEY}'))")
    script = [repl(leak), f"FINAL(done {ENV_KEY})"]
    with FakeOpenAIServer(root=script, sub=lambda request: f"echo x-api-key: {OPENAI_KEY}") as server:
        rlm = RLM_REPL(api_url=server.url, api_key=GIVEN_KEY, sandbox="inprocess", log_dir=str(tmp_path))
        assert rlm.completion(context="c", query=f"is {OPENAI_KEY} a key?") == f"done {ENV_KEY}"
        rlm.close()
        sent = server.request_headers
    assert any(GIVEN_KEY in header for headers in sent for header in headers.values())  # it was used...
    text = rlm.tracer.path.read_text(encoding="utf-8")
    for secret in (ENV_KEY, OPENAI_KEY, GIVEN_KEY, "Bearer"):
        assert secret not in text  # ...and never written
    assert text.count(REDACTED) >= 5
    assert any(ENV_KEY in str(event) for event in rlm.trace)  # memory keeps what happened


def test_the_redactor_catches_key_shapes_and_headers() -> None:
    redactor = Redactor(["exact-secret-value"])
    assert redactor.text("k=exact-secret-value;") == f"k={REDACTED};"
    assert REDACTED in redactor.text("sk-ant-api03-abcdefghijklmnopqrstuv")
    assert redactor.text('{"Authorization": "Basic dXNlcjpwYXNz"}') == '{"Authorization": "[redacted]"}'
    assert redactor.text("plain words, sk-short and a task-list") == "plain words, sk-short and a task-list"
    assert redactor.value({"exact-secret-value": ["exact-secret-value", 3]}) == {REDACTED: [REDACTED, 3]}


def test_the_in_memory_trace_is_bounded_but_the_file_keeps_every_sub_call(tmp_path, monkeypatch):
    """Cache hits cost nothing, so model code can multiply sub-call events: memory keeps a bounded part."""
    from rlm.utils import tracing

    monkeypatch.setattr(tracing, "MEMORY_TRACE_CHARS", 100)
    monkeypatch.setattr(tracing, "MEMORY_TRACE_SUB_CALLS", 30)
    tracer = tracing.Tracer(tmp_path)
    tracer.start("run")
    for index in range(50):
        tracer.emit(tracing.SubCall(run_id="run", turn=1, model="m", prompt="p" * 10, reply="r" * 10,
                                    usage={}, cost=0.0, latency=0.0, batch_index=index))
    tracer.emit(tracing.RunEnd(run_id="run", status="answered", answer="a", turns=1, duration=0.1, usage={}))
    kept = [event for event in tracer.events if event.type == "sub_call"]
    assert len(kept) == 30 and tracer.events[-1].type == "run_end"
    assert [event.prompt for event in kept[:5]] == ["p" * 10] * 5  # 5 x 20 characters fit in 100
    assert kept[5].prompt == "[10 characters: in the trajectory file]"
    with open(tracer.path, encoding="utf-8") as written:
        assert sum('"sub_call"' in line for line in written) == 50
