"""`rlm batch` and `rlm bench run` on Ray: a local Ray instance with 2 CPUs started here (no
dashboard, a small object store, 127.0.0.1 only), items as Ray tasks against the fake server,
Ray workers killed mid-run; Ray leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rlm.batch
from rlm.batch.cluster import TaskResources, local_cluster
from rlm.cli.main import app
from rlm.testing import FakeOpenAIServer, FakeReply, is_root_request

from helpers import descendants, process_alive
from test_batch_local import Model, answered_once, lines, questions


@pytest.fixture(scope="module")
def ray_cluster():
    before = descendants(os.getpid())
    folder = tempfile.mkdtemp(prefix="rlm-ray-")  # short: Ray's socket paths must fit 107 bytes
    with local_cluster(num_cpus=2, object_store_memory=80 * 2**20, temp_dir=folder) as ray:
        assert ray.cluster_resources()["CPU"] == 2
        assert "node:127.0.0.1" in ray.cluster_resources()  # nothing listens beyond this machine
        yield ray
        started = descendants(os.getpid()) - before
    deadline = time.monotonic() + 20
    while any(process_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started and not [pid for pid in started if process_alive(pid)]
    shutil.rmtree(folder)


def ray_tasks(title: str = "ray::rlm-batch") -> list[int]:
    """Processes below this one running one of our Ray tasks (Ray names them after the task)."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if cmdline.read().startswith(title.encode()):
                    found.append(pid)
        except OSError:
            continue
    return found


class Killer(Model):
    """The scripted model, which also SIGKILLs the Ray worker of one running item when the
    `at`-th item asks its first question; and notes whether items run in Ray tasks."""

    def __init__(self, *, at: int, **options: object) -> None:
        super().__init__(**options)
        self.at = at
        self.killed: list[int] = []
        self.in_ray: list[bool] = []

    def _reply(self, request: dict) -> FakeReply:
        reply = super()._reply(request)
        if is_root_request(request):
            running = ray_tasks()
            self.in_ray.append(bool(running))
            with self._lock:
                if self.at and not self.killed and running and sum(self.asked.values()) >= self.at:
                    os.kill(running[0], signal.SIGKILL)
                    self.killed.append(running[0])
        return reply


def test_items_run_as_ray_tasks_each_with_its_own_sandbox(ray_cluster, tmp_path):
    model = Killer(at=0, delay=0.1)
    source = questions(tmp_path / "q.jsonl", 6)
    out = tmp_path / "a.jsonl"
    with FakeOpenAIServer(responder=model) as server:
        summary = rlm.batch.run(source, out=out, ray="local", concurrency=4, options={"api_url": server.url})
    assert (summary.answered, summary.ran, summary.lost, summary.complete) == (6, 6, 0, True)
    assert model.in_ray and all(model.in_ray)
    answered_once(out, 6)
    for line in lines(out):
        with open(line["trajectory"], encoding="utf-8") as trajectory:
            start = json.loads(trajectory.readline())
        assert start["type"] == "run_start" and start["sandbox"] == "bwrap"  # "auto", resolved on the Ray worker


def test_a_killed_ray_worker_loses_only_its_item_which_the_rerun_does(ray_cluster, tmp_path):
    count = 10
    model = Killer(at=5, delay=0.4)
    source = questions(tmp_path / "q.jsonl", count)
    out = tmp_path / "a.jsonl"
    lost = []
    with FakeOpenAIServer(responder=model) as server:
        options = {"api_url": server.url, "sandbox": "inprocess"}
        first = rlm.batch.run(source, out=out, ray="local", concurrency=4, options=options,
                              resources=TaskResources(cpus=0.5, retries=0), on_lost=lambda *item: lost.append(item))
        assert model.killed and first.lost == len(lost) >= 1
        assert "WorkerCrashedError" in lost[0][1] or "died" in lost[0][1]
        assert first.pending == first.lost and first.answered == count - first.lost
        assert {line["id"] for line in lines(out)}.isdisjoint(item for item, _ in lost)
        second = rlm.batch.run(source, out=out, ray="local", concurrency=4, options=options)
    assert (second.ran, second.skipped, second.answered, second.complete) == (first.lost, count - first.lost, count, True)
    answered_once(out, count)


def test_ray_runs_a_killed_workers_task_again_by_itself(ray_cluster, tmp_path):
    count = 8
    model = Killer(at=4, delay=0.4)
    source = questions(tmp_path / "q.jsonl", count)
    out = tmp_path / "a.jsonl"
    with FakeOpenAIServer(responder=model) as server:
        summary = rlm.batch.run(source, out=out, ray="local", concurrency=4,
                                options={"api_url": server.url, "sandbox": "inprocess"})
    assert model.killed and (summary.lost, summary.answered, summary.complete) == (0, count, True)
    assert max(model.asked.values()) == 2  # the killed item was asked again, by Ray's retry
    answered_once(out, count)


def test_the_commands_take_a_bare_ray_option(ray_cluster, tmp_path):
    from test_bench_run import scripted_models

    source = questions(tmp_path / "q.jsonl", 3)
    with FakeOpenAIServer(responder=Model()) as server:
        batch = CliRunner().invoke(app, ["batch", str(source), "--out", str(tmp_path / "a.jsonl"), "--api-url",
                                         server.url, "--sandbox", "inprocess", "--json", "--ray"])
    assert batch.exit_code == 0, batch.output
    assert json.loads(batch.stdout)["answered"] == 3
    with FakeOpenAIServer(responder=scripted_models(), context_window=4096) as server:
        bench = CliRunner().invoke(app, [
            "bench", "run", "-b", "sniah", "-l", "1k", "-n", "2", "-m", "rlm-depth0,rlm", "--sandbox", "inprocess",
            "--api-url", server.url, "--max-iterations", "3", "--no-plot", "-o", str(tmp_path / "bench"), "--ray",
        ])
    assert bench.exit_code == 0, bench.output
    results = [json.loads(line) for line in (tmp_path / "bench" / "results.jsonl").read_text().splitlines()]
    assert Counter(result["method"] for result in results) == {"rlm-depth0": 2, "rlm": 2}
    assert all(result["score"] == 1.0 for result in results)
    assert all(Path(result["trajectory"]).is_file() for result in results)
