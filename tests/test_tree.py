"""Recursion: `rlm_query` at the depth limit, child RLMs one level down, and what the REPL cannot change."""

from __future__ import annotations

import re
import threading
from typing import Callable

import pytest

from helpers import SANDBOXES, last_user, make, repl
from rlm.sandbox import LLMBridge, Sandbox, SandboxLimits, create_sandbox
from rlm.utils import prompts


def child_query(messages: list[dict]) -> str:
    """The question a child run was given (from its first user message)."""
    return re.search(r"Question: (.*)", messages[1]["content"]).group(1)


def sub_model(child: Callable[[list[dict], int], str], leaf: Callable[[str], str] = lambda p: "leaf") -> Callable:
    """A sub-model script: `child(messages, turn)` answers child RLM turns (they have a system
    prompt), `leaf(prompt)` answers plain sub-calls."""

    def answer(messages: list[dict]) -> str:
        if messages[0]["role"] == "system":
            return child(messages, sum(1 for m in messages if m["role"] == "assistant") + 1)
        return leaf(messages[0]["content"])

    return answer


def events(rlm, kind: str) -> list:
    return [event for event in rlm.trace if event.type == kind]


class OpenSandboxes:
    """A sandbox factory (of `level`) that counts the sessions open, now and at most at once."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.open = self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, bridge: LLMBridge, limits: SandboxLimits | None) -> Sandbox:
        box = create_sandbox(self.level, bridge, limits)
        with self._lock:
            self.open += 1
            self.peak = max(self.peak, self.open)
        close = box.close

        def closed() -> None:
            close()
            with self._lock:
                self.open -= 1

        box.close = closed  # type: ignore[method-assign]
        return box


# -- at the depth limit ----------------------------------------------------------------------


def test_at_max_depth_1_rlm_query_is_a_plain_sub_call_and_the_trace_says_so() -> None:
    code = "print(rlm_query('What is 2+2?', context='two and two'))\nprint(rlm_query('bare'))"
    rlm, root, sub = make([repl(code), "FINAL(4)"], lambda m: "plain:" + m[0]["content"])
    assert rlm.completion(context="c", query="q") == "4"
    assert sub.requests == [
        [{"role": "user", "content": "What is 2+2?\n\ntwo and two"}],
        [{"role": "user", "content": "bare"}],
    ]
    calls = events(rlm, "sub_call")
    assert [c.kind for c in calls] == ["rlm_query", "rlm_query"]
    assert all("max_depth" in c.note and c.depth == 1 for c in calls)
    assert [e.depth for e in events(rlm, "run_start")] == [0]
    assert "plain:What is 2+2?" in last_user(root.requests[1])
    assert "rlm_query" not in root.requests[0][0]["content"]  # the prompt does not offer recursion


def test_max_depth_0_allows_no_sub_calls_of_any_kind() -> None:
    code = (
        "for call in (lambda: llm_query('a'), lambda: rlm_query('b'), lambda: rlm_query_batched(['c'])):\n"
        "    try:\n        call()\n    except Exception as exc:\n        print('refused:', exc)"
    )
    rlm, root, sub = make([repl(code), "FINAL(alone)"], max_depth=0)
    assert rlm.completion(context="c", query="q") == "alone"
    assert "llm_query" not in root.requests[0][0]["content"]
    assert last_user(root.requests[1]).count("refused: sub-calls are off") == 3
    assert sub.requests == [] and events(rlm, "sub_call") == []


# -- child RLMs --------------------------------------------------------------------------------


def test_max_depth_2_starts_a_child_rlm_on_the_sub_model() -> None:
    def child(messages: list[dict], turn: int) -> str:
        return repl("print(llm_query('leaf prompt'))") if turn == 1 else "FINAL(child answer)"

    rlm, root, sub = make([repl("print(rlm_query('child question'))"), "FINAL(top)"], sub_model(child), max_depth=2)
    assert rlm.completion(context="c", query="q") == "top"

    starts = events(rlm, "run_start")
    assert [(s.depth, s.query) for s in starts] == [(0, "q"), (1, "child question")]
    assert starts[1].parent_id == starts[0].run_id and starts[1].run_id != starts[0].run_id
    assert starts[1].root_model == "sub-model"
    assert "rlm_query" in root.requests[0][0]["content"]  # the root may recurse; the child may not
    assert "rlm_query" not in starts[1].system_prompt and "llm_query" in starts[1].system_prompt

    child_turns = [r for r in sub.requests if r[0]["role"] == "system"]
    assert len(child_turns) == 2 and len(root.requests) == 2  # the child's turns went to the sub client
    leaf_calls = [c for c in events(rlm, "sub_call") if c.kind == "llm_query"]
    assert [(c.depth, c.prompt, c.run_id) for c in leaf_calls] == [(2, "leaf prompt", starts[1].run_id)]
    assert "leaf" in last_user(child_turns[1])
    assert "child answer" in last_user(root.requests[1])
    child_final = [f for f in events(rlm, "final") if f.depth == 1]
    assert child_final[0].parent_id == starts[0].run_id and child_final[0].answer == "child answer"

    breakdown = {(b["role"], b["depth"], b["model"]): b["calls"] for b in rlm.cost_summary()["breakdown"]}
    assert breakdown == {("root", 0, "root-model"): 2, ("root", 1, "sub-model"): 2, ("sub", 2, "sub-model"): 1}


def test_a_child_at_the_depth_limit_answers_its_own_rlm_query_as_a_plain_call() -> None:
    def child(messages: list[dict], turn: int) -> str:
        return repl("FINAL(rlm_query('deeper?'))")

    rlm, _, sub = make([repl("print(rlm_query('child'))"), "FINAL(ok)"], sub_model(child, lambda p: "plain " + p),
                       max_depth=2)
    assert rlm.completion(context="c", query="q") == "ok"
    assert [e.depth for e in events(rlm, "run_start")] == [0, 1]  # no grandchild run
    deeper = [c for c in events(rlm, "sub_call") if c.prompt == "deeper?"]
    assert len(deeper) == 1 and deeper[0].depth == 2 and deeper[0].kind == "rlm_query" and "max_depth" in deeper[0].note


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_the_depth_cannot_be_changed_from_the_repl(sandbox: str) -> None:
    tamper = (
        "max_depth = 9\nMAX_DEPTH = 9\ndepth = 9\n"
        "rlm_query = lambda q, context=None: 'spoofed'\nllm_query = lambda p: 'spoofed'\n"
        "rlm_query_batched = lambda qs, contexts=None: ['spoofed']"
    )
    use = "print(rlm_query('q1'), llm_query('q2'), rlm_query_batched(['q3', 'q4']))"
    rlm, root, sub = make([repl(tamper), repl(use), "FINAL(done)"], lambda m: "host:" + m[0]["content"],
                          sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == "done"
    shown = last_user(root.requests[2])
    assert "spoofed" not in shown and "host:q1 host:q2 ['host:q3', 'host:q4']" in shown
    assert [e.depth for e in events(rlm, "run_start")] == [0]  # still depth 1: no child RLM started
    assert sorted(r[0]["content"] for r in sub.requests) == ["q1", "q2", "q3", "q4"]


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_concurrent_children_keep_their_output_apart(sandbox: str) -> None:
    def child(messages: list[dict], turn: int) -> str:
        mark = child_query(messages)
        if turn == 1:
            return repl(f"import time\nfor i in range(40):\n    print({mark * 3!r})\n    time.sleep(0.01)")
        return f"FINAL({mark})"

    rlm, root, sub = make([repl("print(rlm_query_batched(['A', 'B']))"), "FINAL(both)"], sub_model(child),
                          max_depth=2, sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == "both"
    assert "['A', 'B']" in last_user(root.requests[1])
    cells = {e.run_id: e for e in events(rlm, "exec") if e.depth == 1}
    starts = {e.run_id: e.query for e in events(rlm, "run_start") if e.depth == 1}
    assert sorted(starts.values()) == ["A", "B"]
    for run_id, mark in starts.items():
        assert cells[run_id].stdout == (mark * 3 + "\n") * 40
    first, second = cells.values()
    assert first.ts - first.duration < second.ts and second.ts - second.duration < first.ts  # they overlapped
    second_turns = [r for r in sub.requests if r[0]["role"] == "system" and len(r) == 4]
    assert len(second_turns) == 2
    for turns in second_turns:
        mine, other = (("AAA", "BBB") if child_query(turns) == "A" else ("BBB", "AAA"))
        assert mine in turns[-1]["content"] and other not in turns[-1]["content"]


def test_rlm_query_passes_a_list_or_dict_context_to_the_child() -> None:
    def child(messages: list[dict], turn: int) -> str:
        if "list" in child_query(messages):
            return repl("FINAL('|'.join(context))")
        return repl("FINAL(context['key'])")

    code = "a = rlm_query('join the list', context=['aa', 'bbb'])\nb = rlm_query('read the dict', {'key': 'v-7'})\nprint(a, b)"
    rlm, root, _ = make([repl(code), "FINAL(ok)"], sub_model(child), max_depth=2)
    assert rlm.completion(context="c", query="q") == "ok"
    assert "aa|bbb v-7" in last_user(root.requests[1])
    infos = {e.query: e.context for e in events(rlm, "run_start") if e.depth == 1}
    assert infos["join the list"]["type"] == "list" and infos["join the list"]["chunk_lengths"] == [2, 3]
    assert infos["read the dict"]["type"] == "dict"


def test_a_childs_context_defaults_to_its_query() -> None:
    rlm, root, _ = make([repl("print(rlm_query('the query text'))"), "FINAL(ok)"],
                        sub_model(lambda m, turn: repl("FINAL(context.upper())")), max_depth=2)
    assert rlm.completion(context="c", query="q") == "ok"
    assert "THE QUERY TEXT" in last_user(root.requests[1])


def test_a_child_that_never_answers_raises_an_exception_the_parent_code_can_catch() -> None:
    code = "try:\n    rlm_query('hopeless')\nexcept Exception as exc:\n    print('caught:', type(exc).__name__, exc)"
    rlm, root, sub = make([repl(code), "FINAL(handled)"], sub_model(lambda m, turn: "still thinking"),
                          max_depth=2, max_iterations=2)
    assert rlm.completion(context="c", query="q") == "handled"
    feedback = last_user(root.requests[1])
    assert "caught:" in feedback and "no final answer within 2 turns" in feedback
    assert len([r for r in sub.requests if r[0]["role"] == "system"]) == 2
    assert rlm.trace[-1].status == "answered"


def test_children_prompts_follow_the_depth() -> None:
    rlm, root, _ = make([repl("print(rlm_query('x'))"), "FINAL(ok)"],
                        sub_model(lambda m, turn: repl("FINAL('y')")), max_depth=3)
    assert rlm.completion(context="c", query="q") == "ok"
    child = [e for e in events(rlm, "run_start") if e.depth == 1][0]
    assert child.system_prompt == prompts.system_prompt("default", recursion=True)  # depth 1 of 3 may recurse


# -- how many child runs are alive at once ------------------------------------------------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_child_runs_alive_at_once_are_at_most_max_concurrency(sandbox: str) -> None:
    """Each child run has a REPL worker of its own: a batch of 12 starts them three at a time."""
    def child(messages: list[dict], turn: int) -> str:
        return repl("import time\ntime.sleep(0.05)") if turn == 1 else "FINAL(x)"

    boxes = OpenSandboxes(sandbox)
    rlm, root, _ = make([repl("print(len(rlm_query_batched(['q'] * 12)))"), "FINAL(top)"], sub_model(child),
                        max_depth=2, max_concurrency=3, sandbox=boxes)
    assert rlm.completion(context="c", query="q") == "top"
    assert "12" in last_user(root.requests[1]) and len([e for e in events(rlm, "run_start") if e.depth == 1]) == 12
    assert boxes.peak == 1 + 3  # the root's REPL and three children's
    assert boxes.open == 0


def test_children_bounded_at_every_depth_cannot_deadlock_a_parent_that_holds_room() -> None:
    """With room for one child run per depth, a child waiting on its own children still gets them."""
    def child(messages: list[dict], turn: int) -> str:
        if child_query(messages) in ("a", "b"):
            return repl("print(rlm_query_batched(['x', 'y']))") if turn == 1 else "FINAL(mid)"
        return repl("FINAL('leaf ' + context)")

    boxes = OpenSandboxes("inprocess")
    rlm, root, _ = make([repl("print(rlm_query_batched(['a', 'b']))"), "FINAL(top)"], sub_model(child),
                        max_depth=3, max_concurrency=1, sandbox=boxes)
    assert rlm.completion(context="c", query="q") == "top"
    assert sorted(e.depth for e in events(rlm, "run_start")) == [0, 1, 1, 2, 2, 2, 2]
    assert "['mid', 'mid']" in last_user(root.requests[1])
    assert boxes.peak == 3  # the root, a child and a grandchild
