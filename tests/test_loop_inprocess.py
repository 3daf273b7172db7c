"""What a run on the in-process sandbox must leave to the host: its Ctrl-C, its sys.stdout and sys.stderr."""

from __future__ import annotations

import signal
import sys
import threading
import time

import pytest

from helpers import make, repl


def test_ctrl_c_while_a_cell_runs_propagates_out_of_completion(capsys: pytest.CaptureFixture[str]) -> None:
    """In the host process a KeyboardInterrupt is the user's Ctrl-C, not a cell error for the model."""
    streams = sys.stdout, sys.stderr
    rlm, root, _ = make([repl("while True:\n    pass"), "FINAL(the loop went on)"], exec_timeout=10)
    # A real SIGINT to the main thread, as a terminal's Ctrl-C. The cell runs in a helper
    # thread of the run; closing the session interrupts it (Python code stops at once).
    ctrl_c = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    started = time.monotonic()
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            rlm.completion(context="c", query="q")
    finally:
        ctrl_c.cancel()
        ctrl_c.join()
    assert time.monotonic() - started < 2.5  # the looping cell was cut short
    assert len(root.requests) == 1
    assert rlm.trace[-1].type == "run_end" and rlm.trace[-1].status == "error"
    assert sys.stdout is streams[0] and sys.stderr is streams[1]


@pytest.mark.parametrize(
    "cell",
    ["print('hi')\nimport sys\nprint('err', file=sys.stderr)", "1 / 0", "while True:\n    pass"],
    ids=["prints", "raises", "times_out"],
)
def test_after_a_run_sys_stdout_and_stderr_are_the_original_objects(
    capsys: pytest.CaptureFixture[str], cell: str
) -> None:
    streams = sys.stdout, sys.stderr
    rlm, _, _ = make([repl(cell), "FINAL(done)"], exec_timeout=0.5)
    assert rlm.completion(context="c", query="q") == "done"
    assert sys.stdout is streams[0] and sys.stderr is streams[1]
    assert capsys.readouterr() == ("", "")  # and the cell's output never reached the host's streams
