"""Custom tools (`RLM_REPL(tools=...)`): host functions called from model code through the worker protocol."""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import pytest

import rlm
from rlm.errors import ConfigError
from rlm.replay import replay_run
from rlm.sandbox.protocol import MAX_TOOL_CHARS, WORKER_FRAMES, ProtocolViolation, check_frame
from rlm.tools import Tool, load_tools, resolve_tools
from rlm.trajectory import load
from rlm.utils.tracing import ToolCall
from rlm.viewer.model import page_data

from helpers import make, repl, run_readme_example

LEVELS = ["subprocess", "strict", "bwrap"]


def lookup(key: str, default: int = 0) -> dict:
    """Look a key up in the host's table.

    More text that the prompt leaves out.
    """
    return {"key": key, "value": len(key) + default}


def fails(reason: str) -> None:
    raise KeyError(reason)


_CELL = """\
print(lookup("abc", default=2))
try:
    fails("why")
except ToolError as exc:
    print("caught:", exc)
print(RATES["eur"])
RATES["eur"] = 99
"""


@pytest.mark.parametrize("level", ["inprocess", *LEVELS])
def test_tools_work_at_every_level(level):
    engine, root, _ = make(
        [repl(_CELL), repl('print(RATES["eur"])\nFINAL(lookup("hello")["value"])')],
        sandbox=level, tools={"lookup": lookup, "fails": fails, "RATES": {"eur": 1.1}},
    )
    with engine:
        assert engine.completion(context="x", query="q") == "5"
    cells = [e for e in engine.trace if e.type == "exec"]
    assert cells[0].stdout == "{'key': 'abc', 'value': 5}\ncaught: fails() raised KeyError: 'why'\n1.1\n"
    assert cells[0].error is None
    assert cells[1].stdout == "1.1\n"  # a value is read-only: restored before the next cell
    calls = [e for e in engine.trace if isinstance(e, ToolCall)]
    assert [(c.name, json.loads(c.arguments), c.error) for c in calls] == [
        ("lookup", {"args": ["abc"], "kwargs": {"default": 2}}, None),
        ("fails", {"args": ["why"], "kwargs": {}}, "fails() raised KeyError: 'why'"),
        ("lookup", {"args": ["hello"], "kwargs": {}}, None),
    ]
    assert json.loads(calls[0].result) == {"key": "abc", "value": 5}
    assert calls[0].cell == 1 and calls[2].cell == 2
    system = root.requests[0][0]["content"]
    assert "- `lookup(key: str, default: int = 0) -> dict`: Look a key up in the host's table.\n" in system
    assert "More text" not in system and "- `RATES`: a read-only value" in system


def test_without_tools_the_system_prompt_is_unchanged():
    engine, root, _ = make([repl("FINAL('a')")])
    plain = make([repl("FINAL('a')")], tools={"lookup": lookup})[0]
    with engine, plain:
        engine.completion(context="x", query="q")
        plain.completion(context="x", query="q")
    assert "tools of the user's" not in root.requests[0][0]["content"]


@pytest.mark.parametrize("level", ["inprocess", "subprocess"])
def test_bad_arguments_and_results_are_exceptions_in_model_code(level):
    def big() -> str:
        return "x" * MAX_TOOL_CHARS

    def unjson() -> object:
        return object()

    cell = """\
for call in (lambda: lookup(object()), lambda: lookup(float("nan")), big, unjson, lambda: lookup("a" * 2_000_000)):
    try:
        call()
    except Exception as exc:
        print(type(exc).__name__, str(exc)[:60])
"""
    engine, _, _ = make([repl(cell), repl("FINAL('done')")], sandbox=level,
                        tools={"lookup": lookup, "big": big, "unjson": unjson})
    with engine:
        assert engine.completion(context="x", query="q") == "done"
    lines = [e for e in engine.trace if e.type == "exec"][0].stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["TypeError", "TypeError", "ToolError", "ToolError", "ValueError"]
    assert "over 1,000,000" in lines[2] and "not JSON" in lines[3]


