"""A large synthetic trajectory (about 5,000 events) for the viewer's tests, written in the
format the tracer writes: root turns with one cell each, a wide batch of sub-calls per cell,
and a child run under some cells."""

from __future__ import annotations

import json
from pathlib import Path

from rlm.utils.tracing import CodeExec, Final, LLMCall, RunEnd, RunStart, SubCall

RUN = "20250101T000000Z-b16b16b1"
NEEDLE = "zebra-crossing-777"  # appears once: in the last sub-call's reply of the last turn
USAGE = {"input_tokens": 120, "output_tokens": 12, "cached_tokens": 0, "cache_write_tokens": 0, "estimated": False}


def write_big_run(path: Path, turns: int = 20, calls: int = 240, latency: float = 0.4) -> Path:
    """Write the trajectory; returns `path`. Events: about turns * (calls + 3) + children.
    Sub-calls start 10 ms apart and take `latency` seconds each."""
    events: list[dict] = []
    clock = 1_700_000_000.0
    events.append(_start(RUN, None, 0, clock).to_dict())
    for turn in range(1, turns + 1):
        clock += 2.0
        events.append(LLMCall(run_id=RUN, turn=turn, model="big-root", new_messages=[
            {"role": "user", "content": f"output of turn {turn - 1}: " + "data " * 60}],
            message_count=2 * turn, prefix_unchanged=2 * turn - 1, reply=f"```repl\nrun_step({turn})\n```",
            usage=USAGE, cost=0.001, latency=1.5, ts=clock).to_dict())
        for index in range(calls):
            clock += 0.01
            reply = NEEDLE if (turn, index) == (turns, calls - 1) else f"finding {turn}.{index}"
            events.append(SubCall(run_id=RUN, depth=1, turn=turn, model="big-sub", prompt=f"chunk {turn}.{index}: "
                                  + "lorem ipsum " * 25, reply=reply, usage=USAGE, cost=0.0001, latency=latency,
                                  batch_index=index, kind="llm_query_batched", cell=turn, batch_size=calls,
                                  ts=clock).to_dict())
        if turn % 5 == 0:
            events += _child(turn, clock)
        clock += 0.5
        events.append(CodeExec(run_id=RUN, turn=turn, index=turn, code=f"run_step({turn})", stdout="ok " * 50,
                               stderr="", error=None, timed_out=False, restarted=False, duration=3.0,
                               ts=clock).to_dict())
    events.append(Final(run_id=RUN, turn=turns, answer="big answer", source="code", ts=clock).to_dict())
    events.append(RunEnd(run_id=RUN, status="answered", answer="big answer", turns=turns,
                         duration=clock - 1_700_000_000.0, usage={"total_cost": 0.5, "sub": {"calls": turns * calls}},
                         ts=clock).to_dict())
    path.write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    return path


def _start(run_id: str, parent: str | None, depth: int, ts: float, **origin: int) -> RunStart:
    return RunStart(run_id=run_id, parent_id=parent, depth=depth, ts=ts, query=f"question of {run_id}",
                    context={"type": "str", "total_length": 10_000_000}, root_model="big-root", sub_model="big-sub",
                    sandbox="subprocess", max_iterations=20, system_prompt="system prompt " * 100, **origin)


def _child(turn: int, clock: float) -> list[dict]:
    child = f"{RUN}-child{turn}"
    events = [_start(child, RUN, 1, clock, parent_turn=turn, parent_cell=turn, batch_index=0).to_dict()]
    for number in (1, 2):
        events.append(LLMCall(run_id=child, parent_id=RUN, depth=1, turn=number, model="big-sub",
                              new_messages=[{"role": "user", "content": "child message"}], message_count=2,
                              prefix_unchanged=1, reply="FINAL(child)" if number == 2 else "```repl\nx = 1\n```",
                              usage=USAGE, cost=0.0002, latency=0.2, ts=clock + 0.2 * number).to_dict())
    events.append(Final(run_id=child, parent_id=RUN, depth=1, turn=2, answer="child", source="reply",
                        ts=clock + 0.4).to_dict())
    return events
