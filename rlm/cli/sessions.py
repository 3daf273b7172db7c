"""`rlm ask --session NAME`: a multi-turn session kept on disk between invocations.

A session lives in `<runs directory>/sessions/<NAME>/`: `session.json` (the questions and
answers, the contexts' files, and the cells of the root runs with how many sub-calls each
made and whether it failed) and a copy of each context (`context_<n>.txt`). The next `rlm ask --session NAME`
loads the earlier contexts as `context_0`..., puts the questions and answers in `history`,
and re-creates the REPL variables by running the earlier cells again; cells that made
sub-calls or tool calls are not run again (they would ask the models anew), so then the
variables are said to be gone.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from rlm.cli.exits import BadInput
from rlm.sandbox import ContextSource

__all__ = ["SESSION_FILE", "answer_in_session", "session_dir"]

SESSION_FILE = "session.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def session_dir(log_dir: Path | None, name: str) -> Path:
    """Where the session `name` is kept: under `--log-dir`, else $RLM_LOG_DIR, else the user's runs directory."""
    from rlm.trajectory import cli_log_dir

    if not _NAME.fullmatch(name):
        raise BadInput(
            f"session name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return cli_log_dir(log_dir) / "sessions" / name


def answer_in_session(engine: Any, folder: Path, source: str | Path, query: str, say: Any, **options: Any) -> Any:
    """Answer `query` about `source` in the session kept in `folder` (made if new), and keep
    the new question, answer, context and cells there. `say` reports on stderr."""
    import rlm

    kept = _load(folder)
    session = rlm.session(engine)
    if kept["history"]:
        skipped = next((cell for cell in kept["cells"] if cell["calls"]), None)
        # A cell that failed the first time is not run again (its failure would say nothing new).
        cells = None if skipped is not None else [cell["code"] for cell in kept["cells"] if not cell["failed"]]
        contexts = [ContextSource(path=folder / name) for name in kept["contexts"]]
        session.restore(contexts, kept["history"], cells)
        if skipped is not None:
            say(f"session {folder.name}: the REPL variables of earlier questions are gone (a cell made sub-calls, "
                "which are not made again); the contexts and earlier answers are loaded")
    try:
        answer = session.completion(context=source, query=query, **options)
        if session.replay_error is not None:
            say(f"session {folder.name}: some REPL variables of earlier questions are gone ({session.replay_error})")
    finally:
        trace = engine.trace
        session.close()
    _save(folder, kept, source, session.history, trace)
    return answer


def _load(folder: Path) -> dict:
    path = folder / SESSION_FILE
    if not path.exists():
        return {"history": [], "contexts": [], "cells": []}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(
            f"cannot read the session file {path} ({exc}); remove that folder to start the session anew"
        ) from None


def _save(folder: Path, kept: dict, source: str | Path, history: list[dict], trace: list) -> None:
    """Keep the new context, the history and the top run's cells (written last, so that a
    failure before leaves the session as it was)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"context_{len(kept['contexts'])}.txt"
    if isinstance(source, Path):
        shutil.copyfile(source, folder / name)
    else:
        (folder / name).write_text(source, encoding="utf-8")
    top = next((event.run_id for event in trace if event.type == "run_start" and event.parent_id is None), None)
    events = [event for event in trace if event.run_id == top]  # a cell's sub-calls carry its run's id
    calls: dict[int, int] = {}
    for event in events:
        if event.type in ("sub_call", "tool_call"):
            calls[event.cell] = calls.get(event.cell, 0) + 1
    cells = [{"code": event.code, "calls": calls.get(event.index, 0), "failed": event.error is not None}
             for event in events if event.type == "exec"]
    state = {"history": history, "contexts": [*kept["contexts"], name], "cells": [*kept["cells"], *cells]}
    temporary = folder / (SESSION_FILE + ".tmp")
    temporary.write_text(json.dumps(state, ensure_ascii=False, indent=1), encoding="utf-8")
    temporary.replace(folder / SESSION_FILE)
