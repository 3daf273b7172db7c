"""Reply parsing: one test (or more) per termination rule in rlm/parsing.py's docstring."""

from __future__ import annotations

import pytest

from rlm.parsing import ParsedReply, parse_reply

FENCE = "```"


def repl(code: str, lang: str = "repl") -> str:
    return f"{FENCE}{lang}\n{code}\n{FENCE}"


# -- FINAL lines -------------------------------------------------------------------------


def test_final_at_line_start_is_the_answer() -> None:
    parsed = parse_reply("I have checked everything.\nFINAL(42)")
    assert parsed.final is not None
    assert parsed.final.kind == "FINAL"
    assert parsed.final.answer == "42"
    assert parsed.problems == []
    assert parsed.repl_blocks == []


def test_final_after_indentation_is_the_answer() -> None:
    parsed = parse_reply("Done:\n    FINAL(Paris)")
    assert parsed.final is not None and parsed.final.answer == "Paris"


def test_final_in_the_middle_of_a_line_is_not_an_answer() -> None:
    parsed = parse_reply("When I know, I will write FINAL(answer) on its own line.")
    assert parsed.final is None
    assert parsed.problems == []


def test_text_after_the_closing_paren_on_the_same_line_is_dropped() -> None:
    parsed = parse_reply("FINAL(42) is my answer.")
    assert parsed.final is not None and parsed.final.answer == "42"


def test_prose_with_parentheses_after_a_one_line_final_is_not_part_of_the_answer() -> None:
    parsed = parse_reply("FINAL(42)\n\nI found it in section (3) of the text.")
    assert parsed.final is not None and parsed.final.answer == "42"


def test_multi_line_final() -> None:
    parsed = parse_reply("Here it is:\nFINAL(first line\nsecond line\nthird line)")
    assert parsed.final is not None
    assert parsed.final.answer == "first line\nsecond line\nthird line"


def test_multi_line_final_with_paren_on_its_own_line() -> None:
    parsed = parse_reply("FINAL(\n  alpha\n  beta\n)")
    assert parsed.final is not None
    assert parsed.final.answer == "alpha\n  beta"


def test_final_with_parentheses_inside() -> None:
    parsed = parse_reply("FINAL(f(x) = (a + b) * c)")
    assert parsed.final is not None and parsed.final.answer == "f(x) = (a + b) * c"


def test_final_with_unbalanced_parentheses_inside_keeps_them() -> None:
    parsed = parse_reply("FINAL(1) apples, 2) pears)")
    assert parsed.final is not None and parsed.final.answer == "1) apples, 2) pears"


def test_multi_line_final_with_parentheses_inside() -> None:
    parsed = parse_reply("FINAL(the two cases (a)\nand (b) both hold)")
    assert parsed.final is not None
    assert parsed.final.answer == "the two cases (a)\nand (b) both hold"


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ('FINAL("x")', "x"),
        ("FINAL('x')", "x"),
        ('FINAL("He said (hi)")', "He said (hi)"),
        ('FINAL("a \\"quoted\\" word")', 'a "quoted" word'),
        ('FINAL("unbalanced)', '"unbalanced'),
    ],
)
def test_quoted_final_is_unquoted(reply: str, answer: str) -> None:
    parsed = parse_reply(reply)
    assert parsed.final is not None and parsed.final.answer == answer


def test_multi_line_final_stops_at_the_next_fence() -> None:
    reply = "FINAL(the answer\nis here)\n" + repl("x = (1)")
    parsed = parse_reply(reply)
    assert parsed.final is not None and parsed.final.answer == "the answer\nis here"
    assert parsed.repl_blocks == ["x = (1)"]


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("FINAL(42) is my answer", "42"),
        ("FINAL(first line\nsecond line)\n\nI read section (3) of the text (twice).", "first line\nsecond line"),
        ("FINAL(a (nested) answer\nover two lines)\nSee (a) and (b) above.", "a (nested) answer\nover two lines"),
        ('FINAL("42") is my answer (final)', "42"),
        ('FINAL("a)b")', "a)b"),
        ("FINAL(Steps:\n1) do x\n2) do y)", "Steps:\n1) do x\n2) do y"),
        ("FINAL(The options are (a)\nand (b))", "The options are (a)\nand (b)"),
    ],
)
def test_final_ends_at_its_balanced_closing_paren(reply: str, answer: str) -> None:
    """Prose after the answer, even with parentheses of its own on later lines, is not the answer."""
    parsed = parse_reply(reply)
    assert parsed.final is not None and parsed.final.answer == answer
    assert parsed.problems == []


# -- FINAL_VAR ---------------------------------------------------------------------------


@pytest.mark.parametrize("reply", ["FINAL_VAR(result)", 'FINAL_VAR("result")', "FINAL_VAR('result')", "FINAL_VAR( result )"])
def test_final_var_names_a_variable(reply: str) -> None:
    parsed = parse_reply("Answer below.\n" + reply)
    assert parsed.final is not None
    assert parsed.final.kind == "FINAL_VAR"
    assert parsed.final.variable == "result"
    assert parsed.final.answer is None
    assert parsed.problems == []


