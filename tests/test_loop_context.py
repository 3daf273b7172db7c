"""What the root model sees of the context, the context types and output truncation (window
fitting: test_conversation_fit.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import SANDBOXES, last_user, make, repl
from rlm.errors import ConfigError, ContextError

MARKER = "ZQX-SECRET-CONTEXT-MARKER-7781"


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


# -- output truncation, and no fitting without a window ---------------------------------------


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


def test_without_a_known_window_nothing_is_shortened() -> None:
    replies = [_printing_turn(letter, 8_000) for letter in "ABC"] + ["FINAL(ok)"]
    rlm, root, _ = make(replies)
    assert rlm.completion(context="c", query="q") == "ok"
    assert "A" * 8_000 in root.requests[3][3]["content"]
    assert "to fit your context window" not in json.dumps(root.requests)
