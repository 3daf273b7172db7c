"""The HTML page, without a browser: self-contained, inert data, shared texts, the timeline;
and the `rlm view` / `rlm runs` / `rlm ask --keep-logs` commands."""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from big_run import write_big_run
from helpers import make, repl
from rlm.cli.exits import ExitCode
from rlm.cli.main import app
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer
from rlm.trajectory import load
from rlm.viewer import render_html, write_html
from rlm.viewer.model import page_data
from rlm.viewer.timeline import merge, timeline

RECORDING = Path(__file__).parent / "data" / "recorded_run.jsonl"
ATTACK = "</script><script>document.title='owned'</script><!--"


def embedded(page: str) -> dict[str, Any]:
    match = re.search(r'<script id="rlm-data" type="application/json">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_the_page_is_self_contained() -> None:
    page = render_html(load(RECORDING))
    assert page.startswith("<!DOCTYPE html>")
    for external in ("<link", " src=", "@import", "url(", "http://", "https://", "//cdn"):
        assert external not in page, external
    assert "default-src 'none'" in page  # the browser itself refuses any request
    data = embedded(page)
    assert data["meta"]["status"] == "answered" and len(data["root"]["turns"]) == 4


def test_model_text_cannot_break_out_of_the_data_block(tmp_path: Path) -> None:
    rlm, _, _ = make([repl(f"print({ATTACK!r})"), f"FINAL({ATTACK})"], log_dir=str(tmp_path))
    rlm.completion(context="c", query="q")
    page = render_html(load(rlm.tracer.path))
    assert page.count("</script>") == 2 and ATTACK not in page
    texts = embedded(page)["texts"]
    assert ATTACK in texts and any(ATTACK in text for text in texts if text != ATTACK)


def test_texts_are_shared_across_the_tree(tmp_path: Path) -> None:
    code = "for _ in range(30):\n    llm_query('same prompt ' * 40)"
    rlm, _, _ = make([repl(code), "FINAL(ok)"], lambda m: "same reply " * 40, log_dir=str(tmp_path))
    rlm.completion(context="c", query="q")
    data = page_data(load(rlm.tracer.path))
    subs = data["root"]["turns"][0]["cells"][0]["subs"]
    assert len(subs) == 30 and sum(1 for s in subs if s["cache_hit"]) == 29
    assert len({s["prompt"] for s in subs}) == 1 and data["texts"].count("same prompt " * 40) == 1


def test_the_timeline_accounts_for_the_wall_time(tmp_path: Path) -> None:
    trajectory = load(write_big_run(tmp_path / "big.jsonl", turns=4, calls=600, latency=0.004))
    data = timeline(trajectory)
    lanes = {lane["name"]: lane["spans"] for lane in data["lanes"]}
    assert len(lanes["root model"]) == 4 and len(lanes["code"]) == 4 and len(lanes["child runs"]) == 0
    spans = lanes["sub-calls"]
    assert 0 < len(spans) <= 1500  # 2,400 separate calls, joined where closer than the page can show
    t0 = min(e["ts"] - e.get("latency", 0) - e.get("duration", 0) for e in trajectory.events if "ts" in e)
    starts = [span[0] for span in spans]
    for call in (e for e in trajectory.events if e["type"] == "sub_call"):
        start, end = call["ts"] - call["latency"] - t0, call["ts"] - t0
        covering = spans[bisect.bisect_right(starts, start + 1e-5) - 1]  # every call lies inside a span
        assert covering[0] - 1e-5 <= start and end <= covering[1] + 1e-5
    parts = {part["name"]: part["seconds"] for part in data["breakdown"]}
    assert parts["root model"] == pytest.approx(4 * 1.5)
    assert sum(parts.values()) == pytest.approx(data["wall"], rel=1e-6)
    assert lanes["root model"][0][3] == "r0.t1" and lanes["code"][1][3] == "r0.t2.c2"  # click targets


def test_merge_joins_overlapping_and_close_spans() -> None:
    assert merge([(0, 1), (0.5, 2), (3, 4)]) == [(0, 2), (3, 4)]
    assert merge([(0, 1), (1.05, 2)], gap=0.1) == [(0, 2)]


# -- the commands ---------------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stderr
    return result


def keep_runs(log_dir: Path, *questions: str) -> list[Path]:
    paths = []
    for question in questions:
        rlm, _, _ = make([repl("print(llm_query('x'))"), f"FINAL(answer to {question})"], log_dir=str(log_dir))
        rlm.completion(context="c", query=question)
        paths.append(rlm.tracer.path)
    return paths


def test_rlm_runs_lists_the_newest_first(tmp_path: Path) -> None:
    keep_runs(tmp_path, "first question", "second question")
    (tmp_path / "junk.jsonl").write_text("not a trajectory\n", encoding="utf-8")
    listing = invoke("runs", "--log-dir", str(tmp_path))
    assert listing.exit_code == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["WHEN", "STATUS", "TURNS", "SUBS", "COST", "QUESTION", "ANSWER"]
    assert "unreadable" in lines[1] and "second question" in lines[2] and "first question" in lines[3]
    assert re.search(r"answered\s+2\s+1\s+\$0\.0000\s+second question\s+answer to second question", lines[2])
    rows = [json.loads(line) for line in invoke("runs", "--log-dir", str(tmp_path), "--json").stdout.splitlines()]
    assert [row["status"] for row in rows] == ["unreadable", "answered", "answered"]
    assert rows[1]["turns"] == 2 and rows[1]["sub_calls"] == 1 and rows[1]["query"] == "second question"
    empty = invoke("runs", "--log-dir", str(tmp_path / "none"))
    assert empty.exit_code == 0 and "--keep-logs" in empty.stderr


def test_rlm_view_renders_a_file_or_the_latest_run(tmp_path: Path) -> None:
    first, latest = keep_runs(tmp_path / "logs", "older", "newer")
    named = invoke("view", str(first), "-o", str(tmp_path / "page.html"))
    assert named.exit_code == 0 and named.stdout.strip() == str(tmp_path / "page.html")
    assert embedded((tmp_path / "page.html").read_text(encoding="utf-8"))["meta"]["run_id"] == first.stem
    default = invoke("view", "--log-dir", str(tmp_path / "logs"))
    assert default.stdout.strip() == str(latest.with_suffix(".html")) and latest.with_suffix(".html").is_file()
    from_env = invoke("view", env={"RLM_LOG_DIR": str(tmp_path / "logs")})
    assert from_env.stdout.strip() == str(latest.with_suffix(".html"))
    assert invoke("view", "--log-dir", str(tmp_path / "empty")).exit_code == ExitCode.BAD_INPUT
    newer = tmp_path / "v9.jsonl"
    newer.write_text(json.dumps({"type": "run_start", "v": 9, "run_id": "x"}) + "\n", encoding="utf-8")
    refused = invoke("view", str(newer))
    assert refused.exit_code == ExitCode.BAD_INPUT and "version 9" in refused.stderr and "upgrade" in refused.stderr


def test_write_html_defaults_next_to_the_file(tmp_path: Path) -> None:
    (path,) = keep_runs(tmp_path, "q")
    assert write_html(path) == path.with_suffix(".html")


def test_ask_keep_logs_uses_the_user_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    context = tmp_path / "context.txt"
    context.write_text("some context", encoding="utf-8")
    with FakeOpenAIServer(root=["FINAL(kept)", "FINAL(not kept)"]) as server:
        options = ["--context", str(context), "--api-url", server.url, "--quiet", "--sandbox", "inprocess"]
        kept = invoke("ask", "q", *options, "--keep-logs")
        plain = invoke("ask", "q", *options)
    assert kept.stdout == "kept\n" and plain.stdout == "not kept\n"
    runs_dir = tmp_path / "data" / "rlm" / "runs"
    assert len(list(runs_dir.glob("*.jsonl"))) == 1  # only the run that asked to keep its log
    listing = invoke("runs")
    assert "kept" in listing.stdout and str(runs_dir) not in listing.stderr


# -- a run without an answer says why at the top ---------------------------------------------------


def test_a_failed_run_shows_its_error_at_the_top(tmp_path: Path) -> None:
    with FakeOpenAIServer(root=["FINAL(never)"], enforced_window=300) as server:
        with RLM_REPL("m", "m", api_url=server.url, sandbox="inprocess", max_reply_tokens=50,
                      log_dir=str(tmp_path)) as engine:
            assert engine.run(context="c", query="q").status == "error"
    data = embedded(render_html(load(engine.tracer.path)))
    meta, texts = data["meta"], data["texts"]
    assert meta["status"] == "error" and meta["reason"] is None  # the reason would only repeat the error
    assert texts[meta["error"]].startswith("ContextWindowExceeded: ") and "context window" in texts[meta["error"]]


def test_a_run_that_stopped_without_an_answer_shows_why_at_the_top(tmp_path: Path) -> None:
    rlm, _, _ = make([repl("x = 1")] * 4, log_dir=str(tmp_path))
    assert rlm.completion(context="c", query="q") is None
    data = page_data(load(rlm.tracer.path))
    meta, texts = data["meta"], data["texts"]
    assert meta["status"] == "no_progress" and meta["error"] is None
    assert "no progress in 3 replies in a row" in texts[meta["reason"]]