@pytest.mark.parametrize("name", ["my answer", "x.y", "1abc", "a-b", ""])
def test_final_var_with_a_non_identifier_is_a_problem(name: str) -> None:
    parsed = parse_reply(f"FINAL_VAR({name})")
    assert parsed.final is None
    assert len(parsed.problems) == 1
    assert "not a variable name" in parsed.problems[0]
    assert "FINAL(" in parsed.problems[0]  # says how to answer with text instead


def test_final_var_without_closing_paren_is_a_problem() -> None:
    parsed = parse_reply("FINAL_VAR(answer")
    assert parsed.final is None
    assert len(parsed.problems) == 1 and "closing parenthesis" in parsed.problems[0]


# -- malformed FINAL ---------------------------------------------------------------------


@pytest.mark.parametrize("reply", ["FINAL()", "FINAL(   )", 'FINAL("")', "FINAL(\n\n)"])
def test_empty_final_is_a_problem(reply: str) -> None:
    parsed = parse_reply(reply)
    assert parsed.final is None
    assert len(parsed.problems) == 1
    assert "empty" in parsed.problems[0]


def test_final_without_closing_paren_is_a_problem() -> None:
    parsed = parse_reply("FINAL(the answer is 42\nand that is all")
    assert parsed.final is None
    assert len(parsed.problems) == 1
    assert "closing parenthesis" in parsed.problems[0]


# -- fences ------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["python", "text", ""])
def test_final_inside_a_non_repl_fence_is_not_an_answer(lang: str) -> None:
    parsed = parse_reply(f"Let me answer.\n{FENCE}{lang}\nFINAL(42)\n{FENCE}")
    assert parsed.final is None
    assert parsed.repl_blocks == []
    assert len(parsed.problems) == 1
    assert "inside" in parsed.problems[0] and "not" in parsed.problems[0]


def test_final_var_inside_a_tilde_python_fence_is_not_an_answer() -> None:
    parsed = parse_reply("~~~python\nFINAL_VAR(result)\n~~~")
    assert parsed.final is None
    assert len(parsed.problems) == 1 and "inside" in parsed.problems[0]


def test_final_inside_a_repl_fence_is_code_not_a_final_line() -> None:
    parsed = parse_reply(repl("FINAL(42)"))
    assert parsed.final is None
    assert parsed.problems == []
    assert parsed.repl_blocks == ["FINAL(42)"]


@pytest.mark.parametrize("lang", ["python", "py", "python3", ""])
def test_python_blocks_are_not_run_and_the_model_is_told(lang: str) -> None:
    parsed = parse_reply("Let me look.\n" + repl("print(len(context))", lang=lang))
    assert parsed.repl_blocks == []
    assert len(parsed.problems) == 1
    assert "not run" in parsed.problems[0] and "```repl" in parsed.problems[0]


def test_non_code_fence_is_neither_run_nor_a_problem() -> None:
    parsed = parse_reply("The record looks like:\n" + repl("name: Ada", lang="text"))
    assert parsed.repl_blocks == []
    assert parsed.problems == []


def test_repl_fence_info_string_is_case_insensitive() -> None:
    parsed = parse_reply(repl("x = 1", lang="REPL"))
    assert parsed.repl_blocks == ["x = 1"]


def test_several_repl_blocks_are_kept_in_order() -> None:
    reply = "\n".join(
        ["First:", repl("a = 1"), "Then:", repl("b = a + 1\nprint(b)"), "And:", repl("c = b * 10")]
    )
    parsed = parse_reply(reply)
    assert parsed.repl_blocks == ["a = 1", "b = a + 1\nprint(b)", "c = b * 10"]
    assert parsed.final is None and parsed.problems == []


def test_repl_blocks_and_a_final_line_in_one_reply() -> None:
    reply = repl("result = 'done'") + "\nFINAL_VAR(result)"
    parsed = parse_reply(reply)
    assert parsed.repl_blocks == ["result = 'done'"]
    assert parsed.final is not None and parsed.final.variable == "result"


def test_empty_repl_block_is_not_run() -> None:
    parsed = parse_reply(repl("   "))
    assert parsed.repl_blocks == []


def test_unclosed_repl_fence_runs_to_the_end_of_the_reply() -> None:
    parsed = parse_reply("Let me check.\n```repl\nx = len(context)\nprint(x)")
    assert parsed.repl_blocks == ["x = len(context)\nprint(x)"]
    assert parsed.final is None and parsed.problems == []


def test_final_line_after_an_unclosed_repl_fence_is_code() -> None:
    parsed = parse_reply("```repl\nx = 1\nFINAL(x)")
    assert parsed.final is None
    assert parsed.repl_blocks == ["x = 1\nFINAL(x)"]


def test_longer_fence_is_closed_only_by_as_long_a_fence() -> None:
    parsed = parse_reply("````repl\nprint('```')\n```\nstill code\n````\nFINAL(ok)")
    assert parsed.repl_blocks == ["print('```')\n```\nstill code"]
    assert parsed.final is not None and parsed.final.answer == "ok"


# -- empty and missing replies -----------------------------------------------------------


@pytest.mark.parametrize("reply", [None, "", "   \n\n"])
def test_empty_or_missing_content_parses_to_nothing(reply: str | None) -> None:
    parsed = parse_reply(reply)
    assert parsed == ParsedReply()


def test_prose_only_reply_has_no_code_no_final_no_problem() -> None:
    parsed = parse_reply("I think the answer is probably in the second half.")
    assert parsed == ParsedReply()
