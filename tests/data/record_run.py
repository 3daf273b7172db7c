"""Records tests/data/recorded_run.jsonl, the trajectory that tests/test_replay.py replays.

A scripted run over tests/data/recorded_context.txt: it looks at the context, sends a batch of
sub-calls, starts two child runs (max_depth=2) and answers. Record it again only after a
deliberate change to what the model is sent (prompts, REPL feedback), then check the diff:

    python tests/data/record_run.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTEXT = HERE / "recorded_context.txt"
RECORDING = HERE / "recorded_run.jsonl"
QUESTION = "Which line holds the secret number, and what is it?"
FENCE = "```"

ROOT_REPLIES = [
    f"Let me look first.\n{FENCE}repl\nlines = context.splitlines()\nprint(len(lines), lines[0])\n{FENCE}",
    f"{FENCE}repl\nparts = ['\\n'.join(lines[i:i + 10]) for i in range(0, len(lines), 10)]\n"
    f"found = llm_query_batched(['Find the secret number in:\\n' + p for p in parts])\n"
    f"print([f for f in found if 'none' not in f])\n{FENCE}",
    f"{FENCE}repl\nchecks = rlm_query_batched(['Confirm the secret number', 'Which line is it on?'],"
    f" [parts[2], parts[2]])\nprint(checks)\n{FENCE}",
    "Both checks agree.\nFINAL(line 27 holds the secret number 4711)",
]


def sub_model(messages: list[dict]) -> str:
    """Plain sub-calls find the number in the chunk that has it; child runs look, then answer."""
    if messages[0]["role"] == "system":
        turns = sum(1 for m in messages if m["role"] == "assistant")
        if turns == 0:
            return f"{FENCE}repl\nprint([l for l in context.splitlines() if 'secret' in l])\n{FENCE}"
        return "FINAL(4711, on line 27)"
    prompt = messages[0]["content"]
    return "the secret number is 4711 (line 27)" if "4711" in prompt else "none here"


def record(log_dir: Path) -> Path:
    """Run the script with logging to `log_dir`; return the trajectory file."""
    sys.path.insert(0, str(HERE.parent.parent))
    from rlm.rlm_repl import RLM_REPL
    from rlm.testing import ScriptedModel

    root = ScriptedModel(ROOT_REPLIES, model="recorded-root")
    sub = ScriptedModel(sub_model, model="recorded-sub")
    rlm = RLM_REPL(client=root, sub_client=sub, sandbox="inprocess", max_depth=2, max_iterations=6,
                   log_dir=str(log_dir))
    answer = rlm.completion(context=CONTEXT, query=QUESTION)
    assert answer == "line 27 holds the secret number 4711", answer
    return rlm.tracer.path


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copyfile(record(Path(scratch)), RECORDING)
    print(f"wrote {RECORDING}")


if __name__ == "__main__":
    main()
