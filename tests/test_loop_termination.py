"""How a run of RLM_REPL ends: the ways to answer, answers that are not accepted, max_iterations.

Most tests use the in-process sandbox for speed; the tests parametrized over SANDBOXES also
run on the default worker-subprocess sandbox.
"""

from __future__ import annotations

import time

import pytest

from helpers import FENCE, SANDBOXES, last_user, make, repl


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


# -- FINAL_VAR of a value that cannot be an answer: told, never a crash ----------------------

UNUSABLE_VALUES = {
    "str_raises": "class Bad:\n    def __str__(self):\n        raise RuntimeError('no text for you')\nx = Bad()",
    "too_many_digits": "x = 10**5000",  # str() raises ValueError (Python's int-to-text digit limit)
    "none": "x = None",
    "function": "def x():\n    return 42",
}


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("code", list(UNUSABLE_VALUES.values()), ids=list(UNUSABLE_VALUES))
def test_final_var_line_naming_a_value_that_is_no_answer_is_reported_and_the_loop_goes_on(
    sandbox: str, code: str
) -> None:
    rlm, root, _ = make([repl(code) + "\nFINAL_VAR(x)", "FINAL(recovered)"], sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == "recovered"
    assert len(root.requests) == 2
    assert "FINAL_VAR(x) was not accepted" in last_user(root.requests[1])
    assert rlm.trace[-1].status == "answered"


@pytest.mark.timeout(15)
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_final_var_line_whose_str_never_returns_times_out_and_the_run_goes_on(sandbox: str) -> None:
    code = "class Forever:\n    def __str__(self):\n        while True:\n            pass\nx = Forever()"
    replies = [repl(code) + "\nFINAL_VAR(x)", repl("print('still here')"), "FINAL(recovered)"]
    rlm, root, _ = make(replies, sandbox=sandbox, exec_timeout=1)
    started = time.monotonic()
    assert rlm.completion(context="c", query="q") == "recovered"
    assert time.monotonic() - started < 10
    note = last_user(root.requests[1])
    assert "FINAL_VAR(x) was not accepted" in note and "1 s limit" in note
    assert "still here" in last_user(root.requests[2])


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_final_of_none_called_in_code_is_not_an_answer(sandbox: str) -> None:
    rlm, root, _ = make([repl("FINAL(None)"), "FINAL(recovered)"], sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == "recovered"
    note = last_user(root.requests[1])
    assert "TypeError" in note and "None" in note
