"""The root loop's sub-calls, its system prompts, state across turns, and the README usage example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers import SANDBOXES, last_user, make, repl
from rlm.errors import ConfigError, EndpointUnreachable
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, ScriptedModel
from rlm.utils import prompts
from rlm.utils.llm import Completion


# -- system prompts --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "cautious", "small"])
def test_named_system_prompts_are_sent_as_the_system_message(name: str) -> None:
    rlm, root, _ = make(["FINAL(x)"], system_prompt=name, max_output_length=4321, sub_call_chars=123_456)
    rlm.completion(context="c", query="q")
    system = root.requests[0][0]
    assert system["role"] == "system"
    assert system["content"] == prompts.system_prompt(name, sub_chars=123_456, max_output=4321)
    assert "4,321" in system["content"] and "123,456" in system["content"]  # placeholders filled
    others = {other for other in ("default", "cautious", "small") if other != name}
    for other in others:
        assert system["content"] != prompts.system_prompt(other, sub_chars=123_456, max_output=4321)


def test_cautious_prompt_asks_for_batches_of_about_200k_characters() -> None:
    assert "200,000" in prompts.system_prompt("cautious")


def test_custom_system_prompt_text_is_used_with_placeholders_filled() -> None:
    text = "You are a test analyst. Print at most {max_output} characters; keep {braces} as they are."
    rlm, root, _ = make(["FINAL(x)"], system_prompt=text, max_output_length=2500)
    rlm.completion(context="c", query="q")
    assert root.requests[0][0] == {
        "role": "system",
        "content": "You are a test analyst. Print at most 2,500 characters; keep {braces} as they are.",
    }


@pytest.mark.parametrize("name", ["fancy", "Default", "", "   "])
def test_unknown_prompt_name_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError):
        make(["FINAL(x)"], system_prompt=name)


# -- sub-calls -------------------------------------------------------------------------------


def _slow_sub(finished: list[int]) -> Callable[[list[dict]], str]:
    lock = threading.Lock()

    def answer(messages: list[dict]) -> str:
        index = int(re.search(r"item (\d+)", messages[0]["content"]).group(1))
        time.sleep(0.02 * (8 - index))  # later prompts answer sooner
        with lock:
            finished.append(index)
        return f"answer-{index}"

    return answer


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_llm_query_batched_returns_results_in_prompt_order(sandbox: str) -> None:
    finished: list[int] = []
    code = "replies = llm_query_batched([f'item {i}' for i in range(8)])\nFINAL(','.join(replies))"
    rlm, _, sub = make([repl(code)], _slow_sub(finished), sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == ",".join(f"answer-{i}" for i in range(8))
    assert len(sub.requests) == 8
    assert finished != sorted(finished)  # they really ran concurrently and finished out of order


class _DownSubModel(ScriptedModel):
    """A sub-model whose endpoint cannot be reached."""

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        raise EndpointUnreachable("the sub-model endpoint could not be reached", url="http://127.0.0.1:9/v1")

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        return self.complete(messages)


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_an_unreachable_sub_model_fails_the_run_even_if_model_code_catches_it(sandbox: str) -> None:
    code = "try:\n    llm_query('hello')\nexcept BaseException as exc:\n    print('swallowed', exc)"
    root = ScriptedModel([repl(code), "FINAL(must not be reached)"])
    rlm = RLM_REPL(client=root, sub_client=_DownSubModel([]), sandbox=sandbox)
    with pytest.raises(EndpointUnreachable):
        rlm.completion(context="c", query="q")
    assert len(root.requests) == 1
    assert rlm.trace[-1].type == "run_end" and rlm.trace[-1].status == "error"
    assert [event.kind for event in rlm.trace if event.type == "error"] == ["EndpointUnreachable"]


def test_llm_query_sends_the_prompt_alone_to_the_sub_model() -> None:
    rlm, root, sub = make([repl("print(llm_query('What is 2+2?'))"), "FINAL(4)"], ["four"])
    assert rlm.completion(context="c", query="q") == "4"
    assert sub.requests == [[{"role": "user", "content": "What is 2+2?"}]]
    assert "four" in last_user(root.requests[1])


def test_state_persists_across_turns() -> None:
    replies = [repl("import math\ndef half(x):\n    return x / 2\nsaved = half(len(context))"),
               repl("print(math.floor(saved))"), "FINAL_VAR(saved)"]
    rlm, root, _ = make(replies)
    assert rlm.completion(context="abcdefg", query="q") == "3.5"
    assert "3" in last_user(root.requests[2])


# -- max_depth=0: no sub-calls ----------------------------------------------------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_max_depth_zero_turns_sub_calls_off_and_the_model_is_told(sandbox: str) -> None:
    code = "try:\n    llm_query('hi')\nexcept Exception as exc:\n    print('single:', exc)\nllm_query_batched(['a'])"
    rlm, root, sub = make([repl(code), "FINAL(done)"], max_depth=0, sandbox=sandbox)
    assert rlm.completion(context="c", query="q") == "done"
    system = root.requests[0][0]["content"]
    assert system == prompts.system_prompt("default", sub_calls=False)
    assert "llm_query" not in system and "sub-model" in system  # it says there is none
    note = last_user(root.requests[1])
    assert "single: sub-calls are off" in note  # an exception model code can catch
    assert note.count("sub-calls are off") == 2  # the batched call raised it too
    assert sub.requests == []
    assert rlm.cost_summary()["sub"]["calls"] == 0


# -- the README usage example ------------------------------------------------------------------

README_EXAMPLE = """\
from rlm.rlm_repl import RLM_REPL
rlm = RLM_REPL(model="auto", recursive_model="auto", max_iterations=10)
result = rlm.completion(context="a very long context ...", query="What is the answer?")
costs = rlm.cost_summary()
print(f"total cost: ${costs['total_cost']:.4f}")
"""


def test_readme_usage_example_runs_as_written(tmp_path: Path) -> None:
    root_script = [repl("print(len(context))"), "FINAL(the answer)"]
    with FakeOpenAIServer(root=root_script, models=["local-model"]) as server:
        env = {key: value for key, value in os.environ.items() if key not in ("RLM_LOG_DIR", "RLM_API_KEY")}
        env["RLM_API_URL"] = server.url
        done = subprocess.run(
            [sys.executable, "-c", README_EXAMPLE], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        root_requests = server.chat_requests(root=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "total cost: $0.0000\n"
    assert len(root_requests) == 2
    assert all(request["model"] == "local-model" for request in root_requests)
    assert "23" in last_user(root_requests[1]["messages"])  # len("a very long context ...")
    assert list(tmp_path.iterdir()) == []
