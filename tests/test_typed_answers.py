"""Typed answers: `completion(..., schema=...)` validates FINAL / FINAL_VAR through the real worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from helpers import last_user, make, repl, run_readme_example
from rlm.cli.exits import ExitCode
from rlm.cli.main import app
from rlm.errors import ConfigError
from rlm.schema import AnswerSchema
from rlm.testing import FakeOpenAIServer

LEVELS = ["subprocess", "strict", "bwrap"]
BOOK = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer", "minimum": 0}},
    "required": ["title", "year"],
    "additionalProperties": False,
}


class Book(BaseModel):
    title: str
    year: int


@pytest.mark.parametrize("level", LEVELS)
def test_a_pydantic_schema_refuses_a_bad_final_then_returns_the_instance(level: str) -> None:
    rlm, root, _ = make(
        ['FINAL({"title": "Emma"})', repl("book = {'title': 'Emma', 'year': 1815}"), "FINAL_VAR(book)"],
        sandbox=level,
    )
    answer = rlm.completion(context="c", query="Which book?", schema=Book)
    assert answer == Book(title="Emma", year=1815)
    assert '"required":["title","year"]' in root.requests[0][-1]["content"]  # the schema is in the first turn
    refusal = last_user(root.requests[1])
    assert "does not match the required JSON schema" in refusal and "year: Field required" in refusal


@pytest.mark.parametrize("level", LEVELS)
def test_a_dict_schema_returns_the_validated_dict_from_final_in_code(level: str) -> None:
    rlm, root, _ = make(
        [repl("FINAL({'title': 'Emma', 'year': -3})"), repl("FINAL({'title': 'Emma', 'year': 1815})")],
        sandbox=level,
    )
    assert rlm.completion(context="c", query="q", schema=BOOK) == {"title": "Emma", "year": 1815}
    assert "$.year: -3 is below minimum 0" in last_user(root.requests[1])


def test_refusals_are_bounded_by_max_iterations_and_run_says_so() -> None:
    rlm, root, _ = make(['FINAL("not json")'] * 3, max_iterations=3, sandbox="subprocess")
    result = rlm.run(context="c", query="q", schema=BOOK)
    assert result.status == "max_iterations" and result.answer is None and len(root.requests) == 3
    assert "not JSON" in last_user(root.requests[2])


def test_run_returns_the_validated_object_as_the_answer() -> None:
    rlm, _, _ = make(['FINAL({"title": "Emma", "year": 1815})'], sandbox="subprocess")
    result = rlm.run(context="c", query="q", schema=Book)
    assert result.status == "final" and result.answer == Book(title="Emma", year=1815)


def test_without_a_schema_the_answer_stays_text() -> None:
    rlm, _, _ = make(['FINAL({"title": "Emma"})'])
    assert rlm.completion(context="c", query="q") == '{"title": "Emma"}'


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "anyOf": []}, "pass a pydantic model"),
    ({"type": "thing"}, "unknown type 'thing'"),
    ({"properties": {"a": {"pattern": "x"}}}, "'pattern'"),
    (str, "pydantic model class or a dict"),
    ("{}", "pydantic model class or a dict"),
])
def test_an_unsupported_schema_fails_before_any_request(schema: object, words: str) -> None:
    rlm, root, _ = make(["FINAL(x)"])
    with pytest.raises(ConfigError, match=words if words[0] != "'" else None) as caught:
        rlm.completion(context="c", query="q", schema=schema)
    assert words in str(caught.value) and root.requests == []


@pytest.mark.parametrize("value, problem", [
    ('{"title": "E", "year": 1.5}', "$.year: must be of type integer"),
    ('{"title": "E", "year": true}', "$.year: must be of type integer"),
    ('{"title": "E", "year": 1, "x": 1}', "unexpected field 'x'"),
    ('[1]', "$: must be of type object"),
])
def test_the_built_in_validator_names_the_path_and_the_rule(value: str, problem: str) -> None:
    checked, error = AnswerSchema(BOOK).check(value)
    assert checked is None and problem in error


def test_nested_arrays_enums_and_lengths_are_checked() -> None:
    schema = AnswerSchema({"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}})
    assert schema.check('["a", "b"]') == (["a", "b"], None)
    assert schema.check('```json\n["a"]\n```') == (["a"], None)  # a fenced JSON answer
    assert "$[1]: must be one of" in schema.check('["a", "c"]')[1]
    assert "above maxItems 2" in schema.check('["a", "a", "a"]')[1]


def test_cli_schema_prints_the_answer_as_json(tmp_path: Path) -> None:
    context, schema = tmp_path / "c.txt", tmp_path / "book.json"
    context.write_text("Emma, 1815", encoding="utf-8")
    schema.write_text(json.dumps(BOOK), encoding="utf-8")
    with FakeOpenAIServer(root=['FINAL({"title": "Emma", "year": 1815})']) as server:
        done = CliRunner().invoke(app, ["ask", "q", "-c", str(context), "--api-url", server.url, "--schema",
                                        str(schema), "--sandbox", "subprocess", "-q"])
    assert done.exit_code == ExitCode.ANSWERED, done.stderr
    assert json.loads(done.stdout) == {"title": "Emma", "year": 1815}


def test_cli_refuses_a_schema_file_that_is_not_json(tmp_path: Path) -> None:
    context, schema = tmp_path / "c.txt", tmp_path / "bad.json"
    context.write_text("text", encoding="utf-8")
    schema.write_text("{nope", encoding="utf-8")
    done = CliRunner().invoke(app, ["ask", "q", "-c", str(context), "--schema", str(schema), "-q"])
    assert done.exit_code == ExitCode.BAD_INPUT
    assert "is not JSON" in done.stderr



def test_the_readme_example_runs_offline_and_prints_what_it_says(tmp_path: Path) -> None:
    printed, expected = run_readme_example("### Typed answers", tmp_path)
    assert printed == expected


@pytest.mark.parametrize("schema, words", [
    ({"properties": []}, "'properties' must be an object"),
    ({"type": 3}, "'type' must be a type name or a list of them"),
    ({"required": "title"}, "'required' must be a list"),
    ({"const": {1, 2}}, "must be JSON itself"),
])
def test_a_malformed_dict_schema_is_refused_when_the_call_is_made(schema: dict, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AnswerSchema(schema)
    assert words in str(caught.value)
