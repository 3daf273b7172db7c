"""The sandbox contract, run against every backend (the `sandbox` fixture is parametrized over them)."""

from __future__ import annotations

import json
import time

import pytest

from helpers import ok, run
from rlm._text import truncate_middle
from rlm.sandbox import ContextSource, create_sandbox


# -- the contract every sandbox keeps ------------------------------------------------------------


def test_unknown_sandbox_name_is_a_config_error(bridge):
    from rlm.errors import ConfigError

    with pytest.raises(ConfigError, match="subprocess"):
        create_sandbox("no-such-sandbox", bridge)


def test_variables_imports_and_functions_persist_across_cells(sandbox):
    ok(sandbox, "import math\nbase = 10\ndef scale(x):\n    return x * base")
    ok(sandbox, "class Box:\n    size = 3")
    assert ok(sandbox, "print(scale(math.floor(2.7)), Box.size)") == "20 3\n"


def test_stdout_and_stderr_are_captured_separately_per_cell(sandbox):
    first = run(sandbox, "import sys\nprint('out one')\nprint('err one', file=sys.stderr)")
    second = run(sandbox, "print('out two')\n_ = sys.stderr.write('err two\\n')")
    assert (first.stdout, first.stderr) == ("out one\n", "err one\n")
    assert (second.stdout, second.stderr) == ("out two\n", "err two\n")


def test_last_expression_value_is_displayed(sandbox):
    assert ok(sandbox, "x = 6\nx * 7") == "42\n"
    assert ok(sandbox, "'text'") == "'text'\n"
    assert ok(sandbox, "None") == ""  # like the Python prompt: None is not echoed
    assert ok(sandbox, "y = 1") == ""


def test_exception_is_a_traceback_naming_the_cell_line_and_session_survives(sandbox):
    ok(sandbox, "kept = 'still here'")
    result = run(sandbox, "a = 1\nb = 0\nprint('before')\na / b")
    assert result.error is not None
    assert "ZeroDivisionError" in result.error
    assert "line 4" in result.error and "a / b" in result.error
    assert "worker.py" not in result.error  # only the model's own frames
    assert result.stdout == "before\n"
    assert not result.restarted
    assert ok(sandbox, "print(kept)") == "still here\n"


def test_exception_inside_a_function_shows_both_frames(sandbox):
    ok(sandbox, "def inner(d):\n    return d['missing']")
    result = run(sandbox, "inner({})")
    assert "KeyError: 'missing'" in result.error
    assert "in inner" in result.error and "return d['missing']" in result.error


def test_syntax_error_is_reported(sandbox):
    result = run(sandbox, "x = 1\ndef broken(:\n    pass")
    assert result.error is not None
    assert "SyntaxError" in result.error and "line 2" in result.error
    # The model gets its own cell in the report, not the parser's innards.
    assert "ast.py" not in result.error
    assert ok(sandbox, "print('fine')") == "fine\n"


def test_scaffold_names_are_restored_after_model_code_overwrites_them(sandbox):
    sandbox.load_context(ContextSource(value="the context"))
    ok(sandbox, "llm_query = llm_query_batched = FINAL = FINAL_VAR = SHOW_VARS = None\ncontext = 'clobbered'")
    assert ok(sandbox, "print(llm_query('a'), llm_query_batched(['b']))") == "A ['B']\n"
    assert ok(sandbox, "print(context)") == "the context\n"
    assert ok(sandbox, "print(callable(SHOW_VARS), callable(FINAL_VAR))") == "True True\n"
    assert run(sandbox, "FINAL('still works')").final == "still works"


def test_final_from_code_cannot_be_swallowed_by_except_exception(sandbox):
    code = "try:\n    FINAL('the answer')\nexcept Exception:\n    print('swallowed')\nprint('after')"
    result = run(sandbox, code)
    assert result.final == "the answer"
    assert result.error is None
    assert "swallowed" not in result.stdout and "after" not in result.stdout


def test_final_converts_non_strings(sandbox):
    assert run(sandbox, "FINAL(6 * 7)").final == "42"


def test_final_var_from_code(sandbox):
    result = run(sandbox, "answer = 'forty-two'\nFINAL_VAR('answer')")
    assert result.final == "forty-two"
    assert result.error is None


def test_final_var_with_missing_name_is_an_error_the_model_sees(sandbox):
    ok(sandbox, "present = 1")
    result = run(sandbox, "FINAL_VAR('absent')")
    assert result.final is None
    assert "absent" in result.error and "present" in result.error
    assert run(sandbox, "FINAL_VAR(present)").final is None  # a value instead of a name: told how to fix


