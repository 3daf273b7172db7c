"""A hostile worker: model code that writes forged frames on the worker's own protocol pipe.

Every case is judged on the host: what `completion()` returns or raises, what the trajectory
records, whether the next cell runs on a fresh worker, and the host's peak memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from helpers import make, repl
from rlm.errors import RLMError

LEVELS = ["subprocess", "strict"]

# Model code finds the worker's protocol pipe, the request in flight and the file channel in
# the frame loop's locals (walking frames works at every level, /proc or not).
FIND = textwrap.dedent("""\
    import json, os, sys, time
    frame = sys._getframe()
    while frame.f_code.co_name != "_serve":
        frame = frame.f_back
    out, rid, channel = frame.f_locals["out"], frame.f_locals["message"]["id"], frame.f_locals["files"]

    def forge(body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        os.write(out, len(data).to_bytes(4, "big") + data)
""")
RESULT = '{"op": "result", "id": rid, "stdout": "forged", "stderr": "", "error": None, "final": None, "interrupted": False, "duration": 0.0}'

CASES = {
    "gigabyte header": ('os.write(out, (1 << 30).to_bytes(4, "big"))', "over the cap of 4,194,304"),
    "300 MB header": ('os.write(out, (300_000_000).to_bytes(4, "big"))', "over the cap"),
    "empty objects": ('forge(b"[" + b"{}," * 1_300_000 + b"{}]")', "more than 100,000 JSON values"),
    "floats": ('forge(b"[" + b"1.5," * 1_000_000 + b"1.5]")', "more than 100,000 JSON values"),
    "deep nesting": ('forge(b"[" * 200_000 + b"]" * 200_000)', "more than 100,000 JSON values"),
    "nesting under the item cap": ('forge(b"[" * 50_000 + b"]" * 50_000)', "not valid JSON"),
    "not json": ('forge(b"\\xff{op")', "not valid JSON"),
    "unknown op": ('forge({"op": "shell", "id": rid})', "unknown op 'shell'"),
    "wrong type": (f'forge({{**{RESULT}, "stdout": 42}})', "'stdout' of a 'result' frame is a int"),
    "missing key": ('forge({"op": "result", "id": rid})', "without its"),
    "wrong id": (f'forge({{**{RESULT}, "id": rid + 1}})', "for another request"),
    "op out of turn": ('forge({"op": "ready", "pid": 1, "landlock_abi": None, "scratch_size": None, "namespaces": [], "own_root": False})', "'ready' frame where"),
    "non-str prompts": ('forge({"op": "llm_query", "id": rid, "kind": "llm_query", "prompts": [{"a": 1}]})',
                        "prompts of an 'llm_query' request holds a dict"),
    "file announced, none sent": (
        'forge({"op": "llm_query", "id": rid, "kind": "rlm_query", '
        '"prompts": [{"query": "q", "context": None, "format": "text", "file": True}]})',
        "1 context files announced, 0 sent",
    ),
    # A descriptor that grants no reading (O_PATH: Landlock lets it be opened anywhere), which the
    # host, reopening it, would read for the worker; and one that is not a file at all.
    "O_PATH file": (
        'import socket\n'
        'open("scratch.txt", "w").close()\n'
        'socket.send_fds(socket.socket(fileno=os.dup(channel)), [b"c"], [os.open("scratch.txt", os.O_PATH)])\n'
        'forge({"op": "llm_query", "id": rid, "kind": "rlm_query", '
        '"prompts": [{"query": "q", "context": None, "format": "text", "file": True}]})',
        "a context file the worker did not open for reading",
    ),
    "pipe as a file": (
        'import socket\n'
        'socket.send_fds(socket.socket(fileno=os.dup(channel)), [b"c"], [os.pipe()[0]])\n'
        'forge({"op": "llm_query", "id": rid, "kind": "rlm_query", '
        '"prompts": [{"query": "q", "context": None, "format": "text", "file": True}]})',
        "a context file that is not a regular file",
    ),
}


def _hostile_run(level: str, attack: str) -> tuple[str, list]:
    """A scripted run: set a variable, attack, check the variable is gone, answer."""
    replies = [
        repl("kept = 'from before'"),
        repl(FIND + attack + "\ntime.sleep(5)"),
        repl("print('kept' in globals(), llm_query('still works'))"),
        "FINAL(survived)",
    ]
    rlm, _, _ = make(replies, ["SUB OK"], sandbox=level, max_iterations=4)
    answer = rlm.completion(context="ctx", query="q")
    return answer, [event for event in rlm.trace if event.type == "exec"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_frame_ends_that_worker_and_the_run_goes_on(level, case):
    attack, complaint = CASES[case]
    answer, cells = _hostile_run(level, attack)
    assert answer == "survived"
    hostile, after = cells[1], cells[2]
    assert hostile.restarted and not hostile.timed_out
    assert "broke the protocol" in hostile.error and complaint in hostile.error
    assert hostile.duration < 4  # refused at once, not after the cell's sleep
    assert after.error is None and not after.restarted
    assert after.stdout == "False SUB OK\n"  # a fresh worker: the variable is gone, sub-calls work


@pytest.mark.parametrize("level", LEVELS)
def test_a_result_forged_with_the_right_id_is_the_cells_own_and_the_stale_reply_resets(level):
    """Model code in the running cell can learn its id and speak for that cell (as it could by
    printing); the real reply that follows is then out of step, and the next exchange replaces
    the worker instead of reading a previous cell's result."""
    replies = [
        repl(FIND + f"forge({RESULT})\nprint('real')"),
        repl("print('next cell')"),
        repl("print('and the one after')"),
        "FINAL(done)",
    ]
    rlm, _, _ = make(replies, sandbox=level, max_iterations=4)
    assert rlm.completion(context="ctx", query="q") == "done"
    cells = [event for event in rlm.trace if event.type == "exec"]
    assert cells[0].stdout == "forged"
    assert cells[1].restarted and "for another request" in cells[1].error
    assert cells[2].stdout == "and the one after\n" and not cells[2].restarted


@pytest.mark.parametrize("level", LEVELS)
def test_huge_answers_and_errors_are_cut_on_the_way_to_the_host(level):
    replies = [
        repl("raise ValueError('e' * 50_000_000)"),
        repl("print('o' * 3_000_000)"),
        repl("FINAL('x' * 300_000_000)"),
    ]
    rlm, _, _ = make(replies, sandbox=level, max_iterations=3, max_output_length=10_000_000)
    answer = rlm.completion(context="ctx", query="q")
    assert len(answer) < 1_000_300 and "characters omitted" in answer
    error_cell, output_cell = [event for event in rlm.trace if event.type == "exec"][:2]
    assert len(error_cell.error) < 100_300 and "characters omitted" in error_cell.error
    assert 2_000_000 < len(output_cell.stdout) <= 3_000_001


# -- the host's memory ------------------------------------------------------------------------------

_PEAK_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from helpers import make, repl

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))

