"""Helpers shared by the test modules: scripted RLM runs, and running cells in a sandbox."""

from __future__ import annotations

import os
import select
import time
from typing import Any

from rlm.rlm_repl import RLM_REPL
from rlm.sandbox import Sandbox, SubCallFailed, kernel
from rlm.testing import ScriptedModel

FENCE = "```"
SANDBOXES = ["inprocess", "subprocess"]


# -- scripted runs of the root loop ------------------------------------------------------------


def repl(code: str) -> str:
    return f"{FENCE}repl\n{code}\n{FENCE}"


def make(
    root_replies: Any,
    sub_replies: Any = ("sub answer",),
    *,
    window: int | None = None,
    **options: Any,
) -> tuple[RLM_REPL, ScriptedModel, ScriptedModel]:
    """An RLM_REPL over scripted root and sub models (in-process sandbox unless told)."""
    root = ScriptedModel(root_replies, model="root-model", window=window)
    sub = ScriptedModel(sub_replies, model="sub-model")
    options.setdefault("sandbox", "inprocess")
    return RLM_REPL(client=root, sub_client=sub, **options), root, sub


def last_user(request: list[dict]) -> str:
    message = request[-1]
    assert message["role"] == "user"
    return message["content"]


# -- cells run directly in a sandbox -----------------------------------------------------------

TIMEOUT = 10.0
MAX_OUTPUT = 10_000


class RecordingBridge:
    """The host side of `llm_query`: records every call and answers with the prompts upper-cased."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.fail_with: str | None = None
        self.sleep = 0.0
        self.during_call = None  # a function run inside the bridge, in the cell's thread

    def __call__(self, kind: str, prompts: list[str]) -> list[str]:
        self.calls.append((kind, list(prompts)))
        if self.sleep:
            time.sleep(self.sleep)
        if self.during_call is not None:
            self.during_call()
        if self.fail_with is not None:
            raise SubCallFailed(self.fail_with)
        return [prompt.upper() for prompt in prompts]


def run(box: Sandbox, code: str, *, timeout: float = TIMEOUT, max_output: int = MAX_OUTPUT):
    return box.run(code, timeout=timeout, max_output=max_output)


def ok(box: Sandbox, code: str, **kwargs) -> str:
    """Run a cell that must succeed; return its stdout."""
    result = run(box, code, **kwargs)
    assert result.error is None, result.error
    assert not result.timed_out and not result.restarted
    return result.stdout


def read_until_closed(fd: int, deadline: float) -> bytes:
    """Everything read from `fd` (a pty master) until the other side closes it or `deadline`; closes `fd`."""
    chunks = []
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie is gone, only not yet reaped)."""
    return kernel.alive(pid)


def descendants(pid: int) -> set[int]:
    """The live processes below `pid` (children, their children...), read from /proc."""
    return set(kernel.descendants(pid))



def run_readme_example(title: str, cwd: Any) -> tuple[str, str]:
    """Run the first Python example of the README section `title` (warnings as errors, no RLM_
    variables); its stdout, and the output its `# ` comment lines say it prints."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(f"\n{title}\n"):]
    code = re.search(r"```python\n(.*?)\n```", section, re.DOTALL).group(1)
    expected = "".join(line[2:] + "\n" for line in code.splitlines() if line.startswith("# "))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RLM_")}
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=cwd,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout, expected
