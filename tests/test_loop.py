"""The root loop of RLM_REPL, driven by scripted root and sub models.

Most tests use the in-process sandbox for speed; the tests parametrized over SANDBOXES also
run on the default worker-subprocess sandbox.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from rlm.errors import ConfigError, ContextError, EndpointUnreachable
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, ScriptedModel
from rlm.utils import prompts
from rlm.utils.llm import Completion, estimate_tokens

FENCE = "```"
SANDBOXES = ["inprocess", "subprocess"]
MARKER = "ZQX-SECRET-CONTEXT-MARKER-7781"


def repl(code: str) -> str:
    return f"{FENCE}repl\n{code}\n{FENCE}"


def make(
    root_replies: Any,
    sub_replies: Any = ("sub answer",),
    *,
    window: int | None = None,
    **options: Any,
) -> tuple[RLM_REPL, ScriptedModel, ScriptedModel]:
    """An RLM_REPL over scripted root and sub models (in-process sandbox unless told)."""
    root = ScriptedModel(root_replies, model="root-model", window=window)
    sub = ScriptedModel(sub_replies, model="sub-model")
    options.setdefault("sandbox", "inprocess")
    return RLM_REPL(client=root, sub_client=sub, **options), root, sub


def last_user(request: list[dict]) -> str:
    message = request[-1]
    assert message["role"] == "user"
    return message["content"]


@pytest.fixture(autouse=True)
def _no_log_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's RLM_LOG_DIR must not receive test trajectories (or change what is tested).
    monkeypatch.delenv("RLM_LOG_DIR", raising=False)


# -- ways to answer -----------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_answer_with_a_final_line(sandbox: str) -> None:
    rlm, root, _ = make([repl("print(len(context))"), "The length is known.\nFINAL(11 characters)"], sandbox=sandbox)
    assert rlm.completion(context="hello world", query="How long is it?") == "11 characters"
    assert len(root.requests) == 2
    assert "11" in last_user(root.requests[1])


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("final_first", [False, True])
def test_final_var_names_a_variable_made_by_code_in_the_same_reply(sandbox: str, final_first: bool) -> None:
    code = repl("words = context.split()\nresult = f'{len(words)} words'")
    reply = f"FINAL_VAR(result)\n{code}" if final_first else f"{code}\nFINAL_VAR(result)"
    rlm, root, _ = make([reply], sandbox=sandbox)
    assert rlm.completion(context="one two three", query="How many words?") == "3 words"
    assert len(root.requests) == 1


def test_final_var_of_a_non_string_variable_gives_its_str() -> None:
    rlm, _, _ = make([repl("total = sum(range(10))") + "\nFINAL_VAR(total)"])
    assert rlm.completion(context="x", query="Sum?") == "45"


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_final_called_in_code_ends_the_run_even_inside_except_exception(sandbox: str) -> None:
    code = "try:\n    FINAL('from code')\nexcept Exception:\n    pass\nprint('still running')"
    rlm, root, _ = make([repl(code), "FINAL(wrong: the loop went on)"], sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == "from code"
    assert len(root.requests) == 1
    final = [event for event in rlm.trace if event.type == "final"]
    assert len(final) == 1 and final[0].source == "code"


def test_final_var_called_in_code_with_a_quoted_name() -> None:
    code = "answer = context.upper()\ntry:\n    FINAL_VAR('answer')\nexcept Exception:\n    pass"
    rlm, _, _ = make([repl(code)])
    assert rlm.completion(context="shout", query="q") == "SHOUT"


def test_final_in_code_stops_the_later_blocks_of_the_reply() -> None:
    reply = repl("FINAL('first block')") + "\n" + repl("llm_query('must not be asked')")
    rlm, _, sub = make([reply])
    assert rlm.completion(context="c", query="q") == "first block"
    assert sub.requests == []


# -- answers that are not accepted: the model is told and the loop goes on -----------------


def test_final_var_of_a_missing_variable_is_reported_and_the_loop_goes_on() -> None:
    rlm, root, _ = make([repl("found = 1"), "FINAL_VAR(missing_name)", "FINAL(recovered)"])
    assert rlm.completion(context="c", query="q") == "recovered"
    assert len(root.requests) == 3
    note = last_user(root.requests[2])
    assert "missing_name" in note and "no variable" in note
    assert "found" in note  # the variables that do exist are listed


@pytest.mark.parametrize("reply", ["FINAL()", 'FINAL("")', repl("FINAL('')"), repl("x = ''") + "\nFINAL_VAR(x)"])
def test_empty_final_is_reported_and_the_loop_goes_on(reply: str) -> None:
    rlm, root, _ = make([reply, "FINAL(not empty)"])
    assert rlm.completion(context="c", query="q") == "not empty"
    assert "empty" in last_user(root.requests[1])


def test_final_inside_a_python_fence_is_reported_and_not_accepted() -> None:
    rlm, root, _ = make([f"{FENCE}python\nFINAL(42)\n{FENCE}", "FINAL(43)"])
    assert rlm.completion(context="c", query="q") == "43"
    note = last_user(root.requests[1])
    assert "inside" in note and "not taken as your answer" in note


def test_python_block_is_not_run_and_the_model_is_told() -> None:
    rlm, root, sub = make([f"{FENCE}python\nllm_query('hi')\n{FENCE}", "FINAL(done)"])
    assert rlm.completion(context="c", query="q") == "done"
    assert sub.requests == []
    assert "only blocks fenced as ```repl are executed" in last_user(root.requests[1])


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_code_error_with_a_final_line_is_not_accepted(sandbox: str) -> None:
    reply = repl("value = 1 / 0") + "\nFINAL(infinity)"
    rlm, root, _ = make([reply, "FINAL(fixed)"], sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == "fixed"
    note = last_user(root.requests[1])
    assert "ZeroDivisionError" in note
    assert "not accepted" in note


def test_reply_with_no_code_and_no_final_is_reported() -> None:
    rlm, root, _ = make(["I will now think about the problem.", "FINAL(ok)"])
    assert rlm.completion(context="c", query="q") == "ok"
    note = last_user(root.requests[1])
    assert "no ```repl code block and no FINAL" in note


@pytest.mark.parametrize("content", ["", "   \n", None])
def test_empty_reply_or_missing_content_is_reported_without_a_crash(content: str | None) -> None:
    rlm, root, _ = make([content, "FINAL(ok)"])
    assert rlm.completion(context="c", query="q") == "ok"
    note = last_user(root.requests[1])
    assert "empty" in note
    if content is None:
        assert "no message content" in note


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_max_iterations_without_an_answer_returns_none(sandbox: str) -> None:
    rlm, root, _ = make(lambda messages: repl("print('still looking')"), max_iterations=3, sandbox=sandbox)
    assert rlm.completion(context="c", query="q") is None
    assert len(root.requests) == 3
    end = rlm.trace[-1]
    assert end.type == "run_end" and end.status == "max_iterations" and end.answer is None and end.turns == 3


def test_max_iterations_one_with_a_final_answer() -> None:
    rlm, root, _ = make(["FINAL(at once)"], max_iterations=1)
    assert rlm.completion(context="c", query="q") == "at once"
    assert len(root.requests) == 1


# -- what the root model sees --------------------------------------------------------------


def test_first_message_describes_the_context_and_never_contains_it() -> None:
    chunks = [f"{MARKER} chunk {index} " + "x" * index for index in range(150)]
    replies = [repl("print(len(context), len(context[0]))"), repl("n = sum(len(c) for c in context)"), "FINAL(done)"]
    rlm, root, _ = make(replies)
    assert rlm.completion(context=chunks, query="What is in chunk 7?") == "done"

    first = last_user(root.requests[0])
    lengths = [len(chunk) for chunk in chunks]
    assert "list" in first
    assert f"{sum(lengths):,} total characters" in first
    shown = ", ".join(f"{n:,}" for n in lengths[:100])
    assert f"[{shown}, ... and 50 more]" in first
    assert "150 chunks" in first
    assert "What is in chunk 7?" in first
    assert "have not looked at the context" in first
    for request in root.requests:
        assert MARKER not in json.dumps(request)


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_string_context_is_never_sent_to_the_root_model(sandbox: str) -> None:
    text = ("filler " * 5000) + MARKER + (" filler" * 5000)
    rlm, root, _ = make([repl("print(context.find('ZQX'))"), "FINAL(found)"], sandbox=sandbox)
    assert rlm.completion(context=text, query="Where is the marker?") == "found"
    first = last_user(root.requests[0])
    assert f"a str with {len(text):,} total characters" in first
    assert str(text.find("ZQX")) in last_user(root.requests[1])
    for request in root.requests:
        assert MARKER not in json.dumps(request)


def test_every_later_user_message_reminds_the_question() -> None:
    query = "Which city hosts the archive?"
    replies = [repl("print(1)"), "nothing", None, "FINAL_VAR(nope)", "FINAL(Oslo)"]
    rlm, root, _ = make(replies)
    assert rlm.completion(context="c", query=query) == "Oslo"
    assert len(root.requests) == 5
    for request in root.requests[1:]:
        assert f"Reminder of the question: {query}" in last_user(request)
        assert "have not looked at the context" not in last_user(request)


def test_messages_only_ever_append_over_five_turns() -> None:
    replies = [
        repl("a = len(context)\nprint(a)"),
        repl("b = context[:3]\nprint(b)"),
        "Thinking without code.",
        repl("print(undefined_name)"),
        repl("c = a * 2") + "\nFINAL_VAR(c)",
    ]
    rlm, root, _ = make(replies)
    assert rlm.completion(context="abcdef", query="q") == "12"
    requests = root.requests
    assert len(requests) == 5
    assert [message["role"] for message in requests[0]] == ["system", "user"]
    for before, after in zip(requests, requests[1:]):
        assert after[: len(before)] == before
        assert [message["role"] for message in after[len(before) :]] == ["assistant", "user"]
    for index, reply in enumerate(replies[:4]):
        assert requests[4][2 + 2 * index] == {"role": "assistant", "content": reply}


# -- context types -------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_context_types_are_loaded_as_context(sandbox: str, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    cases: list[tuple[Any, str, str]] = [
        ("plain text", "str", "'plain text'"),
        (["ab", "cde"], "list", "['ab', 'cde']"),
        ({"name": "Ada", "year": 1843}, "dict", "{'name': 'Ada', 'year': 1843}"),
        (path, "str", "'line one\\nline two\\n'"),
    ]
    for context, type_name, shown in cases:
        rlm, root, _ = make([repl("print(type(context).__name__, repr(context))"), "FINAL(ok)"], sandbox=sandbox)
        assert rlm.completion(context=context, query="q") == "ok"
        assert f"Your context is a {type_name} " in last_user(root.requests[0])
        assert f"{type_name} {shown}" in last_user(root.requests[1])


def test_path_context_metadata_gives_the_file_length(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_text("0123456789" * 1234, encoding="utf-8")
    rlm, root, _ = make(["FINAL(ok)"])
    rlm.completion(context=path, query="q")
    assert "12,340 total characters" in last_user(root.requests[0])


@pytest.mark.parametrize("context", [42, object(), {1, 2}, b"bytes", {"key": object()}])
def test_unsupported_context_raises_context_error(context: Any) -> None:
    rlm, root, _ = make(["FINAL(never)"])
    with pytest.raises(ContextError):
        rlm.completion(context=context, query="q")
    assert root.requests == []


def test_missing_path_raises_context_error(tmp_path: Path) -> None:
    rlm, root, _ = make(["FINAL(never)"])
    with pytest.raises(ContextError, match="does not exist"):
        rlm.completion(context=tmp_path / "no-such-file.txt", query="q")
    with pytest.raises(ContextError):
        rlm.completion(context=tmp_path, query="q")  # a directory is not a text file
    assert root.requests == []
    assert rlm.trace[-1].type == "run_end" and rlm.trace[-1].status == "error"


@pytest.mark.parametrize("query", ["", "   ", None, 42, ["q"]])
def test_empty_or_non_string_query_raises_config_error(query: Any) -> None:
    rlm, root, _ = make(["FINAL(never)"])
    with pytest.raises(ConfigError):
        rlm.completion(context="c", query=query)
    assert root.requests == []


# -- output truncation and context-window fitting -------------------------------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_long_output_is_cut_to_head_and_tail_with_the_true_length(sandbox: str) -> None:
    code = "print('H' * 1_000_000 + 'T' * 999_999)"
    rlm, root, _ = make([repl(code), "FINAL(ok)"], max_output_length=1000, sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == "ok"
    seen = last_user(root.requests[1])
    assert "H" * 400 in seen
    assert "T" * 400 + "\n" in seen  # the tail keeps the final newline
    assert "2,000,000" in seen  # 1,999,999 characters and print's newline
    assert seen.count("H") < 1000 and seen.count("T") < 1000
    assert len(seen) < 1000 + 600


def _printing_turn(letter: str, size: int) -> str:
    return repl(f"print({letter!r} * {size})")


@pytest.mark.parametrize("how", ["server_window", "argument"])
def test_oldest_outputs_are_shortened_to_fit_the_window_and_the_model_is_told(how: str) -> None:
    window = 10_000
    size = 8_000
    replies = [_printing_turn(letter, size) for letter in "ABCDE"] + ["FINAL(fitted)"]
    if how == "server_window":
        rlm, root, _ = make(replies, window=window)
    else:
        rlm, root, _ = make(replies, context_window=window)
    assert rlm.completion(context="c", query="q") == "fitted"

    requests = root.requests
    assert len(requests) == 6
    for request in requests:
        assert sum(len(message["content"]) for message in request) / 3 <= window
    # Request 4 (index 3) carries outputs A, B, C: only the oldest, A, had to be shortened.
    fourth = requests[3]
    assert "A" * size not in fourth[3]["content"] and "characters omitted" in fourth[3]["content"]
    assert "B" * size in fourth[5]["content"] and "C" * size in fourth[7]["content"]
    assert "to fit your context window" in last_user(fourth)
    assert "1 earlier message(s)" in last_user(fourth)
    for request in requests[:3]:
        assert "to fit your context window" not in last_user(request)
    shortened = [event.shortened_outputs for event in rlm.trace if event.type == "llm_call"]
    assert shortened[:3] == [0, 0, 0] and shortened[3] == 1 and sum(shortened) >= 2
    assert "E" * size in last_user(requests[5])  # the newest output is whole


def test_without_a_known_window_nothing_is_shortened() -> None:
    replies = [_printing_turn(letter, 8_000) for letter in "ABC"] + ["FINAL(ok)"]
    rlm, root, _ = make(replies)
    assert rlm.completion(context="c", query="q") == "ok"
    assert "A" * 8_000 in root.requests[3][3]["content"]
    assert "to fit your context window" not in json.dumps(root.requests)


# -- cost accounting -------------------------------------------------------------------------


def test_cost_summary_counts_root_and_sub_separately() -> None:
    code = "one = llm_query('summarise part one')\nmore = llm_query_batched(['part two', 'part three'])\nprint(one, more)"
    rlm, root, sub = make([repl(code), "FINAL(summary)"], lambda messages: "short")
    assert rlm.completion(context="c", query="q") == "summary"
    costs = rlm.cost_summary()

    assert isinstance(costs["total_cost"], float) and costs["total_cost"] == 0.0
    assert costs["unpriced_models"] == []
    for role in ("root", "sub"):
        entry = costs[role]
        for key in ("calls", "input_tokens", "output_tokens", "cost"):
            assert key in entry
        assert isinstance(entry["cost"], float)
    assert costs["root"]["calls"] == len(root.requests) == 2
    assert costs["sub"]["calls"] == len(sub.requests) == 3
    root_in = sum(estimate_tokens(sum(len(m["content"]) for m in request)) for request in root.requests)
    sub_in = sum(estimate_tokens(sum(len(m["content"]) for m in request)) for request in sub.requests)
    assert costs["root"]["input_tokens"] == root_in
    assert costs["sub"]["input_tokens"] == sub_in
    assert costs["root"]["output_tokens"] == estimate_tokens(repl(code)) + estimate_tokens("FINAL(summary)")
    assert costs["sub"]["output_tokens"] == 3 * estimate_tokens("short")
    assert costs["root"]["models"] == ["root-model"] and costs["sub"]["models"] == ["sub-model"]


def test_priced_and_unpriced_models_are_reported_apart() -> None:
    root = ScriptedModel(["FINAL(x)"], model="gpt-4o")
    root.base_url = "https://api.openai.com/v1"  # a hosted endpoint: its price is known
    sub = ScriptedModel(["s"], model="no-such-model-xyz-123")
    sub.base_url = "https://models.example.com/v1"  # a hosted endpoint with no known price
    rlm = RLM_REPL(client=root, sub_client=sub, sandbox="inprocess")
    assert rlm.completion(context="c", query="q") == "x"
    costs = rlm.cost_summary()
    assert costs["root"]["cost"] > 0
    assert costs["total_cost"] == pytest.approx(costs["root"]["cost"])
    assert costs["unpriced_models"] == []

    sub_rlm = RLM_REPL(client=ScriptedModel([repl("llm_query('hi')") + "\nFINAL(y)"]), sub_client=sub,
                       sandbox="inprocess")
    assert sub_rlm.completion(context="c", query="q") == "y"
    costs = sub_rlm.cost_summary()
    assert costs["unpriced_models"] == ["no-such-model-xyz-123"]
    assert costs["cost_complete"] is False
    assert isinstance(costs["total_cost"], float) and costs["total_cost"] == 0.0


def test_usage_adds_up_across_runs_and_reset_clears_usage_and_trace() -> None:
    rlm, root, _ = make(["FINAL(one)", "FINAL(two)", "FINAL(three)"])
    rlm.completion(context="c", query="q")
    rlm.completion(context="c", query="q")
    assert rlm.cost_summary()["root"]["calls"] == 2
    assert [event.type for event in rlm.trace][0] == "run_start"
    assert sum(1 for event in rlm.trace if event.type == "run_start") == 1  # only the last run

    rlm.reset()
    costs = rlm.cost_summary()
    assert costs["root"]["calls"] == 0 and costs["sub"]["calls"] == 0
    assert costs["root"]["input_tokens"] == 0 and costs["total_cost"] == 0.0
    assert rlm.trace == []
    assert rlm.completion(context="c", query="q") == "three"
    assert rlm.cost_summary()["root"]["calls"] == 1


# -- system prompts --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "cautious", "small"])
def test_named_system_prompts_are_sent_as_the_system_message(name: str) -> None:
    rlm, root, _ = make(["FINAL(x)"], system_prompt=name, max_output_length=4321, sub_call_chars=123_456)
    rlm.completion(context="c", query="q")
    system = root.requests[0][0]
    assert system["role"] == "system"
    assert system["content"] == prompts.system_prompt(name, sub_chars=123_456, max_output=4321)
    assert "4,321" in system["content"] and "123,456" in system["content"]  # placeholders filled
    others = {other for other in ("default", "cautious", "small") if other != name}
    for other in others:
        assert system["content"] != prompts.system_prompt(other, sub_chars=123_456, max_output=4321)


def test_cautious_prompt_asks_for_batches_of_about_200k_characters() -> None:
    assert "200,000" in prompts.system_prompt("cautious")


def test_custom_system_prompt_text_is_used_with_placeholders_filled() -> None:
    text = "You are a test analyst. Print at most {max_output} characters; keep {braces} as they are."
    rlm, root, _ = make(["FINAL(x)"], system_prompt=text, max_output_length=2500)
    rlm.completion(context="c", query="q")
    assert root.requests[0][0] == {
        "role": "system",
        "content": "You are a test analyst. Print at most 2,500 characters; keep {braces} as they are.",
    }


@pytest.mark.parametrize("name", ["fancy", "Default", "", "   "])
def test_unknown_prompt_name_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError):
        make(["FINAL(x)"], system_prompt=name)


# -- tracing ---------------------------------------------------------------------------------


def _traced_episode(**options: Any) -> RLM_REPL:
    code = "a = llm_query('first')\nb = llm_query_batched(['second', 'third'])\nprint(a, b)"
    rlm, _, _ = make([repl(code), "FINAL(traced)"], lambda messages: "sub answer", **options)
    assert rlm.completion(context="traced context", query="q") == "traced"
    return rlm


def test_events_are_kept_in_memory_by_type() -> None:
    seen: list[Any] = []
    rlm = _traced_episode(on_event=seen.append)
    types = [event.type for event in rlm.trace]
    assert types[0] == "run_start" and types[-1] == "run_end"
    assert types.count("llm_call") == 2
    assert types.count("exec") == 1
    assert types.count("sub_call") == 3
    assert types.count("final") == 1
    assert types.index("final") < types.index("run_end")
    run_ids = {event.run_id for event in rlm.trace}
    assert len(run_ids) == 1
    assert [event.type for event in seen] == types
    sub_prompts = sorted(event.prompt for event in rlm.trace if event.type == "sub_call")
    assert sub_prompts == ["first", "second", "third"]
    exec_event = next(event for event in rlm.trace if event.type == "exec")
    assert "sub answer" in exec_event.stdout
    assert rlm.trace[-1].status == "answered" and rlm.trace[-1].answer == "traced"


def test_log_dir_gets_one_jsonl_file_with_one_event_per_line(tmp_path: Path) -> None:
    log_dir = tmp_path / "traces" / "nested"
    rlm = _traced_episode(log_dir=str(log_dir))
    files = list(log_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".jsonl"
    run_id = rlm.trace[0].run_id
    assert files[0].name == f"{run_id}.jsonl"
    lines = files[0].read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == len(rlm.trace)
    for event in events:
        assert isinstance(event, dict)
        assert "v" in event and event["run_id"] == run_id
    assert [event["type"] for event in events] == [event.type for event in rlm.trace]


def test_nothing_is_written_without_a_log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    rlm = _traced_episode()
    assert rlm.tracer.path is None
    assert list(tmp_path.iterdir()) == []


def test_rlm_log_dir_environment_variable_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_dir = tmp_path / "from-env"
    monkeypatch.setenv("RLM_LOG_DIR", str(log_dir))
    rlm = _traced_episode()
    files = list(log_dir.glob("*.jsonl"))
    assert [file.name for file in files] == [f"{rlm.trace[0].run_id}.jsonl"]
    assert len(files[0].read_text(encoding="utf-8").splitlines()) == len(rlm.trace)


def test_log_dir_argument_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_LOG_DIR", str(tmp_path / "env"))
    _traced_episode(log_dir=str(tmp_path / "arg"))
    assert len(list((tmp_path / "arg").glob("*.jsonl"))) == 1
    assert not (tmp_path / "env").exists()


# -- sub-calls -------------------------------------------------------------------------------


def _slow_sub(finished: list[int]) -> Callable[[list[dict]], str]:
    lock = threading.Lock()

    def answer(messages: list[dict]) -> str:
        index = int(re.search(r"item (\d+)", messages[0]["content"]).group(1))
        time.sleep(0.02 * (8 - index))  # later prompts answer sooner
        with lock:
            finished.append(index)
        return f"answer-{index}"

    return answer


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_llm_query_batched_returns_results_in_prompt_order(sandbox: str) -> None:
    finished: list[int] = []
    code = "replies = llm_query_batched([f'item {i}' for i in range(8)])\nFINAL(','.join(replies))"
    rlm, _, sub = make([repl(code)], _slow_sub(finished), sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == ",".join(f"answer-{i}" for i in range(8))
    assert len(sub.requests) == 8
    assert finished != sorted(finished)  # they really ran concurrently and finished out of order


class _DownSubModel(ScriptedModel):
    """A sub-model whose endpoint cannot be reached."""

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        raise EndpointUnreachable("the sub-model endpoint could not be reached", url="http://127.0.0.1:9/v1")


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_an_unreachable_sub_model_fails_the_run_even_if_model_code_catches_it(sandbox: str) -> None:
    code = "try:\n    llm_query('hello')\nexcept BaseException as exc:\n    print('swallowed', exc)"
    root = ScriptedModel([repl(code), "FINAL(must not be reached)"])
    rlm = RLM_REPL(client=root, sub_client=_DownSubModel([]), sandbox=sandbox)
    with pytest.raises(EndpointUnreachable):
        rlm.completion(context="c", query="q")
    assert len(root.requests) == 1
    assert rlm.trace[-1].type == "run_end" and rlm.trace[-1].status == "error"
    assert [event.kind for event in rlm.trace if event.type == "error"] == ["EndpointUnreachable"]


def test_llm_query_sends_the_prompt_alone_to_the_sub_model() -> None:
    rlm, root, sub = make([repl("print(llm_query('What is 2+2?'))"), "FINAL(4)"], ["four"])
    assert rlm.completion(context="c", query="q") == "4"
    assert sub.requests == [[{"role": "user", "content": "What is 2+2?"}]]
    assert "four" in last_user(root.requests[1])


def test_state_persists_across_turns() -> None:
    replies = [repl("import math\ndef half(x):\n    return x / 2\nsaved = half(len(context))"),
               repl("print(math.floor(saved))"), "FINAL_VAR(saved)"]
    rlm, root, _ = make(replies)
    assert rlm.completion(context="abcdefg", query="q") == "3.5"
    assert "3" in last_user(root.requests[2])


# -- the README usage example ------------------------------------------------------------------

README_EXAMPLE = """\
from rlm.rlm_repl import RLM_REPL
rlm = RLM_REPL(model="auto", recursive_model="auto", max_iterations=10)
result = rlm.completion(context="a very long context ...", query="What is the answer?")
costs = rlm.cost_summary()
print(f"total cost: ${costs['total_cost']:.4f}")
"""


def test_readme_usage_example_runs_as_written(tmp_path: Path) -> None:
    root_script = [repl("print(len(context))"), "FINAL(the answer)"]
    with FakeOpenAIServer(root=root_script, models=["local-model"]) as server:
        env = {key: value for key, value in os.environ.items() if key not in ("RLM_LOG_DIR", "RLM_API_KEY")}
        env["RLM_API_URL"] = server.url
        done = subprocess.run(
            [sys.executable, "-c", README_EXAMPLE], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        root_requests = server.chat_requests(root=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "total cost: $0.0000\n"
    assert len(root_requests) == 2
    assert all(request["model"] == "local-model" for request in root_requests)
    assert "23" in last_user(root_requests[1]["messages"])  # len("a very long context ...")
    assert list(tmp_path.iterdir()) == []
