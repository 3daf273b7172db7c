"""The async core: `completion()` is a thin wrapper over `acompletion()`, and one limiter caps the tree.

Concurrency is measured where it matters, at the fake server: a responder counts the
requests it is answering at the same moment.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from helpers import make, repl
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, is_root_request, message_text

_VARYING = {"ts", "latency", "duration", "run_id", "parent_id"}


class InFlight:
    """A fake-server responder that answers after `delay` and records the most requests it
    was answering at once (`peak`). `answer(request)` gives the reply text."""

    def __init__(self, delay: float, answer: Any = lambda request: "ok") -> None:
        self.delay = delay
        self.answer = answer
        self.now = self.peak = self.total = 0
        self._lock = threading.Lock()

    def __call__(self, request: dict) -> str:
        with self._lock:
            self.now += 1
            self.total += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay)
            return self.answer(request)
        finally:
            with self._lock:
                self.now -= 1


def _comparable(events: list) -> list[str]:
    """The events without what must differ between two runs (ids, times), sorted: the
    replies of a batch may come back in any order."""
    return sorted(json.dumps({k: v for k, v in e.to_dict().items() if k not in _VARYING}, sort_keys=True) for e in events)


# -- parity of the sync and async APIs -------------------------------------------------------


PARITY_SCRIPT = [
    repl("a = llm_query('first')\nb = llm_query_batched(['second', 'third'])\nprint(a, b)"),
    repl("print(len(context))"),
    "FINAL(done)",
]


def test_completion_and_acompletion_give_the_same_answer_trace_and_costs() -> None:
    sync_rlm, sync_root, sync_sub = make(PARITY_SCRIPT, lambda messages: "sub:" + messages[0]["content"])
    async_rlm, async_root, async_sub = make(PARITY_SCRIPT, lambda messages: "sub:" + messages[0]["content"])

    sync_answer = sync_rlm.completion(context="the context", query="q")
    async_answer = asyncio.run(async_rlm.acompletion(context="the context", query="q"))

    assert sync_answer == async_answer == "done"
    assert [e.type for e in sync_rlm.trace] == [e.type for e in async_rlm.trace]
    assert [e.type for e in sync_rlm.trace].count("sub_call") == 3
    assert _comparable(sync_rlm.trace) == _comparable(async_rlm.trace)
    assert sync_rlm.cost_summary() == async_rlm.cost_summary()
    assert sync_rlm.cost_summary()["sub"]["calls"] == 3
    assert sync_root.requests == async_root.requests
    assert sorted(map(str, sync_sub.requests)) == sorted(map(str, async_sub.requests))


def test_completion_works_when_called_from_a_running_event_loop() -> None:
    rlm, root, sub = make([repl("print(llm_query('inside'))"), "FINAL(from a coroutine)"], ["sub says hi"])

    async def caller() -> str | None:
        asyncio.get_running_loop()  # the sync API is called while this loop runs
        return rlm.completion(context="c", query="q")

    assert asyncio.run(caller()) == "from a coroutine"
    assert sub.requests == [[{"role": "user", "content": "inside"}]]
    assert "sub says hi" in root.requests[1][-1]["content"]


def test_two_acompletions_on_separate_objects_run_concurrently() -> None:
    # Each run's sub-call waits at a barrier that opens only when both are in flight at once.
    barrier = threading.Barrier(2, timeout=10)

    def meet(messages: list[dict]) -> str:
        barrier.wait()
        return "met " + messages[0]["content"]

    first, _, _ = make([repl("print(llm_query('one'))"), "FINAL(first)"], meet)
    second, _, _ = make([repl("print(llm_query('two'))"), "FINAL(second)"], meet)

    async def both() -> list[str | None]:
        return await asyncio.gather(
            first.acompletion(context="a", query="q"), second.acompletion(context="b", query="q")
        )

    assert asyncio.run(both()) == ["first", "second"]
    assert first.trace[-1].status == second.trace[-1].status == "answered"
    assert first.trace[0].run_id != second.trace[0].run_id


# -- one limiter for the whole tree ----------------------------------------------------------


def test_a_batch_of_20_never_has_more_than_max_concurrency_requests_in_flight() -> None:
    sub = InFlight(0.05, lambda request: "re:" + message_text(request["messages"][-1]))
    code = "r = llm_query_batched([f'p{i}' for i in range(20)])\nprint(r[0], r[19], len(r))"
    with FakeOpenAIServer(root=[repl(code), "FINAL(ok)"], sub=sub) as server:
        rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox="inprocess", max_concurrency=4)
        assert rlm.completion(context="c", query="q") == "ok"
        feedback = server.chat_requests(root=True)[1]["messages"][-1]["content"]
        rlm.close()
    assert "re:p0 re:p19 20" in feedback
    assert sub.total == 20
    assert sub.peak == 4  # reached, never passed


def test_the_limit_holds_across_every_level_of_a_depth_2_tree() -> None:
    child_code = "r = llm_query_batched([f'{q} item {i}' for i in range(8)])\nFINAL(str(len(r)))"

    def answer(request: dict) -> str:
        if request["model"] == "root-m":
            if len(request["messages"]) == 2:
                return repl("print(rlm_query_batched([f'child {i}' for i in range(4)]))")
            return "FINAL(tree done)"
        if is_root_request(request):  # a child RLM's turn, on the sub-model
            query = message_text(request["messages"][1]).split("Question: ")[1].split("\n")[0]
            return repl(f"q = {query!r}\n{child_code}")
        return "leaf"

    counter = InFlight(0.05, answer)
    with FakeOpenAIServer(responder=counter) as server:
        rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox="inprocess", max_depth=2, max_concurrency=4)
        assert rlm.completion(context="c", query="q") == "tree done"
        feedback = server.chat_requests(root=True)[-1]["messages"][-1]["content"]
        leaves = [r for r in server.chat_requests(root=False)]
        rlm.close()
    assert "['8', '8', '8', '8']" in feedback
    assert len(leaves) == 32 and counter.total == 2 + 4 + 32
    assert counter.peak == 4
    summary = rlm.cost_summary()
    assert summary["sub"]["calls"] == 4 + 32