def test_a_slow_tool_times_out_and_an_async_tool_runs_on_the_loop():
    release = threading.Event()

    def slow() -> int:
        release.wait(5)
        return 1

    async def later(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 2

    cell = "try:\n    slow()\nexcept ToolError as exc:\n    print(exc)\nprint(later(21))"
    engine, _, _ = make([repl(cell), repl("FINAL('ok')")], sandbox="subprocess",
                        tools=[Tool(slow, timeout=0.2), later])
    try:
        with engine:
            assert engine.completion(context="x", query="q") == "ok"
    finally:
        release.set()
    out = [e for e in engine.trace if e.type == "exec"][0].stdout
    assert out == "slow() did not return within 0.2 s (the tool's timeout)\n42\n"


def test_reserved_and_bad_names_are_refused_when_made():
    for tools in ({"llm_query": lookup}, {"context": 1}, {"FINAL": lookup}, {"context_3": 1}, {"ToolError": 1},
                  {"not a name": lookup}, {"_hidden": lookup}, {"class": lookup}):
        with pytest.raises(ConfigError, match="name"):
            make([], tools=tools)
    with pytest.raises(ConfigError, match="neither a function nor JSON"):
        make([], tools={"thing": {1, 2}})
    with pytest.raises(ConfigError, match="two tools"):
        make([], tools=[lookup, Tool(fails, name="lookup")])
    with pytest.raises(ConfigError, match="not a function"):
        make([], tools=[1])
    with pytest.raises(ConfigError, match="sub_tools"):
        make([], sub_tools={"SHOW_VARS": lookup})


def test_children_get_sub_tools():
    child_cell = repl("try:\n    print(lookup('k'))\nexcept NameError:\n    print('no tool')\nFINAL('child')")
    replies = [repl("print(rlm_query('sub question'))"), child_cell, repl("FINAL('top')")]
    for sub_tools, expected in ((None, "{'key': 'k', 'value': 1}"), ({}, "no tool")):
        engine, root, sub = make(replies[:1] + replies[2:], replies[1:2], max_depth=2,
                                 tools={"lookup": lookup}, sub_tools=sub_tools)
        with engine:
            assert engine.completion(context="x", query="q") == "top"
        child_exec = [e for e in engine.trace if e.type == "exec" and e.depth == 1]
        assert child_exec[0].stdout.strip() == expected


def test_tool_calls_are_checked_as_hostile_frames():
    frame = {"op": "llm_query", "id": 1, "kind": "tool", "prompts": ['{"name": "f", "args": [], "kwargs": {}}']}
    assert check_frame(frame, WORKER_FRAMES)["prompts"] == [{"name": "f", "args": [], "kwargs": {}}]
    for bad in ('{"name": "f"}', "[1]", "nope", '{"name": 1, "args": [], "kwargs": {}}', "[" * 100_000,
                '{"name": "f", "args": [%s], "kwargs": {}}' % ",".join(["[]"] * 200_000), "x" * (MAX_TOOL_CHARS + 1)):
        with pytest.raises(ProtocolViolation):
            check_frame({**frame, "prompts": [bad]}, WORKER_FRAMES)
    with pytest.raises(ProtocolViolation):
        check_frame({**frame, "prompts": ["{}", "{}"]}, WORKER_FRAMES)


def test_an_unknown_tool_name_from_a_worker_is_an_error_in_model_code():
    call = "json.dumps({'name': 'nope', 'args': [], 'kwargs': {}})"
    cell = f"import json\ntry:\n    print(llm_query.__self__._call_llm('tool', [{call}]))\n" \
           "except Exception as exc:\n    print(type(exc).__name__, exc)"
    engine, _, _ = make([repl(cell), repl("FINAL('ok')")], sandbox="subprocess", tools={"lookup": lookup})
    with engine:
        assert engine.completion(context="x", query="q") == "ok"
    out = [e for e in engine.trace if e.type == "exec"][0].stdout
    assert out == "LLMQueryError there is no tool named 'nope' in this run\n"


def test_viewer_and_replay_show_and_serve_tool_calls(tmp_path):
    engine, _, _ = make([repl(_CELL), repl('FINAL(lookup("hello")["value"])')], sandbox="subprocess",
                        tools={"lookup": lookup, "fails": fails, "RATES": {"eur": 1.1}}, log_dir=str(tmp_path))
    with engine:
        engine.completion(context="x", query="q")
    path = engine.tracer.path
    data = page_data(load(path))
    subs = data["root"]["turns"][0]["cells"][0]["subs"]
    assert [s["kind"] for s in subs] == ["tool lookup", "tool fails"] and all(s["tool"] for s in subs)
    result = replay_run(path, "x", sandbox="subprocess")
    assert result.divergence is None, result.describe()
    assert result.answer == "5"


def test_rlm_ask_tools_loads_a_module(tmp_path, monkeypatch):
    (tmp_path / "mytools.py").write_text("def shout(text: str) -> str:\n    '''Upper-case.'''\n    return text.upper()\n"
                                         "TOOLS = [shout]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert list(load_tools("mytools:TOOLS")) == ["shout"]
    for bad, message in (("mytools", "module:attribute"), ("nosuchmodule:X", "cannot import"),
                         ("mytools:MISSING", "no attribute")):
        with pytest.raises(ConfigError, match=message):
            load_tools(bad)
    sys.modules.pop("mytools", None)


def test_tool_resolution_forms():
    by_list = resolve_tools([lookup, Tool(fails, name="oops", description="Always fails.")])
    assert list(by_list) == ["lookup", "oops"] and by_list["oops"].description == "Always fails."
    by_dict = resolve_tools({"find": lookup, "limit": 3})
    assert by_dict["find"].fn is lookup and by_dict["find"].description == "Look a key up in the host's table."
    assert not by_dict["limit"].is_function
    assert rlm.Tool is Tool


def test_rlm_ask_tools_end_to_end(tmp_path):
    import os
    import subprocess

    from rlm.testing import FakeOpenAIServer

    (tmp_path / "mytools.py").write_text("def shout(text: str) -> str:\n    '''Upper-case.'''\n    return text.upper()\n"
                                         "TOOLS = {'shout': shout}\n")
    (tmp_path / "context.txt").write_text("hello")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RLM_")}
    env["PYTHONWARNINGS"] = "error"
    with FakeOpenAIServer(root=[repl("FINAL(shout(context))")]) as server:
        done = subprocess.run(
            [sys.executable, "-m", "rlm", "ask", "q", "--context", "context.txt", "--api-url", server.url,
             "--tools", "mytools:TOOLS", "--sandbox", "subprocess", "--quiet"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
        )
        system = server.chat_requests(root=True)[0]["messages"][0]["content"]
    assert done.returncode == 0, done.stderr
    assert done.stdout == "HELLO\n"
    assert "- `shout(text: str) -> str`: Upper-case." in system


def test_the_readme_example_runs_offline_and_prints_what_it_says(tmp_path):
    printed, expected = run_readme_example("### Custom tools", tmp_path)
    assert printed == expected


@pytest.mark.parametrize("level", LEVELS)
def test_overwritten_tool_names_are_put_back_before_the_next_cell(level):
    forge = "lookup = lambda *a, **k: 'forged'\nRATES = {}\nToolError = None\nprint(lookup('x'))"
    check = "print(lookup('abc'), RATES, ToolError.__name__)\nFINAL('ok')"
    engine, _, _ = make([repl(forge), repl(check)], sandbox=level, tools={"lookup": lookup, "RATES": {"eur": 1.1}})
    with engine:
        assert engine.completion(context="x", query="q") == "ok"
    cells = [e for e in engine.trace if e.type == "exec"]
    assert cells[0].stdout == "forged\n"
    assert cells[1].stdout == "{'key': 'abc', 'value': 3} {'eur': 1.1} ToolError\n"