def test_get_variable_reports_values_and_known_names(sandbox):
    ok(sandbox, "result = [1, 2]")
    assert sandbox.get_variable("result") == {"found": True, "value": "[1, 2]"}
    missing = sandbox.get_variable("nothing")
    assert missing["found"] is False and "result" in missing["names"]
    assert sandbox.get_variable("llm_query")["found"] is False  # scaffold names are not answers


def test_show_vars_lists_user_variables_only(sandbox):
    sandbox.load_context(ContextSource(value="ctx"))
    ok(sandbox, "import json\nalpha = 1\nbeta = 'b'\ndef gamma():\n    pass")
    shown = ok(sandbox, "SHOW_VARS()")
    for name in ("alpha", "beta", "gamma"):
        assert name in shown
    for name in ("json", "llm_query", "FINAL", "context", "__builtins__"):
        assert f"'{name}'" not in shown


def test_llm_query_reaches_the_bridge(sandbox, bridge):
    assert ok(sandbox, "print(llm_query('hello'))") == "HELLO\n"
    assert bridge.calls == [("llm_query", ["hello"])]


def test_llm_query_batched_reaches_the_bridge_and_keeps_order(sandbox, bridge):
    prompts = [f"p{i}" for i in range(20)]
    out = ok(sandbox, f"r = llm_query_batched({prompts!r})\nprint(r)")
    assert out == repr([p.upper() for p in prompts]) + "\n"
    assert bridge.calls == [("llm_query_batched", prompts)]
    assert ok(sandbox, "print(llm_query_batched([]))") == "[]\n"
    assert len(bridge.calls) == 1  # an empty batch costs no call


THREADED_QUERIES = """\
from concurrent.futures import ThreadPoolExecutor
prompts = [f'{{i:04d}}' + 'p' * {size} + f'{{i:04d}}' for i in range({count})]
with ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(llm_query, prompts))
wrong = [i for i, (prompt, answer) in enumerate(zip(prompts, answers)) if answer != prompt.upper()]
print(len(answers), wrong[:5])
"""


@pytest.mark.parametrize(("count", "size"), [(200, 10), (48, 200_000)])
def test_llm_query_from_many_threads_gets_each_prompt_its_own_answer(sandbox, bridge, count, size):
    """Model code may fan out with its own threads; the answers must never cross between them."""
    assert ok(sandbox, THREADED_QUERIES.format(count=count, size=size)) == f"{count} []\n"
    assert len(bridge.calls) == count
    assert ok(sandbox, "print(llm_query('after the threads'))") == "AFTER THE THREADS\n"


def test_failed_sub_call_is_an_exception_the_model_can_catch(sandbox, bridge):
    bridge.fail_with = "the sub-model is overloaded"
    code = "try:\n    llm_query('x')\nexcept Exception as exc:\n    caught = str(exc)\nprint(caught)"
    assert ok(sandbox, code) == "the sub-model is overloaded\n"
    uncaught = run(sandbox, "llm_query_batched(['a', 'b'])")
    assert "the sub-model is overloaded" in uncaught.error
    assert not uncaught.restarted
    bridge.fail_with = None
    assert ok(sandbox, "print(llm_query('again'))") == "AGAIN\n"


def test_bridge_failure_that_is_not_a_sub_call_error_fails_the_run(sandbox, bridge):
    """A failure of the host (a bug, the endpoint down) is not data for the model: it propagates,
    even when model code catches every Exception, and the session stays usable afterwards."""

    def broken() -> None:
        raise RuntimeError("host bug")

    bridge.during_call = broken
    with pytest.raises(RuntimeError, match="host bug"):
        run(sandbox, "try:\n    llm_query('x')\nexcept Exception:\n    print('hidden')")
    bridge.during_call = None
    assert ok(sandbox, "print(llm_query('next'))") == "NEXT\n"


def test_non_str_prompt_is_a_type_error(sandbox, bridge):
    assert "TypeError" in run(sandbox, "llm_query(123)").error
    assert "TypeError" in run(sandbox, "llm_query_batched(['ok', None])").error
    assert bridge.calls == []


def test_long_output_is_cut_to_head_and_tail_with_true_length(sandbox):
    result = run(sandbox, "print('H' * 500 + 'M' * 5000 + 'T' * 500)", max_output=400)
    total = 500 + 5000 + 500 + 1  # with print's newline
    assert result.stdout.startswith("H" * 200)
    assert result.stdout.endswith("T" * 199 + "\n")
    assert f"{total:,}" in result.stdout
    assert result.stdout == truncate_middle("H" * 500 + "M" * 5000 + "T" * 500 + "\n", 400)


