"""How much time the RLM machinery itself costs, against a fake server on 127.0.0.1.

Run by hand:  python bench/overhead.py [--repeat 5] [--sandbox subprocess]

Prints, for the chosen sandbox:
  1. a 2-turn episode (explore, then FINAL) with a server that answers instantly
     (target: within 150 ms per completion() call);
  2. one turn making 65 sequential llm_query calls over a 1.3 MB context
     (target: within 500 ms of orchestration, the server answering instantly);
  3. one llm_query_batched of 64 prompts against a server taking 100 ms per call,
     16 in flight (ideal 0.4 s; target: within 0.55 s).
Each figure is the median over --repeat runs, after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer

TWO_TURNS = [
    "Looking first.\n```repl\nprint(len(context), context[:40])\n```",
    "FINAL(done)",
]

SEQUENTIAL = (
    "```repl\n"
    "size = 20_000\n"
    "pieces = [context[i:i + size] for i in range(0, len(context), size)]\n"
    "replies = [llm_query('summarise: ' + piece) for piece in pieces]\n"
    "print(len(replies))\n"
    "```\n"
)

BATCHED = (
    "```repl\n"
    "replies = llm_query_batched([f'question {i}' for i in range(64)])\n"
    "print(len(replies), replies[0], replies[-1])\n"
    "```\n"
)


def _episode(server_kwargs: dict, root_replies: list[str], context: str, sandbox: str) -> tuple[float, RLM_REPL]:
    with FakeOpenAIServer(root=list(root_replies), **server_kwargs) as server:
        rlm = RLM_REPL(
            model="fake", recursive_model="fake", api_url=server.url, sandbox=sandbox, max_iterations=5, cache=False
        )
        started = time.perf_counter()
        answer = rlm.completion(context=context, query="What does it say?")
        elapsed = time.perf_counter() - started
    if answer != "done":
        raise SystemExit(f"benchmark episode did not finish as scripted (answer {answer!r})")
    return elapsed, rlm


def _cell_seconds(rlm: RLM_REPL) -> float:
    cells = [event for event in rlm.trace if event.type == "exec"]
    return cells[0].duration


def _median(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} ms  (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sandbox", default="subprocess", choices=["subprocess", "inprocess"])
    args = parser.parse_args()
    runs = args.repeat + 1  # the first is a warm-up

    two_turn = [_episode({}, TWO_TURNS, "a very long context ...", args.sandbox)[0] for _ in range(runs)][1:]

    big = ("The quick brown fox jumps over the lazy dog. " * 30_000)[:1_300_000]
    sequential_total, sequential_cell = [], []
    for _ in range(runs):
        elapsed, rlm = _episode({}, [SEQUENTIAL, "FINAL(done)"], big, args.sandbox)
        sequential_total.append(elapsed)
        sequential_cell.append(_cell_seconds(rlm))
        calls = rlm.cost_summary()["sub"]["calls"]
        if calls != 65:
            raise SystemExit(f"expected 65 sub-calls, got {calls}")

    def slow_sub(request: dict) -> str:
        time.sleep(0.1)
        return "answer"

    batched_cell = []
    for _ in range(runs):
        server = {"sub": slow_sub}
        _, rlm = _episode(server, [BATCHED, "FINAL(done)"], "small", args.sandbox)
        batched_cell.append(_cell_seconds(rlm))
    sequential_total, sequential_cell, batched_cell = sequential_total[1:], sequential_cell[1:], batched_cell[1:]

    print(f"sandbox: {args.sandbox}, median of {args.repeat} runs after a warm-up")
    print(f"2-turn episode, completion() wall time     {_median(two_turn)}   target <= 150 ms")
    print(f"65 sequential llm_query, whole completion() {_median(sequential_total)}")
    print(f"65 sequential llm_query, the cell alone     {_median(sequential_cell)}   target <= 500 ms")
    print(f"64 batched x 100 ms (16 in flight), cell    {_median(batched_cell)}   ideal 400 ms, target <= 550 ms")


if __name__ == "__main__":
    main()
