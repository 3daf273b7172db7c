"""`rlm.batch`'s input and answers file: every line checked before anything runs, a torn last
line repaired, answers of another input or other options refused. No model is called here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlm.batch import LIMITS, read_input
from rlm.batch.options import check_options, recorded, rlm_arguments
from rlm.batch.results import FIELDS, ResultsFile
from rlm.errors import ConfigError


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def refused(items: object, *fragments: str) -> str:
    with pytest.raises(ConfigError) as caught:
        read_input(items)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    return str(caught.value)


def test_a_file_of_items_is_checked_and_indexed(tmp_path):
    (tmp_path / "docs").mkdir()
    path = tmp_path / "q.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": "a", "query": "q1", "context": "text"}\n\n'
        + json.dumps({"id": 7, "query": "q2", "context": ["x", "y"], "max_iterations": 3, "meta": {"k": 1}}).encode()
        + b"\n   \n" + json.dumps({"id": "c", "query": "q3", "context_path": "docs/c.txt", "model": "m"}).encode()
    )
    batch = read_input(path)
    assert batch.keys() == ["a", "7", "c"] and len(batch) == 3 and "7" in batch
    first, second, third = (batch.load(key) for key in batch.keys())
    assert (first.id, first.query, first.context, first.options) == ("a", "q1", "text", {})
    assert (second.id, second.context, second.options) == (7, ["x", "y"], {"max_iterations": 3})
    assert third.context_path == str(tmp_path / "docs" / "c.txt") and third.options == {"model": "m"}


def test_the_fingerprint_is_the_set_of_items_not_their_order_or_spacing(tmp_path):
    one = {"id": "a", "query": "q", "context": "c"}
    two = {"id": "b", "query": "r", "context_path": "/x"}
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text(json.dumps(two, indent=None, separators=(" ,", " : ")) + "\n" + json.dumps(one) + "\n")
    fingerprint = read_input([one, two]).fingerprint
    assert read_input(write_lines(tmp_path / "q.jsonl", one, two)).fingerprint == fingerprint
    assert read_input(spaced).fingerprint == fingerprint
    assert read_input([one, {**two, "query": "other"}]).fingerprint != fingerprint


@pytest.mark.parametrize("line, fragments", [
    ("not json", ["line 2", "is not JSON"]),
    ("[1, 2]", ["line 2", "not an object"]),
    ({"query": "q", "context": "c"}, ["line 2", "id must be"]),
    ({"id": True, "query": "q", "context": "c"}, ["id must be"]),
    ({"id": "", "query": "q", "context": "c"}, ["id must be"]),
    ({"id": "x" * 300, "query": "q", "context": "c"}, ["at most 256"]),
    ({"id": "b", "context": "c"}, ["query must be"]),
    ({"id": "b", "query": "  ", "context": "c"}, ["query must be"]),
    ({"id": "b", "query": "q"}, ["either inline", "context_path"]),
    ({"id": "b", "query": "q", "context": "c", "context_path": "p"}, ["either inline"]),
    ({"id": "b", "query": "q", "context": 5}, ["context must be a string, a list or an object"]),
    ({"id": "b", "query": "q", "context_path": ""}, ["context_path must be"]),
    ({"id": "b", "query": "q", "context_path": "a\u0000b"}, ["context_path must be"]),
    ({"id": "b", "query": "q", "context": "c", "answer": 1}, ["unknown field 'answer'", "meta"]),
    ({"id": "b", "query": "q", "context": "c", "max_iterations": 0}, ["max_iterations must be a whole number"]),
    ({"id": "b", "query": "q", "context": "c", "model": ""}, ["model must be"]),
    ({"id": "b", "query": "q", "context": "c", "max_cost": -1}, ["max_cost must be a number above 0"]),
    ({"id": "b", "query": "q", "context": "c", "sandbox": "inprocess"}, ["unknown field 'sandbox'"]),
    ({"id": "a", "query": "q", "context": "c"}, ["id 'a' of line 2 is already the id of line 1"]),
    ('{"id": "b", "query": "\\ud800", "context": "c"}', ["query must be"]),
    ('{"id": "b", "query": "q", "context": "\\udfff"}', ["lone surrogate"]),
])
def test_a_bad_line_is_refused_with_its_number(tmp_path, line, fragments):
    path = write_lines(tmp_path / "q.jsonl", {"id": "a", "query": "q", "context": "c"}, line)
    refused(path, str(path), *fragments)


def test_ids_seven_and_quoted_seven_are_the_same_id():
    refused([{"id": 7, "query": "q", "context": "c"}, {"id": "7", "query": "q", "context": "c"}],
            "id '7' of item 1 is already the id of item 0")


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"id": "a", "query": "caf\xe9", "context": "c"}\n')
    refused(path, "line 1 is not UTF-8 text")


def test_a_line_past_the_cap_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setitem(LIMITS, "line_bytes", 100)
    path = write_lines(tmp_path / "q.jsonl", {"id": "a", "query": "q", "context": "c" * 200})
    refused(path, "line 1 is longer than", "context_path")


def test_too_many_items_and_no_items_are_refused(tmp_path, monkeypatch):
    refused(write_lines(tmp_path / "empty.jsonl", "", "  "), "holds no items")
    monkeypatch.setitem(LIMITS, "items", 2)
    refused([{"id": i, "query": "q", "context": "c"} for i in range(3)], "at most 2 items")


def test_a_path_that_is_not_a_file_and_stdin_are_refused(tmp_path):
    refused(tmp_path / "missing.jsonl", "does not exist")
    refused(tmp_path, "does not exist or is not a file")
    refused("-", "reads its questions from a file")
    refused({"id": "a"}, "list of dicts")
    refused(["not a dict"], "item 0 is a str")


def test_an_input_file_edited_during_the_batch_is_noticed(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", {"id": "a", "query": "q1", "context": "c"},
                       {"id": "b", "query": "q2", "context": "c"})
    batch = read_input(path)
    write_lines(path, {"id": "a", "query": "q1", "context": "c"}, {"id": "b", "query": "q9", "context": "c"})
    assert batch.load("a").query == "q1"
    with pytest.raises(ConfigError, match="line 2 changed while the batch ran"):
        batch.load("b")


def test_options_are_checked_against_one_table():
    assert check_options({"max_iterations": 3, "sandbox": "inprocess"}, where="options") == {
        "max_iterations": 3, "sandbox": "inprocess"}
    with pytest.raises(ConfigError, match="options: unknown option 'max_iteration'"):
        check_options({"max_iteration": 3}, where="options")
    with pytest.raises(ConfigError, match="sandbox must be one of auto"):
        check_options({"sandbox": "docker"}, where="options")
    with pytest.raises(ConfigError, match="max_time must be a number above 0"):
        check_options({"max_time": float("inf")}, where="options")
    arguments = rlm_arguments({"model": "m", "sub_model": "s", "max_cost": 1.0}, {"max_cost": None, "model": "n"})
    assert arguments == {"model": "n", "recursive_model": "s", "max_cost": None}


def test_recorded_options_fill_in_defaults_and_leave_out_where_and_how_fast():
    plain = recorded({})
    assert recorded({"max_iterations": 20, "api_url": "http://127.0.0.1:1/v1", "max_retries": 0}) == plain
    assert plain["max_iterations"] == 20 and plain["model"] == "auto" and "api_url" not in plain
    assert recorded({"max_iterations": 3})["max_iterations"] == 3


# -- the answers file ---------------------------------------------------------------------------


def result(item_id: object, status: str = "final") -> dict:
    return {"id": item_id, "answer": "x", "status": status, "usage": {"total_cost": 0.5, "cost_complete": True},
            "wall_time": 1.0, "trajectory": None, "error": "boom" if status == "error" else None}


def test_results_are_whole_lines_of_the_documented_fields(tmp_path):
    path = tmp_path / "a.jsonl"
    with ResultsFile(path) as results:
        results.append({**result("a"), "extra": 1})
        results.append(result(7, "error"))
        existing = results.read({"a", "7"})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [tuple(line) for line in lines] == [FIELDS, FIELDS]
    assert existing.latest == {"a": "final", "7": "error"} and existing.finished == {"a"}
    assert existing.errors == {"7": "boom"} and existing.cost == 1.0 and existing.lines == 2


def test_an_answer_with_a_lone_surrogate_is_written_as_its_json_escape(tmp_path):
    path = tmp_path / "a.jsonl"
    with ResultsFile(path) as results:
        results.append({**result("a"), "answer": "x\ud800y"})
    assert b"x\\ud800y" in path.read_bytes()
    assert json.loads(path.read_text(encoding="utf-8"))["answer"] == "x\ud800y"


@pytest.mark.parametrize("tail", [b'{"id": "c", "answer": "half', b'{"id": "c"}\n', b"\x00\x00\x00\n"])
def test_a_torn_last_line_is_cut_before_anything_is_appended(tmp_path, tail):
    path = tmp_path / "a.jsonl"
    whole = (json.dumps(result("a")) + "\n").encode()
    path.write_bytes(whole + tail)
    with ResultsFile(path) as results:
        existing = results.read({"a", "c"})
        results.append(result("c"))
    assert existing.repaired_bytes == len(tail) and existing.finished == {"a"}
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_a_bad_line_before_the_last_is_refused_not_repaired(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("garbage\n" + json.dumps(result("a")) + "\n")
    with ResultsFile(path) as results, pytest.raises(ConfigError, match="line 1 of .* is not a result"):
        results.read({"a"})
    path.write_text(json.dumps(result("zz")) + "\n")
    with ResultsFile(path) as results, pytest.raises(ConfigError, match="answers id 'zz', which the input does not"):
        results.read({"a"})


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "a.jsonl"
    with ResultsFile(path):
        with pytest.raises(ConfigError, match="another batch is writing to"):
            ResultsFile(path).__enter__()
    with ResultsFile(path):  # the lock went with the first
        pass
    with pytest.raises(ConfigError, match="is a folder"):
        ResultsFile(tmp_path).__enter__()


def test_answers_of_another_input_or_other_options_are_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    manifest = {"input": {"source": "q.jsonl", "items": 2, "fingerprint": "f1"}, "options": recorded({})}
    with ResultsFile(path) as results:
        results.check_manifest(manifest, has_results=False)
        results.append(result("a"))
    with ResultsFile(path) as results:
        results.check_manifest(manifest, has_results=True)  # the same: accepted
        other_input = {**manifest, "input": {"source": "r.jsonl", "items": 3, "fingerprint": "f2"}}
        with pytest.raises(ConfigError, match=r"from another input \(q.jsonl, 2 items; now r.jsonl, 3 items\)"):
            results.check_manifest(other_input, has_results=True)
        other_options = {**manifest, "options": recorded({"max_iterations": 3, "model": "x"})}
        with pytest.raises(ConfigError, match=r"max_iterations 20 \(now 3\), model 'auto' \(now 'x'\)"):
            results.check_manifest(other_options, has_results=True)
        results.manifest_path.unlink()
        with pytest.raises(ConfigError, match="is missing"):
            results.check_manifest(manifest, has_results=True)


def test_ray_task_resources_are_checked_and_must_fit_a_local_ray():
    from rlm.batch.cluster import TaskResources, _check_fits

    for wrong in ({"cpus": 0}, {"cpus": True}, {"memory": 10}, {"memory": 1.5e9}, {"retries": -1}):
        with pytest.raises(ConfigError, match="task"):
            TaskResources(**wrong)
    _check_fits({"CPU": 2.0, "memory": 8 * 2**30}, TaskResources(cpus=2, memory=8 * 2**30))
    with pytest.raises(ConfigError, match="lower --task-cpus or --task-memory"):
        _check_fits({"CPU": 2.0, "memory": 8 * 2**30}, TaskResources(memory=9 * 2**30))