def test_stderr_is_cut_too(sandbox):
    result = run(sandbox, "import sys\nsys.stderr.write('e' * 10_000)", max_output=100)
    assert len(result.stderr) < 300 and "10,000" in result.stderr


def test_fifty_megabyte_print_is_cut_and_memory_stays_bounded(sandbox):
    # Written piece by piece, 50 MB must not accumulate anywhere: peak memory barely moves.
    # (Measured first: the single 50 MB string below raises the peak by itself.)
    ok(sandbox, "import resource\npeak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss")
    streamed = run(sandbox, "for i in range(500):\n    print('x' * 100_000)", max_output=1000)
    assert "50,000,500" in streamed.stdout and len(streamed.stdout) < 1200
    grown_kib = int(ok(sandbox, "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before"))
    assert grown_kib < 20_000, f"peak memory grew by {grown_kib} KiB while printing 50 MB"
    result = run(sandbox, "print('b' * 50_000_000)", max_output=1000)
    assert "50,000,001" in result.stdout
    assert len(result.stdout) < 1200


def test_infinite_loop_times_out_and_variables_survive(sandbox):
    ok(sandbox, "survivor = 'alive'")
    started = time.monotonic()
    result = run(sandbox, "while True:\n    pass", timeout=0.5)
    assert time.monotonic() - started < 3
    assert result.timed_out is True
    assert result.restarted is False
    assert "0.5 s" in result.error
    assert ok(sandbox, "print(survivor)") == "alive\n"


def test_time_spent_in_the_bridge_does_not_count_against_the_cell(sandbox, bridge):
    bridge.sleep = 1.5
    result = run(sandbox, "reply = llm_query('slow')\nprint(reply)", timeout=1.0)
    assert result.timed_out is False, result.error
    assert result.error is None
    assert result.stdout == "SLOW\n"


@pytest.mark.parametrize(
    ("value", "expected_type", "total", "chunks"),
    [
        ("hello world", "str", 11, [11]),
        (["ab", "cde", ""], "list", 5, [2, 3, 0]),
        ({"a": "xyz", "b": [1, 2]}, "dict", 3 + len("[1, 2]"), [3, 6]),
        ("naïve ünïcode ✓", "str", 15, [15]),
    ],
)
def test_context_values_load_with_their_description(sandbox, value, expected_type, total, chunks):
    described = sandbox.load_context(ContextSource(value=value))
    assert described == {"type": expected_type, "total_length": total, "chunk_count": len(chunks), "chunk_lengths": chunks}
    assert json.loads(ok(sandbox, "import json\nprint(json.dumps(context))")) == value
    assert ok(sandbox, "print(type(context).__name__)") == expected_type + "\n"


def test_context_from_a_file(sandbox, tmp_path):
    text = "line one\nlíne twö\n" * 1000
    path = tmp_path / "context.txt"
    path.write_text(text, encoding="utf-8")
    described = sandbox.load_context(ContextSource(path=path))
    assert described == {"type": "str", "total_length": len(text), "chunk_count": 1, "chunk_lengths": [len(text)]}
    assert ok(sandbox, "print(len(context), context[:8], context.count('twö'))") == f"{len(text)} line one 1000\n"
    assert path.read_text(encoding="utf-8") == text  # the user's file is left alone


def test_empty_context_file(sandbox, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert sandbox.load_context(ContextSource(path=path))["total_length"] == 0
    assert ok(sandbox, "print(repr(context))") == "''\n"


def test_chunk_lengths_are_capped_at_one_hundred(sandbox):
    chunks = ["x" * (i % 7) for i in range(150)]
    described = sandbox.load_context(ContextSource(value=chunks))
    assert described["chunk_count"] == 150
    assert described["chunk_lengths"] == [len(c) for c in chunks[:100]]
    assert described["total_length"] == sum(len(c) for c in chunks)
    assert ok(sandbox, "print(len(context))") == "150\n"


def test_a_new_context_replaces_the_old_one(sandbox):
    sandbox.load_context(ContextSource(value="first"))
    sandbox.load_context(ContextSource(value=["second"]))
    assert ok(sandbox, "print(context)") == "['second']\n"


def test_closed_sandbox_refuses_cells(sandbox):
    from rlm.errors import SandboxError

    sandbox.close()
    sandbox.close()  # twice is fine
    with pytest.raises(SandboxError, match="closed"):
        run(sandbox, "1")
