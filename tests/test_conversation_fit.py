"""Fitting the root conversation to the model's window: counts from the server's usage, whole old
turns removed (never the question), the window recorded, and overflow refusals from servers
retried once and then reported as ContextWindowExceeded."""

from __future__ import annotations

import asyncio
import json

import pytest

from helpers import last_user, make, repl
from rlm.conversation import REFILL, Conversation, DropTurns, reply_room
from rlm.errors import ContextWindowExceeded
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer
from rlm.usage import Usage
from rlm.utils.llm import estimate_tokens

WINDOW = 4_000
NOTE = "to fit your context window"


def printing(turn: int, size: int = 2_000) -> str:
    return repl(f"print('{turn % 10}' * {size})  # turn {turn}")


def model_count(request: list[dict]) -> int:
    """The request's size as the scripted model counts it (its usage: 4 characters a token)."""
    return estimate_tokens(sum(len(message["content"]) for message in request))


def turns_in(request: list[dict]) -> list[str]:
    return [message["content"] for message in request if message["role"] == "assistant"]


def test_a_long_run_always_fits_removing_whole_old_turns_and_keeping_the_question() -> None:
    replies = [printing(turn) for turn in range(1, 15)] + ["FINAL(fitted)"]
    rlm, root, _ = make(replies, window=WINDOW, compact=False)
    assert rlm.completion(context="c", query="Where is the needle?") == "fitted"

    room = reply_room(WINDOW, None)
    first_user = root.requests[0][1]
    for request in root.requests:
        assert model_count(request) + room <= WINDOW
        assert request[:2] == root.requests[0][:2]  # the system prompt and the question always stay
        assert request[1] == first_user and "Where is the needle?" in request[1]["content"]
        roles = [message["role"] for message in request]
        assert roles == ["system", "user"] + ["assistant", "user"] * ((len(request) - 2) // 2)  # whole turns
    calls = [event for event in rlm.trace if event.type == "llm_call"]
    removing = [call for call in calls if call.removed_turns]
    assert removing, "the run was long enough to need removing"
    first = removing[0]
    assert first.window == WINDOW and first.request_tokens <= WINDOW - room
    assert first.removed_turns == list(range(1, len(first.removed_turns) + 1))  # the oldest first
    note = last_user(root.requests[first.turn - 1])
    assert NOTE in note and f"turns 1-{first.removed_turns[-1]}" in note
    # Removing went down to REFILL of the budget: the next requests append to an unchanged prefix.
    after = [call for call in calls if call.turn == first.turn + 1][0]
    assert not after.removed_turns and after.prefix_unchanged == after.message_count - 2
    assert first.request_tokens <= REFILL * (WINDOW - room) + 700  # down to the refill mark (one turn's slack)


def test_the_latest_reply_and_output_are_whole_while_old_turns_can_go() -> None:
    replies = [printing(turn) for turn in range(1, 9)] + ["FINAL(done)"]
    rlm, root, _ = make(replies, window=WINDOW, compact=False)
    assert rlm.completion(context="c", query="q") == "done"
    for turn, request in enumerate(root.requests[1:], start=1):
        assert turns_in(request)[-1] == replies[turn - 1]
        assert str(turn % 10) * 2_000 in request[-1]["content"]  # its output, uncut
        assert "characters omitted" not in json.dumps(request)


def test_an_output_too_long_for_the_window_alone_is_cut_in_the_middle() -> None:
    rlm, root, _ = make([repl("print('L' * 30_000)"), "FINAL(done)"], window=WINDOW, max_output_length=100_000)
    assert rlm.completion(context="c", query="q") == "done"
    second = root.requests[1]
    assert model_count(second) + reply_room(WINDOW, None) <= WINDOW
    assert "characters omitted" in second[-1]["content"] and "L" * 500 in second[-1]["content"]
    call = [event for event in rlm.trace if event.type == "llm_call"][1]
    assert call.shortened_outputs == 1


def test_counts_come_from_the_server_and_estimates_only_cover_what_it_has_not_counted() -> None:
    conversation = Conversation("s" * 4_000, "question")
    estimated = conversation.count()
    conversation.add_reply("reply", Usage(input_tokens=700, output_tokens=10))
    conversation.add_observation("o" * 300)
    assert estimated > 700 - 10  # the first estimate was cautious (3 characters a token)
    # The server counted 700 for the first two messages; the reply is its 10 output tokens and
    # the template's; only the new output is estimated.
    assert conversation.count() == 700 + (10 + 4) + (300 // 3 + 4)


def test_a_server_count_of_denser_text_makes_later_estimates_more_cautious() -> None:
    conversation = Conversation("s", "1234567890" * 100)
    conversation.add_reply("r", Usage(input_tokens=1_000, output_tokens=1))  # about one character a token
    conversation.add_observation("9" * 900)
    assert conversation.count() - 1_000 - 5 >= 800  # the new digits are not estimated at 3 a token


def test_a_condenser_decides_what_stands_in_for_removed_turns() -> None:
    class Summary:
        def __init__(self) -> None:
            self.seen: list[tuple[list[dict], list[int]]] = []

        async def condense(self, removed: list[dict], removed_turns: list[int]) -> str:
            self.seen.append((removed, removed_turns))
            return f"(Summary of turns {removed_turns}: {len(removed)} messages.)"

    summary = Summary()
    conversation = Conversation("system", "question", condenser=summary)
    for turn in range(1, 6):
        conversation.add_reply(f"reply {turn}", None)
        conversation.add_observation(f"output {turn} " + "x" * 600)
    fit = asyncio.run(conversation.fit(700, 100, url="http://127.0.0.1/v1"))
    assert fit.removed_turns and fit.removed_turns[0] == 1
    removed, turns = summary.seen[0]
    assert turns == fit.removed_turns and [m["content"] for m in removed][:2] == ["reply 1", "output 1 " + "x" * 600]
    newest = conversation.messages[-1]["content"]
    assert newest.startswith("output 5") and newest.endswith(f"(Summary of turns {turns}: {len(removed)} messages.)")
    assert conversation.messages[1] == {"role": "user", "content": "question"}
    assert isinstance(Conversation("s", "q").condenser, DropTurns)


def test_a_question_the_server_counts_too_long_for_the_window_ends_the_run() -> None:
    rlm, root, _ = make([repl("x = 1"), "FINAL(never)"], window=600)
    with pytest.raises(ContextWindowExceeded) as caught:
        rlm.completion(context="c", query="why? " * 400)
    assert len(root.requests) == 1  # sent on the estimate; once counted, too long to send again
    error = caught.value
    assert error.window == 600 and error.request_tokens > 450 and error.reply_tokens == 150
    for fix in ("context_window=", "max_reply_tokens", "system_prompt='small'", "max_iterations"):
        assert fix in str(error)


def test_without_a_window_nothing_is_counted_against_one() -> None:
    rlm, root, _ = make([printing(turn) for turn in range(1, 4)] + ["FINAL(ok)"])
    assert rlm.completion(context="c", query="q") == "ok"
    calls = [event for event in rlm.trace if event.type == "llm_call"]
    assert all(call.window is None and not call.removed_turns for call in calls)
    assert [event.context_window for event in rlm.trace if event.type == "run_start"] == [None]


# -- a server that refuses a request as too long -----------------------------------------------------


def _printing_turns(count: int) -> list[str]:
    return [printing(turn, 1_500) for turn in range(1, count + 1)] + ["FINAL(done)"]


def test_a_refusal_is_fitted_again_with_the_servers_sizes_and_retried_once() -> None:
    # The server reports no window but enforces 3,000 tokens, as a llama.cpp slot would.
    with FakeOpenAIServer(root=_printing_turns(8), enforced_window=3_000) as server:
        with RLM_REPL("m", "m", api_url=server.url, sandbox="inprocess", max_reply_tokens=200, compact=False) as rlm:
            assert rlm.completion(context="c", query="q") == "done"
        requests = server.chat_requests(root=True)
    calls = [event for event in rlm.trace if event.type == "llm_call"]
    refused = [call for call in calls if call.overflow]
    assert len(refused) == 1  # learned once; later requests are fitted to the learned window
    overflow = refused[0].overflow
    assert overflow["status"] == 400 and overflow["window"] == 3_000 and overflow["request_tokens"] > 3_000
    assert refused[0].window == 3_000 and refused[0].removed_turns
    sizes = [estimate_tokens(sum(len(m["content"]) for m in request["messages"])) for request in requests]
    answered = [size for size in sizes if size <= 3_000]
    assert len(requests) == len(answered) + 1 == len(calls) + 1
    assert all(call.window == 3_000 for call in calls[refused[0].turn - 1:])


def test_a_second_refusal_is_context_window_exceeded_with_the_numbers() -> None:
    with FakeOpenAIServer(root=["FINAL(never)"], enforced_window=400) as server:
        with RLM_REPL("m", "m", api_url=server.url, sandbox="inprocess", max_reply_tokens=64) as rlm:
            with pytest.raises(ContextWindowExceeded) as caught:
                rlm.completion(context="c", query="q")
        assert len(server.chat_requests(root=True)) == 1  # refused, then too long to send at all
    assert caught.value.window == 400 and caught.value.reply_tokens == 64
    end = [event for event in rlm.trace if event.type == "run_end"][0]
    assert end.status == "error" and end.reason.startswith("ContextWindowExceeded: ")


def test_a_child_runs_overflow_fails_its_rlm_query_only() -> None:
    code = repl("try:\n    rlm_query('sub question', context='x')\nexcept Exception as exc:\n    print('caught:', exc)")
    root_script = [code, "FINAL(parent done)"]

    def child_server(messages: list[dict]) -> str:
        if messages[0]["role"] == "system":  # the child's root request: refused, as a small server would
            raise ContextWindowExceeded("too long", url="http://127.0.0.1/scripted", status=400, window=300,
                                        request_tokens=1_200)
        return "sub answer"

    rlm, root, _ = make(root_script, child_server, max_depth=2)
    assert rlm.completion(context="c", query="q") == "parent done"
    feedback = last_user(root.requests[1])
    assert "caught:" in feedback and "context window of 300 tokens" in feedback
    assert [event.status for event in rlm.trace if event.type == "run_end"] == ["answered"]
