"""`rlm bench` end to end against a fake OpenAI-compatible server on 127.0.0.1 whose "models"
are scripted: they prove the plumbing (tasks, methods, sandbox, sub-calls, scoring, resume,
report, plot), and claim nothing about quality."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rlm.bench import Models, RunSettings, TaskSpec, build_task, run_bench, unavailable_reason
from rlm.bench.plot import PlotUnavailable, plot_summary
from rlm.bench.report import percentile, summarize
from rlm.bench.runner import load_results
from rlm.bench.scoring import score
from rlm.cli.main import app
from rlm.errors import ConfigError
from rlm.testing import FakeOpenAIServer, ScriptedModel
from test_bench_generators import infer_label

FENCE = "```"
SNIAH = ["run", "-b", "sniah", "-l", "1k,4k", "-n", "2", "-m", "base,rlm-depth0,rlm,rlm-depth2", "-j", "3",
         "--context-window", "4096", "--sandbox", "inprocess", "--max-iterations", "3"]


def _code(body: str) -> str:
    return f"{FENCE}repl\n{body}\n{FENCE}"


def _root(messages: list[dict], gold: dict[str, Any]) -> str:
    """The scripted root model: one block of code that answers, or gives up on a later turn."""
    if len(messages) > 2:
        return "FINAL(gave up)"
    question = messages[1]["content"]
    sub_calls = "llm_query" in messages[0]["content"]
    if key := re.search(r"special magic number for ([\w-]+)", question):
        if not sub_calls:
            return _code(f"import re\nFINAL(re.search(r'for {key.group(1)} is: (\\d+)', context).group(1))")
        return _code(
            "pieces = [context[i:i + 1500] for i in range(0, len(context), 1400)]\n"
            f"replies = llm_query_batched(['KEY={key.group(1)}\\n' + piece for piece in pieces])\n"
            "FINAL([r for r in replies if r != 'none'][0])"
        )
    if "Find all pairs" in question:
        pairs = next(answer for q, answer in gold.items() if q in question)
        return "FINAL([])" if not sub_calls else "FINAL(" + " ".join(f"({a}, {b})" for a, b in pairs) + ")"
    if not sub_calls:
        return "FINAL(0)"
    label = re.findall(r"category '([^']+)'", question)[-1]
    return _code(
        "instances = [line.split(' || Instance: ')[1] for line in context.split('\\n')]\n"
        "labels = llm_query_batched(['CLASSIFY ' + text for text in instances])\n"
        f"FINAL(str(labels.count({label!r})))"
    )


def _sub(prompt: str) -> str:
    if prompt.startswith("KEY="):
        key, _, text = prompt[4:].partition("\n")
        found = re.search(rf"for {re.escape(key)} is: (\d+)", text)
        return found.group(1) if found else "none"
    if prompt.startswith("CLASSIFY "):
        return infer_label(prompt.removeprefix("CLASSIFY "))
    return "?"


def scripted_models(gold: dict[str, Any] | None = None):
    """A responder for FakeOpenAIServer: root loop, base calls and sub-calls told apart by their first message."""

    def respond(request: dict) -> str:
        messages = request["messages"]
        if messages[0]["role"] == "system":
            return _root(messages, gold or {})
        prompt = messages[0]["content"]
        if prompt.startswith("Here is a context:"):
            number = re.search(r"is: (\d{7})\.", prompt)
            return number.group(1) if number else "I do not know"
        return _sub(prompt)

    return respond


def invoke(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, ["bench", *args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def server():
    with FakeOpenAIServer(responder=scripted_models(), models=["fake-model"]) as fake:
        yield fake


def test_bench_run_end_to_end(server: FakeOpenAIServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(*SNIAH, "--api-url", server.url, "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert "## sniah" in result.stdout and "| rlm | 4k | 2 | 1.000 |" in result.stdout
    results = load_results(out)
    assert len(results) == 2 * 2 * 4
    for row in results:
        assert row["status"] == "answered", row
        assert row["root_model"] == "fake-model"
        assert Path(row["trajectory"]).exists()
        first_event = json.loads(Path(row["trajectory"]).read_text().splitlines()[0])
        assert first_event["type"] == "run_start"
        assert row["score"] == score("substring", row["answer"], row["expected"])
        if row["method"].startswith("rlm"):
            assert row["score"] == 1.0
        assert (row["sub_calls"] > 0) == (row["method"] in ("rlm", "rlm-depth2"))
        assert row["input_tokens"] > 0 and row["cost"] == 0.0  # a loopback server costs nothing
    base = {row["length"]: row for row in results if row["method"] == "base"}
    assert base[1024]["truncated"] is False and base[1024]["score"] == 1.0
    assert base[4096]["truncated"] is True and base[4096]["kept_chars"] < base[4096]["context_chars"]
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["method"], r["length"]) for r in summary["rows"]} == {
        (m, n) for m in ("base", "rlm-depth0", "rlm", "rlm-depth2") for n in (1024, 4096)
    }
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[16/16]" in result.stderr


def test_oolong_and_pairs_are_scored_with_their_own_rules(tmp_path: Path) -> None:
    specs = [TaskSpec("oolong", 1024, 0, 0), TaskSpec("oolong-pairs", 1024, 0, 0)]
    gold = {build_task(spec).question.split("\n\n")[-1]: build_task(spec).answer for spec in specs}
    with FakeOpenAIServer(responder=scripted_models(gold)) as fake:
        result = invoke("run", "-b", "oolong,oolong-pairs", "-l", "1k", "-n", "1", "-m", "rlm-depth0,rlm",
                        "--sandbox", "inprocess", "--no-plot", "--api-url", fake.url, "--out", str(tmp_path))
    assert result.exit_code == 0, result.stderr
    rows = {(r["benchmark"], r["method"]): r for r in load_results(tmp_path)}
    count = build_task(specs[0])
    assert count.meta["question_type"] == "count_label"
    assert rows["oolong", "rlm"]["answer"] == count.answer and rows["oolong", "rlm"]["score"] == 1.0
    assert rows["oolong", "rlm"]["sub_calls"] == count.meta["records"]
    assert rows["oolong", "rlm-depth0"]["score"] == pytest.approx(0.75 ** int(count.answer))
    assert rows["oolong-pairs", "rlm"]["score"] == 1.0
    assert rows["oolong-pairs", "rlm-depth0"]["score"] == (1.0 if not build_task(specs[1]).answer else 0.0)
    assert not (tmp_path / "plot.png").exists()


def test_a_finished_run_is_not_run_again(server: FakeOpenAIServer, tmp_path: Path) -> None:
    args = (*SNIAH, "--no-plot", "--api-url", server.url, "--out", str(tmp_path))
    assert invoke(*args).exit_code == 0
    requests, lines = len(server.chat_requests()), (tmp_path / "results.jsonl").read_text()
    again = invoke(*args)
    assert again.exit_code == 0
    assert "16 run(s) already done, 0 to go" in again.stderr
    assert len(server.chat_requests()) == requests
    assert (tmp_path / "results.jsonl").read_text() == lines


def test_an_interrupted_run_resumes_where_it_stopped(server: FakeOpenAIServer, tmp_path: Path) -> None:
    args = (*SNIAH, "--no-plot", "--api-url", server.url, "--out", str(tmp_path))
    assert invoke(*args).exit_code == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    failed = json.loads(lines[1]) | {"status": "error", "error": "EndpointUnreachable: down"}
    # As if killed: five runs saved, one of them failed, and half a line written.
    (tmp_path / "results.jsonl").write_text("".join(lines[:1] + [json.dumps(failed) + "\n"] + lines[2:5]) + lines[5][:40])
    again = invoke(*args)
    assert "4 run(s) already done, 12 to go" in again.stderr
    latest = {row["key"]: row for row in load_results(tmp_path)}
    assert len(latest) == 16 and all(row["status"] == "answered" for row in latest.values())


def test_other_settings_in_the_same_folder_are_refused(server: FakeOpenAIServer, tmp_path: Path) -> None:
    args = ("run", "-l", "1k", "-n", "1", "-m", "rlm", "--no-plot", "--sandbox", "inprocess",
            "--api-url", server.url, "--out", str(tmp_path))
    assert invoke(*args).exit_code == 0
    other = invoke(*args, "--max-iterations", "7")
    assert other.exit_code == 2
    assert "--max-iterations" in other.stderr and "use another --out" in other.stderr


def test_unreachable_endpoint_fails_before_any_run(tmp_path: Path) -> None:
    result = invoke("run", "-l", "1k", "-n", "1", "--no-plot", "--max-retries", "0", "--api-url", "http://127.0.0.1:9/v1",
                    "--out", str(tmp_path))
    assert result.exit_code == 3
    assert "127.0.0.1:9" in result.stderr
    assert load_results(tmp_path) == []


def test_base_without_a_known_window_says_how_to_give_it(server: FakeOpenAIServer, tmp_path: Path) -> None:
    result = invoke("run", "-l", "1k", "-n", "1", "-m", "base", "--no-plot", "--api-url", server.url,
                    "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "--context-window" in result.stderr


def test_missing_matplotlib_names_the_extra(server: FakeOpenAIServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = invoke("run", "-l", "1k", "-n", "1", "-m", "rlm", "--api-url", server.url, "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "pip install 'rlm[bench]'" in result.stderr and "--no-plot" in result.stderr
    with pytest.raises(PlotUnavailable, match=r"pip install 'rlm\[bench\]'"):
        plot_summary([{"benchmark": "sniah", "method": "rlm", "length": 1024, "accuracy": 1.0}], tmp_path / "p.png")


class _OlderRLM:
    """Stands in for an RLM_REPL that predates recursion: it refuses max_depth=2."""

    def __init__(self, *args: Any, max_depth: int = 1, **kwargs: Any) -> None:
        if max_depth > 1:
            raise ConfigError(f"max_depth must be 0 (no sub-calls) or 1 (sub-calls to the sub-model), got {max_depth}")

    def __enter__(self) -> "_OlderRLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def test_depth2_is_listed_but_refused_clearly_when_rlm_repl_does_not_accept_it(monkeypatch, tmp_path: Path) -> None:
    assert unavailable_reason("rlm-depth2") is None  # this version accepts it
    monkeypatch.setattr("rlm.rlm_repl.RLM_REPL", _OlderRLM)
    reason = unavailable_reason("rlm-depth2")
    assert reason is not None and "needs RLM_REPL(max_depth=2)" in reason
    listing = invoke("methods")
    assert "rlm-depth2" in listing.stdout and "[unavailable: rlm-depth2 needs RLM_REPL(max_depth=2)" in listing.stdout
    refused = invoke("run", "-m", "rlm,rlm-depth2", "--no-plot", "--api-url", "http://127.0.0.1:9/v1",
                     "--out", str(tmp_path))
    assert refused.exit_code == 2 and "needs RLM_REPL(max_depth=2)" in refused.stderr


def test_run_bench_from_python_with_scripted_clients(tmp_path: Path) -> None:
    respond = scripted_models()
    root = ScriptedModel(lambda messages: respond({"messages": messages}), model="root-model")
    sub = ScriptedModel(lambda messages: respond({"messages": messages}), model="sub-model")
    seen: list[tuple[int, int]] = []
    new = run_bench([TaskSpec("sniah", 1024, 3, 0)], ["rlm"], Models.fixed(root, sub),
                    RunSettings(sandbox="inprocess"), tmp_path, on_plan=lambda n, d: seen.append((n, d)))
    assert seen == [(1, 0)]
    assert [(r["method"], r["score"], r["root_model"], r["sub_model"]) for r in new] == [("rlm", 1.0, "root-model", "sub-model")]
    assert len(sub.requests) == new[0]["sub_calls"] > 0


def test_summary_statistics() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 95) == 5.0
    assert percentile([1.0, 2.0], 50) == 1.0
    rows = [
        {"key": f"k{i}", "benchmark": "sniah", "method": "rlm", "length": 1024, "status": status, "score": s,
         "cost": cost, "input_tokens": 10, "output_tokens": 5, "wall_time": w, "sub_calls": 2, "turns": 1}
        for i, (status, s, cost, w) in enumerate([("answered", 1.0, 0.01, 1.0), ("answered", 0.5, 0.03, 3.0),
                                                   ("error", 0.0, 0.02, 2.0)])
    ]
    (row,) = summarize(rows)
    assert row["accuracy"] == 0.5 and row["errors"] == 1 and row["runs"] == 3
    assert row["cost_mean"] == pytest.approx(0.02) and row["cost_median"] == 0.02 and row["cost_p95"] == 0.03
    (unknown,) = summarize([*rows[:2], rows[2] | {"cost": None}])
    assert unknown["cost_mean"] is None  # an unpriced run makes the cost unknown, never zero
    (retried,) = summarize([*rows, rows[2] | {"status": "answered", "score": 1.0}])
    assert retried["runs"] == 3 and retried["errors"] == 0