def run(replies, sub=("sub answer",)):
    rlm, _, _ = make(replies, sub, sandbox=sys.argv[1], max_iterations=len(replies), max_output_length=500_000)
    try:
        return rlm.completion(context="ctx", query="q")
    except Exception as exc:  # the point is the memory; the type is checked by the other tests
        print("raised", type(exc).__name__, file=sys.stderr)

run([repl("print('warm up ' * 100_000)"), repl("FINAL('w' * 2_000_000)")])
baseline = peak_kib()
answer = run(json.loads(sys.argv[2]), ["a" * int(sys.argv[3])] if len(sys.argv) > 3 else ("sub answer",))
print(json.dumps({"baseline": baseline, "peak": peak_kib(), "answer": answer}))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_a_hostile_worker_raises_the_hosts_peak_memory_by_less_than_64_mib(level):
    attacks = [CASES[name][0] for name in ("gigabyte header", "empty objects", "floats", "deep nesting")]
    replies = [repl(FIND + attack + "\ntime.sleep(5)") for attack in attacks]
    replies += [
        repl(FIND + 'forge({"op": "error", "id": rid, "error": "\\U0001F600" + "e" * 4_100_000})'),
        repl("FINAL('x' * 300_000_000)"),
    ]
    probe = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, level, json.dumps(replies)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    memory = json.loads(probe.stdout)
    grown = (memory["peak"] - memory["baseline"]) / 1024
    assert grown < 64, f"host peak memory grew {grown:.1f} MiB ({probe.stderr})"


