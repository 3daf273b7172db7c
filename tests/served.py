"""What the front-end tests share: a scripted root model that many runs can use at once, and
`rlm api` / `rlm mcp --http` started for real as child processes.

The root model's script is chosen by a tag in the question ("[length] How long is it?"), and
its turn by the number of messages, so concurrent runs each follow their own script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rlm.testing import FakeReply, is_root_request

FENCE = "```"


def _repl(code: str) -> str:
    return f"{FENCE}repl\n{code}\n{FENCE}"


# tag -> the root model's replies, turn by turn
SCRIPTS = {
    "length": [_repl("answer = str(len(context))"), "FINAL_VAR(answer)"],
    "echo": [_repl("FINAL(context if isinstance(context, str) else ' | '.join(context))")],
    # Each run lists its scratch directory (which no other run may share), leaves a file there,
    # and keeps its context in a variable (which no other run may see) until the next turn.
    "isolate": [
        _repl("import os\nseen = sorted(os.listdir('.'))\nopen('mark', 'w').write(context)\nmine = context"),
        _repl("FINAL(f'{mine}|{seen}')"),
    ],
    "sleep": [_repl("import time\ntime.sleep(60)")],
    "subcalls": [_repl("replies = [llm_query(f'part {i}') for i in range(2)]"), "FINAL(two parts)"],
    "slow-sub": [_repl("llm_query('slow please')")],
}
SUB_DELAY = 30.0  # seconds a "slow please" sub-call waits
ROOT_DELAY = 0.2  # seconds each root reply takes, so concurrent runs overlap for a measurable time


def responder(request: dict) -> FakeReply:
    """The fake endpoint's answer: the sub-model echoes, the root model follows its script."""
    messages = request["messages"]
    if not is_root_request(request):
        prompt = messages[-1]["content"]
        return FakeReply(f"sub: {prompt}", delay=SUB_DELAY if "slow please" in prompt else 0.0)
    first = messages[1]["content"]
    tag = next(name for name in SCRIPTS if f"[{name}]" in first)
    turn = (len(messages) - 2) // 2
    script = SCRIPTS[tag]
    return FakeReply(script[min(turn, len(script) - 1)], delay=ROOT_DELAY if tag == "isolate" else 0.0)


def child_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RLM_")}
    env["PYTHONWARNINGS"] = "error"
    env.update(extra)
    return env


class Served:
    """`python -m rlm <args>` serving HTTP on a free port, its URL read from its stdout."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, stderr_path: Path) -> None:
        self._stderr_path = stderr_path
        self._stderr = open(stderr_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rlm", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, env=env, cwd=cwd,
        )
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise AssertionError(f"the server did not start: {self.stderr()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self._stderr_path.read_text(encoding="utf-8")

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit status."""
        self.process.terminate()
        try:
            code = self.process.wait(timeout=15)
        finally:
            self.process.kill()
            self.process.stdout.close()
            self._stderr.close()
        return code


def wait_for(condition, timeout: float = 10.0, step: float = 0.01) -> float:
    """Seconds until `condition()` held; AssertionError after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(step)
    return time.monotonic() - started
