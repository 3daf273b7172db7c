"""Batch throughput, here and on a local Ray, and a driver killed mid-run then restarted.

Run by hand:  python bench/batch.py [--items 200] [--concurrency 4] [--sandbox auto] [--repeat 1]

A fake OpenAI-compatible server runs in its own process (multiprocessing, spawn) and answers
every call after 100 ms. Each item is one RLM run of three calls: the root's first turn runs a
cell that makes one `llm_query`, the second turn answers with FINAL. Prints:
  a. the local path (`rlm.batch.run`, `--concurrency` items at once in this process): seconds
     and items per second;
  b. the same batch on a local Ray (2 CPUs here; each task declares 2/concurrency CPUs, so the
     same number run at once): the instance's start, then the batch on it, and the ratio of its
     throughput to (a) (target: at least 0.8). The first batch on a new instance (and every
     `rlm batch --ray`, a new Ray job) starts its Ray workers: each imports rlm and starts its
     sandbox machinery on its first item; with --repeat 2 the second batch shows warm workers;
  c. `rlm batch` as a subprocess killed with SIGKILL when about half the items are answered,
     then started again: how many lines each run wrote and whether every id is answered once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import rlm.batch
from rlm.batch.cluster import TaskResources, local_cluster
from rlm.testing import FakeOpenAIServer, FakeReply, is_root_request, message_text

FENCE = "```"
CALL_SECONDS = 0.1


def answer(request: dict) -> FakeReply:
    """The scripted model (module level: it runs in the server process)."""
    messages = request.get("messages")
    if not messages:  # a request cut short: the killed driver's connection closed mid-body
        return FakeReply(status=400, content="no messages")
    if not is_root_request(request):
        return FakeReply("a piece", delay=CALL_SECONDS)
    qid = re.search(r"QID-(\w+)", message_text(messages[1])).group(1)
    if not any(message["role"] == "assistant" for message in messages):
        return FakeReply(f"{FENCE}repl\nnote = llm_query(context[:200])\nprint(len(note))\n{FENCE}",
                         delay=CALL_SECONDS)
    return FakeReply(f"FINAL(answer {qid})", delay=CALL_SECONDS)


def _serve(connection: Any) -> None:
    sys.stderr = open(os.devnull, "w")  # the killed driver's connections reset: not news
    with FakeOpenAIServer(responder=answer) as server:
        connection.send(server.url)
        connection.recv()


class ServerProcess:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs,), daemon=True)
        self._process.start()
        self.url: str = self._connection.recv()

    def close(self) -> None:
        self._connection.send("stop")
        self._process.join(5)


def write_questions(path: Path, count: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            context = f"record {index}: " + "lorem ipsum dolor sit amet " * 80
            handle.write(json.dumps({"id": f"q{index}", "query": f"What is QID-q{index}?", "context": context}) + "\n")
    return path


def check(out: Path, count: int) -> tuple[int, int]:
    """(lines, ids answered exactly once) of an answers file."""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    finals = Counter(row["id"] for row in rows if row["status"] == "final")
    return len(rows), sum(1 for index in range(count) if finals[f"q{index}"] == 1)


def timed_batch(source: Path, out: Path, url: str, args: argparse.Namespace, ray: str | None) -> float:
    started = time.perf_counter()
    summary = rlm.batch.run(
        source, out=out, ray=ray, concurrency=args.concurrency, log_dir="",
        options={"api_url": url, "sandbox": args.sandbox},
        resources=TaskResources(cpus=2 / args.concurrency, memory=256 * 2**20),
    )
    elapsed = time.perf_counter() - started
    if not summary.complete or summary.answered != args.items:
        raise SystemExit(f"the batch did not answer every item: {summary}")
    return elapsed


def local_and_ray(folder: Path, url: str, args: argparse.Namespace) -> None:
    source = write_questions(folder / "questions.jsonl", args.items)
    local = [timed_batch(source, folder / f"local-{run}.jsonl", url, args, None) for run in range(args.repeat)]
    local_time = statistics.median(local)
    print(f"a. local path, {args.concurrency} at once: {local_time:.2f} s, {args.items / local_time:.1f} items/s "
          f"(runs: {', '.join(f'{value:.2f}' for value in local)})")
    started = time.perf_counter()
    with local_cluster(num_cpus=2, object_store_memory=256 * 2**20):
        start_time = time.perf_counter() - started
        on_ray = [timed_batch(source, folder / f"ray-{run}.jsonl", url, args, "local") for run in range(args.repeat)]
    cold = on_ray[0]
    line = (f"b. local Ray (2 CPUs): start {start_time:.2f} s; first batch (cold workers) {cold:.2f} s, "
            f"{args.items / cold:.1f} items/s: {local_time / cold:.2f}x the local path (target 0.8x; "
            f"{local_time / (cold + start_time):.2f}x counting the start)")
    if len(on_ray) > 1:
        warm = statistics.median(on_ray[1:])
        line += f"; later batches (warm workers) {warm:.2f} s: {local_time / warm:.2f}x"
    print(line)


def killed_driver(folder: Path, url: str, args: argparse.Namespace) -> None:
    source = write_questions(folder / "questions.jsonl", args.items)
    out = folder / "killed.jsonl"
    command = [sys.executable, "-m", "rlm", "batch", str(source), "--out", str(out), "--api-url", url,
               "-j", str(args.concurrency), "--sandbox", args.sandbox, "--no-logs", "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not out.exists() or out.read_bytes().count(b"\n") < args.items // 2:
        if driver.poll() is not None:
            raise SystemExit("the driver ended before it could be killed")
        time.sleep(0.01)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    before, _ = check(out, args.items)
    started = time.perf_counter()
    rerun = subprocess.run(command[:-1] + ["--json"], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    report = json.loads(rerun.stdout)
    lines, once = check(out, args.items)
    print(f"c. driver killed (SIGKILL) after {before} of {args.items} results; the restart skipped "
          f"{report['skipped']}, ran {report['ran']} in {elapsed:.2f} s (exit {rerun.returncode}); "
          f"{lines} lines, {once} of {args.items} ids answered exactly once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    server = ServerProcess()
    try:
        with tempfile.TemporaryDirectory(prefix="rlm-batch-bench-") as folder:
            local_and_ray(Path(folder), server.url, args)
            killed_driver(Path(folder), server.url, args)
    finally:
        server.close()


if __name__ == "__main__":
    main()
