"""What each sandbox level costs, and how a 1 GB context fares. Run by hand:

    python bench/sandbox.py                 # every level, then the 1 GB figures
    python bench/sandbox.py --levels strict --no-big
    python bench/sandbox.py --big-only --size-mb 1000

Prints, for each level:
  1. worker start: creating a sandbox until it is ready for a cell (median of --starts);
  2. exec round trip: one trivial cell, host to worker and back (median of --cells);
  3. llm_query round trip: one call from model code to the host's bridge and back, the
     bridge answering at once (mean over a cell making --calls of them);
  4. tool call: one call of a host tool (`RLM_REPL(tools=...)`) through the whole engine (pool,
     trace event), and what it costs over an `llm_query` through the same engine, answered at
     once by a scripted sub-model, cache off (target: under 1 ms).
Then a multi-turn session (`rlm.session()`, scripted model) per level: the first and second
completion()'s wall time, and REPL workers started (a second completion starts none).
Then what the seccomp allow list costs (strict level): compiling it for one worker, worker
start with and without it, and cells with and without it (a trivial one, and one making 20,000
system calls). Then, for a 1 GB ASCII file given as a `Path`, with each worker level, in a fresh host process
talking to a fake OpenAI-compatible server on 127.0.0.1:
  - time from calling completion() to the first root-model request (target: 3 s);
  - the host's peak resident memory (target: under 300 MB);
  - the worker's peak resident memory, after decoding `context` and a find() over it
    (target: under 1.3 GB);
and for the same text given as a `str` (subprocess level): the host's peak beyond the string
it already held (no second full copy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEEDLE = "NEEDLE-7731-magic"
# Reads the worker's own peak resident memory (kB) from /proc/self/status.
_PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
_PROBE_CELL = f"```repl\nat = context.find({NEEDLE!r})\nprint(at, len(context), {_PEAK})\n```"


def _bridge(kind: str, prompts: list[str]) -> list[str]:
    return ["ok" for _ in prompts]


def echo(text: str) -> str:
    """Returns its argument."""
    return text


def _engine_call(level: str, calls: int, call: str) -> float:
    """Seconds per `call` in a cell making `calls` of them, run by RLM_REPL (tool `echo`, cache off)."""
    from rlm.rlm_repl import RLM_REPL
    from rlm.testing import ScriptedModel

    cell = f"```repl\nfor _ in range({calls}):\n    {call}\n```"
    root = ScriptedModel(["```repl\nx = 1\n```", cell, "FINAL(1)"])
    sub = ScriptedModel(lambda request: "ok")
    with RLM_REPL(client=root, sub_client=sub, sandbox=level, cache=False, tools=[echo]) as engine:
        engine.completion(context="x", query="q")
    return [event.duration for event in engine.trace if event.type == "exec"][1] / calls


def _level_figures(level: str, starts: int, cells: int, calls: int) -> dict[str, float]:
    from rlm.sandbox import create_sandbox

    start_times = []
    for _ in range(starts):
        began = time.perf_counter()
        box = create_sandbox(level, _bridge)
        start_times.append(time.perf_counter() - began)
        box.close()
    with create_sandbox(level, _bridge) as box:
        box.run("x = 0", timeout=30, max_output=1000)  # warm-up
        round_trips = []
        for _ in range(cells):
            began = time.perf_counter()
            box.run("x += 1", timeout=30, max_output=1000)
            round_trips.append(time.perf_counter() - began)
        began = time.perf_counter()
        box.run(f"for _ in range({calls}):\n    llm_query('q')", timeout=300, max_output=1000)
        per_call = (time.perf_counter() - began) / calls
    tool = _engine_call(level, calls, "echo('q')")
    engine_query = _engine_call(level, calls, "llm_query('q')")
    return {"start": statistics.median(start_times), "exec": statistics.median(round_trips), "llm_query": per_call,
            "tool": tool, "tool_over": tool - engine_query}


def _print_sessions(levels: list[str]) -> None:
    """Two completions of one session per level: the second reuses the first one's worker."""
    import rlm
    from rlm.testing import ScriptedModel

    cell = "```repl\nimport os\npid = os.getpid()\n```"
    print(f"\n{'session':<12}{'1st completion':>16}{'2nd completion':>16}{'workers started':>17}{'same pid':>10}")
    for level in levels:
        root = ScriptedModel([cell, "FINAL_VAR(pid)", cell, "FINAL_VAR(pid)"])
        with rlm.session(client=root, sub_client=root, sandbox=level) as session:
            first, pid = _timed_answer(session, "one")
            second, again = _timed_answer(session, "two")
            started = session.workers_started
        print(f"{level:<12}{first * 1e3:>13.1f} ms{second * 1e3:>13.1f} ms{started:>17}{str(pid == again):>10}")