@pytest.mark.parametrize("level", LEVELS)
def test_a_batch_answered_from_the_cache_costs_the_host_one_reply_frame_not_every_copy(level):
    """10,000 identical prompts make one sub-model call; the 10,000 copies of its 20 KB answer
    (200 MB) go to the worker a frame at a time, never whole in the host."""
    replies = [repl("r = llm_query_batched(['same prompt'] * 10_000)\nFINAL(f'{len(r)} {sum(map(len, r))}')")]
    probe = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, level, json.dumps(replies), "20000"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    memory = json.loads(probe.stdout)
    assert memory["answer"] == "10000 200000000", probe.stderr
    grown = (memory["peak"] - memory["baseline"]) / 1024
    assert grown < 64, f"host peak memory grew {grown:.1f} MiB ({probe.stderr})"


@pytest.mark.parametrize("level", LEVELS)
def test_a_worker_that_does_not_read_its_sub_call_answers_cannot_hold_the_host(level):
    attack = FIND + 'forge({"op": "llm_query", "id": rid, "kind": "llm_query", "prompts": ["p"]})\ntime.sleep(60)'
    replies = [repl(attack), repl("print(llm_query('again')[:3])"), "FINAL(done)"]
    rlm, _, _ = make(replies, lambda messages: "a" * 300_000, sandbox=level, max_iterations=3, exec_timeout=2)
    assert rlm.completion(context="ctx", query="q") == "done"
    hostile, after = [event for event in rlm.trace if event.type == "exec"]
    assert hostile.timed_out and hostile.restarted and "without reading the answers" in hostile.error
    assert hostile.duration < 10
    assert after.stdout == "aaa\n" and not after.restarted


def test_completion_only_ever_raises_our_errors_when_the_worker_misbehaves_on_every_turn():
    attacks = [CASES[name][0] for name in CASES]
    replies = [repl(FIND + attack + "\ntime.sleep(5)") for attack in attacks]
    rlm, _, _ = make(replies, sandbox="subprocess", max_iterations=len(replies))
    try:
        rlm.completion(context="ctx", query="q")
    except RLMError:
        pass  # documented (out of turns, say); anything else fails this test
    cells = [event for event in rlm.trace if event.type == "exec"]
    assert len(cells) == len(attacks) and all(cell.restarted for cell in cells)



@pytest.mark.parametrize("level", LEVELS)
def test_a_forged_rlm_query_context_fails_that_call_only(level):
    """The host never parses a context from a worker: the child's own sandbox does, and its
    failure is the calling model's to see."""
    def sub(messages: list[dict]) -> str:
        return "FINAL(child)" if messages[0]["role"] == "system" else "leaf"

    item = '{"query": "q", "context": "[" * 100_000, "format": "json", "file": False}'
    attack = (f'forge({{"op": "llm_query", "id": rid, "kind": "rlm_query", "prompts": [{item}]}})\n'
              "print(frame.f_locals['reader'].read())")
    replies = [repl(FIND + attack), repl("print(rlm_query('fine'))"), "FINAL(top)"]
    rlm, _, _ = make(replies, sub, sandbox=level, max_depth=2, max_iterations=3)
    assert rlm.completion(context="ctx", query="q") == "top"
    forged, honest = [event for event in rlm.trace if event.type == "exec" and event.depth == 0]
    assert "could not load this context" in forged.stdout and not forged.restarted
    assert honest.stdout == "child\n"


def test_at_max_depth_a_context_file_is_refused_not_read_into_a_prompt():
    replies = [repl("try:\n    rlm_query('q', 'z' * 400_000)\nexcept Exception as exc:\n    print(exc)"), "FINAL(top)"]
    rlm, _, sub = make(replies, sandbox="subprocess", max_depth=1)
    assert rlm.completion(context="ctx", query="q") == "top"
    cell = [event for event in rlm.trace if event.type == "exec"][0]
    assert "cannot carry a context this large" in cell.stdout and sub.requests == []