def _timed_answer(session: object, context: str) -> tuple[float, str]:
    began = time.perf_counter()
    answer = session.completion(context=context, query="Which process?")
    return time.perf_counter() - began, answer


def _make_big_file(size_mb: int) -> Path:
    from rlm.sandbox.subprocess import disk_tempdir

    path = Path(tempfile.mkdtemp(prefix="rlm-bench-", dir=disk_tempdir())) / "context.txt"
    line = b"2024-05-01 12:00:00 INFO request served in 12 ms from cache node-17 ok\n"
    block = line * ((16 << 20) // len(line))
    target = size_mb * 1_000_000
    with open(path, "wb") as handle:
        written = 0
        while written < target:
            piece = block[: target - written]
            handle.write(piece)
            written += len(piece)
        handle.write(f"the answer is {NEEDLE}\n".encode())
    return path


def _own_peak_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return kib / 1024


def _big_child(level: str, path: str, as_str: bool) -> None:
    """In a fresh process: one completion() over the big file; print the figures as JSON."""
    from rlm.rlm_repl import RLM_REPL
    from rlm.testing import FakeOpenAIServer

    seen: list[float] = []

    def root(request: dict) -> str:
        seen.append(time.perf_counter())
        return _PROBE_CELL if len(seen) == 1 else "FINAL(done)"

    context: object = Path(path)
    if as_str:  # made at 1x (read straight into the string) so that the peak below is the host's own
        from rlm.sandbox.textfile import read_ascii

        fd = os.open(path, os.O_RDONLY)
        context = read_ascii(fd, os.fstat(fd).st_size)
        os.close(fd)
    before = _own_peak_mb()
    with FakeOpenAIServer(root=root) as server:
        rlm = RLM_REPL(model="fake", recursive_model="fake", api_url=server.url, sandbox=level, max_iterations=3)
        began = time.perf_counter()
        answer = rlm.completion(context=context, query="Where is the needle?")
        finished = time.perf_counter()
        rlm.close()
    cell = next(event for event in rlm.trace if event.type == "exec")
    at, length, worker_kib = (int(value) for value in cell.stdout.split())
    print(json.dumps({
        "answer": answer, "found": at >= 0, "length": length,
        "first_request": seen[0] - began, "completion": finished - began,
        "host_peak": _own_peak_mb(), "host_before": before, "worker_peak": worker_kib / 1024,
    }))


def _run_big(level: str, path: Path, as_str: bool = False) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--big-child", level, str(path), *(["--as-str"] if as_str else [])],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the 1 GB run with {level} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_COLD_START = """
import time
from rlm.sandbox import create_sandbox, sandbox_class
sandbox_class("subprocess")  # imported before the clock starts, as for the other figures
began = time.perf_counter()
create_sandbox("subprocess", lambda kind, prompts: []).close()
print(time.perf_counter() - began)
"""


def _print_levels(levels: list[str], args: argparse.Namespace) -> None:
    print(f"{'level':<12}{'worker start':>14}{'exec round trip':>18}{'llm_query round trip':>23}"
          f"{'tool call':>13}{'tool over llm_query':>22}")
    for level in levels:
        figures = _level_figures(level, args.starts, args.cells, args.calls)
        print(f"{level:<12}{figures['start'] * 1e3:>11.1f} ms{figures['exec'] * 1e3:>15.3f} ms"
              f"{figures['llm_query'] * 1e3:>20.3f} ms{figures['tool'] * 1e3:>10.3f} ms"
              f"{figures['tool_over'] * 1e3:>19.3f} ms")
    colds = [float(subprocess.run([sys.executable, "-c", _COLD_START], capture_output=True, text=True,
                                  check=True).stdout) for _ in range(5)]
    print(f"(the first subprocess/strict worker of a host process also starts the fork server: "
          f"{statistics.median(colds) * 1e3:.0f} ms, median of 5 fresh processes)")


_COLD_COMPILE = """
import time
from rlm.sandbox import seccomp
seccomp.require()  # imported before the clock starts
began = time.perf_counter()
seccomp.compile_filter(1)
print(time.perf_counter() - began)
"""
_SYSCALL_CELL = "import os\nfor _ in range(20000):\n    os.stat('.')"


def _unfiltered_strict() -> type:
    """The strict level with everything but the seccomp filter, to measure what the filter costs."""
    from rlm.sandbox.strict import StrictSandbox

    class Unfiltered(StrictSandbox):
        def _confinement(self, worker_pid: int) -> dict:
            return {key: value for key, value in super()._confinement(worker_pid).items() if key != "seccomp"}

    return Unfiltered


def _cell_time(box: object, code: str, cells: int) -> float:
    times = []
    for _ in range(cells):
        began = time.perf_counter()
        box.run(code, timeout=60, max_output=1000)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _print_filter_cost(starts: int, cells: int) -> None:
    from rlm.sandbox import seccomp
    from rlm.sandbox.strict import StrictSandbox

    first = float(subprocess.run([sys.executable, "-c", _COLD_COMPILE], capture_output=True, text=True,
                                 check=True).stdout)
    per_worker = statistics.median(_timed(lambda pid=pid: seccomp.compile_filter(pid)) for pid in range(2, 202))
    print(f"\nseccomp allow list ({len(seccomp.ALLOWED)} calls allowed, {len(seccomp.CHECKED)} rules with argument "
          f"checks, {len(seccomp.compile_filter(1)) // 8} BPF instructions): compiled once per host process in "
          f"{first * 1e3:.1f} ms, then {per_worker * 1e3:.3f} ms per worker")
    kinds = {"with the filter": StrictSandbox, "without it": _unfiltered_strict()}
    start_times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(max(starts, 10)):  # alternated, so that a drifting machine load hits both alike
        for name, kind in kinds.items():
            began = time.perf_counter()
            box = kind(_bridge)
            start_times[name].append(time.perf_counter() - began)
            box.close()
    print(f"{'strict':<20}{'worker start':>14}{'trivial cell':>15}{'20,000 stat() calls':>22}")
    figures = {}
    for name, kind in kinds.items():
        with kind(_bridge) as box:
            box.run("import os", timeout=30, max_output=1000)
            figures[name] = (statistics.median(start_times[name]), _cell_time(box, "x = 1", cells),
                             _cell_time(box, _SYSCALL_CELL, 15))
        start, trivial, heavy = figures[name]
        print(f"{name:<20}{start * 1e3:>11.1f} ms{trivial * 1e3:>12.3f} ms{heavy * 1e3:>19.1f} ms")
    (start_a, trivial_a, heavy_a), (start_b, trivial_b, heavy_b) = figures.values()
    print(f"{'difference':<20}{(start_a - start_b) * 1e3:>11.1f} ms{(trivial_a - trivial_b) * 1e3:>12.3f} ms"
          f"{(heavy_a - heavy_b) * 1e3:>19.1f} ms")


def _timed(action: object) -> float:
    began = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - began


def _print_big(levels: list[str], size_mb: int) -> None:
    print(f"\n{size_mb / 1000:g} GB ASCII context as a Path (fresh host process per row):")
    print(f"{'level':<12}{'first request':>15}{'completion()':>14}{'host peak':>12}{'worker peak':>14}")
    path = _make_big_file(size_mb)
    try:
        for level in [level for level in levels if level != "inprocess"]:
            big = _run_big(level, path)
            if big["answer"] != "done" or not big["found"]:
                raise SystemExit(f"the 1 GB run with {level} did not go as scripted: {big}")
            print(f"{level:<12}{big['first_request']:>13.2f} s{big['completion']:>12.2f} s"
                  f"{big['host_peak']:>9.0f} MB{big['worker_peak']:>11.0f} MB")
        as_str = _run_big("subprocess", path, as_str=True)
        extra = as_str["host_peak"] - as_str["host_before"]
        print(f"\nthe same text as a str (subprocess): host peak {as_str['host_peak']:.0f} MB with the string "
              f"itself at {as_str['host_before']:.0f} MB before completion(): {extra:.0f} MB more "
              f"(written in 16 MiB pieces); first request {as_str['first_request']:.2f} s (it does not wait for "
              f"the context), completion() {as_str['completion']:.2f} s")
    finally:
        path.unlink()
        path.parent.rmdir()


def main() -> None:
    from rlm.sandbox import SANDBOXES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=",".join(SANDBOXES), help="comma-separated sandbox levels")
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--size-mb", type=int, default=1000, help="size of the big context (default 1 GB)")
    parser.add_argument("--no-big", action="store_true", help="skip the big-context figures")
    parser.add_argument("--big-only", action="store_true", help="only the big-context figures")
    parser.add_argument("--big-child", nargs=2, metavar=("LEVEL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--as-str", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.big_child:
        _big_child(*args.big_child, as_str=args.as_str)
        return
    levels = args.levels.split(",")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, Linux {os.uname().release}, load {load}\n")
    if not args.big_only:
        _print_levels(levels, args)
        _print_sessions(levels)
        if "strict" in levels:
            _print_filter_cost(args.starts, args.cells)
    if not args.no_big:
        _print_big(levels, args.size_mb)


if __name__ == "__main__":
    main()
