"""Replay: run a recorded trajectory again with the model's replies served from the file.

The loop, the REPL and the code the model wrote all run for real; only the model calls are
answered from the recording: each run's root turns in order (a run is recognised by its
first user message), sub-calls by their prompt. The first point where the new run departs
from the recording is kept as a `Divergence`:

- a root request whose new messages (or system prompt) differ from the recorded ones,
- a turn the recording does not have, or a child run with a question it does not have,
- a sub-call prompt that is not in the recording,
- a different final answer, status or number of turns, or a context of another size.

    from rlm.replay import replay_run
    result = replay_run("runs/RUN.jsonl", context=Path("book.txt"))
    print(result.describe())

For tests, `rlm.testing.replay_clients(path)` gives the two clients to pass to `RLM_REPL`.
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from rlm.errors import BudgetExceeded, ClientError, ContextWindowExceeded, RLMError
from rlm.sandbox import SubCallFailed
from rlm.tools import Tool
from rlm.trajectory import RunNode, Trajectory, load
from rlm.usage import Usage
from rlm.utils import prompts
from rlm.utils.endpoint import status_error
from rlm.utils.llm import Completion
from rlm.utils.tracing import Event, RunEnd, RunStart

__all__ = ["Divergence", "ReplayDiverged", "ReplayClient", "ReplaySession", "ReplayResult", "replay_run"]

REPLAY_URL = "http://127.0.0.1/replay"  # a loopback URL: replayed calls cost nothing


@dataclass(frozen=True)
class Divergence:
    """Where a replay first left its recording. `kind` is one of: root_request, system_prompt,
    extra_turn, extra_compaction, unknown_run, sub_call, tool_call, answer, status, turns, context."""

    kind: str
    detail: str
    run_id: str | None = None
    turn: int | None = None
    recorded: str | None = None
    now: str | None = None

    def describe(self) -> str:
        """A few lines for a person: what differed, where, and both versions around it."""
        where = f" at turn {self.turn}" if self.turn else ""
        lines = [f"replay diverged{where} ({self.kind}): {self.detail}"]
        if self.recorded is not None or self.now is not None:
            recorded, now = _around_difference(self.recorded or "", self.now or "")
            lines += [f"  recorded: {recorded}", f"  now:      {now}"]
        return "\n".join(lines)


class ReplayDiverged(RLMError):
    """Raised into the run when a model call cannot be served from the recording."""

    def __init__(self, divergence: Divergence) -> None:
        super().__init__(divergence.describe())
        self.divergence = divergence


class _Recording:
    """A trajectory indexed for serving: runs by their first user message, sub-call outcomes by prompt."""

    def __init__(self, trajectory: Trajectory) -> None:
        self.trajectory = trajectory
        self.top = trajectory.root
        self.runs_by_question: dict[str, list[RunNode]] = defaultdict(list)
        for run in trajectory.walk():
            self.runs_by_question[_first_user(run)].append(run)
        self.sub_calls: dict[str, list[dict]] = defaultdict(list)
        self.tool_calls: dict[tuple[str, str], list[dict]] = defaultdict(list)  # by (name, arguments)
        self.summaries = [event for event in trajectory.events if event["type"] == "compaction"]  # in order
        later_calls = {e["run_id"]: i for i, e in enumerate(trajectory.events) if e["type"] == "llm_call"}
        for position, event in enumerate(trajectory.events):
            if event["type"] == "tool_call":
                self.tool_calls[(event["name"], event["arguments"])].append(event)
            if event["type"] == "sub_call" and not event.get("cache_hit"):
                went_on = later_calls.get(event["run_id"], -1) > position
                self.sub_calls[event["prompt"]].append({**event, "_went_on": went_on})

    @property
    def settings(self) -> dict[str, Any]:
        """The recorded settings; files without them give the run_start fields they do have."""
        start = self.top.start or {}
        basics = {"max_iterations": start.get("max_iterations"), "sandbox": start.get("sandbox")}
        return {**basics, **(start.get("settings") or {})}


class _RecordedTool(Tool):
    """A replay's stand-in for a host tool, shown with the signature the recorded run showed."""

    def __init__(self, fn: Any, *, shown: str, **options: Any) -> None:
        super().__init__(fn, **options)
        object.__setattr__(self, "_shown", shown)

    def signature(self) -> str:
        return self._shown


def _first_user(run: RunNode) -> str:
    first = run.turns[0].call if run.turns and run.turns[0].call else None
    messages = [m for m in (first or {}).get("new_messages", []) if m.get("role") != "system"]
    return str(messages[0].get("content") or "") if messages else ""


class ReplaySession:
    """Serves one replay: both clients share it. `divergence` is the first one found."""

    def __init__(self, trajectory: Trajectory) -> None:
        self.recording = _Recording(trajectory)
        start = trajectory.root.start or {}
        self.root = ReplayClient(self, str(start.get("root_model") or "replay"))
        self.sub = ReplayClient(self, str(start.get("sub_model") or "replay"))
        self.divergence: Divergence | None = None
        self._lock = threading.Lock()
        self._served_turns: set[tuple[str, int]] = set()
        self._refused: set[tuple[str, int]] = set()  # turns whose recorded first attempt was refused again
        self._sub_served: dict[str, int] = defaultdict(int)
        self._tool_served: dict[tuple[str, str], int] = defaultdict(int)

    # -- serving ------------------------------------------------------------------------------

    def answer(self, messages: list[dict]) -> Completion:
        """The recorded reply to this request, or ReplayDiverged."""
        with self._lock:
            if self.divergence is not None:
                raise ReplayDiverged(self.divergence)
            if messages and messages[0].get("content") == prompts.SUMMARY_PROMPT:
                return self._summary()
            if messages and messages[0].get("role") == "system":
                return self._root_turn(messages)
            return self._sub_call(str(messages[0].get("content") or "") if messages else "")

    def _summary(self) -> Completion:
        """The next recorded compaction's summary (rlm.compaction); an empty one if it failed."""
        if not self.recording.summaries:
            self._diverge(Divergence("extra_compaction", "the run summarised old turns; the recording did not"))
        event = self.recording.summaries.pop(0)
        return _completion({"reply": event.get("summary"), "usage": event.get("usage")})

    def _root_turn(self, messages: list[dict]) -> Completion:
        replies = [str(m.get("content") or "") for m in messages if m.get("role") == "assistant"]
        run, turn = self._find_run(messages, replies, _new_messages(messages))
        call = _call(run, turn)
        if call is None:
            refusal = _refusal(run, turn)
            if refusal is not None:
                raise refusal  # the recorded run failed here: its request did not fit the window
            self._diverge(Divergence(
                "extra_turn", f"the run asked for turn {turn}; the recording ended after {turn - 1} turn(s) "
                f"(status {run.status})", run.run_id, turn))
        overflow = call.get("overflow")
        if overflow and (run.run_id, turn) not in self._refused:
            self._refused.add((run.run_id, turn))  # the first attempt was refused as too long: again
            raise status_error(REPLAY_URL, int(overflow.get("status") or 400), str(overflow.get("body") or ""))
        self._compare_request(run, turn, messages, call)
        self._served_turns.add((run.run_id, turn))
        return _completion(call)

    def _find_run(self, messages: list[dict], replies: list[str], now: list[tuple]) -> tuple[RunNode, int]:
        question = str(messages[1].get("content") or "") if len(messages) > 1 else ""
        candidates = self.recording.runs_by_question.get(question, [])
        top = self.recording.top
        if not candidates and not any(run_id == top.run_id for run_id, _ in self._served_turns):
            # The top run asks first (again, after a refusal), before any child: compare it to
            # report how it differs, or serve its recorded end.
            return top, self._next_turn(top, replies)
        if not candidates:
            self._diverge(Divergence(
                "unknown_run", "a run (rlm_query) asked a first question the recording does not have", now=question))
        # Runs asked the same question are told apart by the replies already served to them; the
        # request holds the latest of them (old turns may have been taken out to fit a window).
        # Best: the run whose recorded request is this one, not served yet (runs may be identical).
        turns = [(run, self._next_turn(run, replies)) for run in candidates]
        return min(turns, key=lambda found: (
            not _replies_end(found[0], found[1], replies), _recorded_new(_call(*found)) != now,
            (found[0].run_id, found[1]) in self._served_turns,
        ))

    def _next_turn(self, run: RunNode, replies: list[str]) -> int:
        """The turn of `run` this request is: its first turn not served yet whose recorded earlier
        replies end with the request's `replies`, else its first turn not served yet (replies
        may have been cut to fit a window)."""
        turn = len(replies) + 1
        unserved = [t for t in range(turn, len(run.turns) + 2) if (run.run_id, t) not in self._served_turns]
        return next((t for t in unserved if _replies_end(run, t, replies)), unserved[0] if unserved else turn)

    def _compare_request(self, run: RunNode, turn: int, messages: list[dict], call: dict) -> None:
        system = (run.start or {}).get("system_prompt")
        if turn == 1 and system is not None and messages[0].get("content") != system:
            self._diverge(Divergence("system_prompt", "the system prompt differs from the recorded one",
                                     run.run_id, turn, system, str(messages[0].get("content"))))
        now, recorded = _new_messages(messages), _recorded_new(call)
        if now != recorded:
            pairs = enumerate(zip(recorded, now))
            index = next((i for i, (old, new) in pairs if old != new), min(len(now), len(recorded)))
            self._diverge(Divergence(
                "root_request", f"new message {index + 1} sent to the model differs from the recorded one "
                f"({len(now)} new message(s) now, {len(recorded)} recorded)", run.run_id, turn,
                _message_text(recorded, index), _message_text(now, index)))

    def _sub_call(self, prompt: str) -> Completion:
        outcomes = self.recording.sub_calls.get(prompt)
        if not outcomes:
            closest = max(self.recording.sub_calls, key=lambda p: _common_prefix(p, prompt), default=None)
            self._diverge(Divergence("sub_call", "a sub-call prompt that is not in the recording (closest recorded "
                                     "prompt shown)", recorded=closest, now=prompt))
        served = self._sub_served[prompt]
        self._sub_served[prompt] = served + 1
        event = outcomes[min(served, len(outcomes) - 1)]
        if event.get("error"):
            status = 400 if event["_went_on"] else 503  # a rejected request the run survived, or a fatal one
            raise ClientError(str(event["error"]), url=REPLAY_URL, status=status)
        # A sub-call that had no text was recorded as failed (above): an empty reply here was sent as "".
        return replace(_completion(event), content_missing=False)

    def tool_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A host tool's recorded result for these arguments (the recorded failure raised as it
        reached model code), in place of the tool itself."""
        arguments = json.dumps({"args": list(args), "kwargs": kwargs})
        with self._lock:
            outcomes = self.recording.tool_calls.get((name, arguments))
            if not outcomes:
                self._diverge(Divergence("tool_call", f"a call of tool {name!r} with arguments that are not in the "
                                         "recording", now=arguments))
            served = self._tool_served[(name, arguments)]
            self._tool_served[(name, arguments)] = served + 1
        event = outcomes[min(served, len(outcomes) - 1)]
        if event.get("error"):
            raise SubCallFailed(str(event["error"]))
        return json.loads(event["result"])

    def tools(self, specs: list[dict]) -> dict[str, Tool]:
        """Stand-ins for the recorded tools (`settings.tools` / `sub_tools`): values as they were,
        functions answering from the recording, each shown to the model with its recorded signature."""
        tools: dict[str, Tool] = {}
        for spec in specs:
            name = spec["name"]
            if "value" in spec:
                tools[name] = Tool(json.loads(spec["value"]), name=name, description=spec.get("doc") or "")
            else:
                tools[name] = _RecordedTool(lambda *a, _n=name, **k: self.tool_call(_n, *a, **k), name=name,
                                            description=spec.get("doc") or "", shown=spec.get("signature") or name)
        return tools

    def _diverge(self, divergence: Divergence) -> None:
        if self.divergence is None:
            self.divergence = divergence
        raise ReplayDiverged(self.divergence)

    # -- checks outside model calls -----------------------------------------------------------

    def observe(self, event: Event) -> None:
        """An on_event listener: compares the new top run's context size with the recorded one."""
        if isinstance(event, RunStart) and event.parent_id is None:
            recorded = (self.recording.top.start or {}).get("context")
            if recorded is not None and _sizes(recorded) != _sizes(event.context):
                with self._lock:
                    if self.divergence is None:
                        self.divergence = Divergence(
                            "context", "the context is not the recorded one (type or lengths differ)",
                            recorded=str(_sizes(recorded)), now=str(_sizes(event.context)))

    def check_end(self, answer: str | None, status: str, turns: int) -> Divergence | None:
        """Compare how the new run ended with the recording; returns the first divergence."""
        top = self.recording.top
        if self.divergence is None:
            recorded_turns = top.end.get("turns") if top.end else len(top.turns)
            if answer != top.answer:
                self.divergence = Divergence("answer", "the final answer differs", top.run_id, None, top.answer, answer)
            elif status != top.status:
                self.divergence = Divergence("status", f"the run ended {status!r}; the recording ended {top.status!r}",
                                             top.run_id)
            elif recorded_turns is not None and turns != recorded_turns:
                self.divergence = Divergence(
                    "turns", f"the run took {turns} turn(s); the recording took {recorded_turns}", top.run_id)
        return self.divergence

    def assert_same(self, answer: str | None, status: str = "answered", turns: int | None = None) -> None:
        """For tests: raise AssertionError describing the divergence, if any."""
        top = self.recording.top
        recorded_turns = top.end.get("turns") if top.end else len(top.turns)
        divergence = self.check_end(answer, status, recorded_turns if turns is None else turns)
        if divergence is not None:
            raise AssertionError(divergence.describe())


class ReplayClient:
    """An `LLMClient` answering from a recording (see `ReplaySession`)."""

    base_url = REPLAY_URL

    def __init__(self, session: ReplaySession, model: str) -> None:
        self.session = session
        self.model = model

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        return self.session.answer(messages)

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        return self.session.answer(messages)

    def context_window(self) -> int | None:
        """The window the recorded run was fitted to (as the server reported it then)."""
        recording = self.session.recording
        window = (recording.top.start or {}).get("context_window") or recording.settings.get("context_window")
        return int(window) if window else None

    async def aclose(self) -> None:
        return None


def _call(run: RunNode, number: int) -> dict | None:
    return next((t.call for t in run.turns if t.number == number and t.call), None)


def _reply(run: RunNode, number: int) -> str | None:
    call = _call(run, number)
    return str(call.get("reply") or "") if call else None


def _replies_end(run: RunNode, turn: int, replies: list[str]) -> bool:
    """Whether the recorded replies before `turn` end with `replies`."""
    first = turn - len(replies)
    return first >= 1 and [_reply(run, n) for n in range(first, turn)] == replies


def _refusal(run: RunNode, turn: int) -> ContextWindowExceeded | None:
    """The recorded run's end at `turn`, when its request did not fit the window."""
    for event in run.errors:
        if event.get("turn") == turn and event.get("kind") == ContextWindowExceeded.__name__:
            return ContextWindowExceeded(str(event.get("message") or ""), url=REPLAY_URL, status=400)
    return None


def _new_messages(messages: list[dict]) -> list[tuple]:
    """(role, content) of the messages after the last assistant one (after the system prompt on turn 1)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=0)
    return [(m.get("role"), m.get("content")) for m in messages[last + 1:]]


def _recorded_new(call: dict | None) -> list[tuple]:
    """(role, content) of a recorded call's new messages (without a system one: older files had it)."""
    messages = (call or {}).get("new_messages") or []
    return [(m.get("role"), m.get("content")) for m in messages if m.get("role") != "system"]


def _completion(event: dict) -> Completion:
    usage = {k: v for k, v in (event.get("usage") or {}).items() if k in Usage.__dataclass_fields__}
    return Completion(
        text=str(event.get("reply") or ""), usage=Usage(**usage), model=str(event.get("model") or "replay"),
        latency=0.0, finish_reason=event.get("finish_reason"), reasoning=event.get("reasoning"),
        content_missing=not event.get("reply"),
    )


def _sizes(info: dict) -> tuple:
    return info.get("type"), info.get("total_length"), tuple(info.get("chunk_lengths") or ())


def _message_text(messages: list[tuple], index: int) -> str:
    return f"[{messages[index][0]}] {messages[index][1]}" if index < len(messages) else "(no message)"


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _around_difference(recorded: str, now: str, width: int = 70) -> tuple[str, str]:
    """Both texts cut to a window around their first difference, on one line each."""
    at = _common_prefix(recorded, now)
    start = max(0, at - width // 2)

    def cut(text: str) -> str:
        piece = text[start:start + width]
        return ("..." if start else "") + repr(piece)[1:-1] + ("..." if start + width < len(text) else "")

    return cut(recorded), cut(now)


@dataclass
class ReplayResult:
    """What `replay_run` found. `divergence` is None when the new run matched the recording."""

    divergence: Divergence | None
    answer: str | None
    recorded_answer: str | None
    status: str
    turns: int
    events: list[Event] = field(default_factory=list)

    def describe(self) -> str:
        if self.divergence is not None:
            return self.divergence.describe()
        return f"replay matched the recording: {self.turns} turn(s), status {self.status}, answer {self.answer!r}"


def replay_run(
    path: str | os.PathLike | Trajectory, context: Any, *, sandbox: str | None = None,
    log_dir: str | None = None, on_event: Callable[[Event], None] | None = None,
) -> ReplayResult:
    """Run the recorded run again on `context` (the same one it was given), answering model
    calls from the recording; report the first divergence. `sandbox` overrides the recorded one."""
    from rlm.rlm_repl import RLM_REPL

    trajectory = path if isinstance(path, Trajectory) else load(path)
    session = ReplaySession(trajectory)
    options = _options(session.recording.settings, sandbox)
    settings = session.recording.settings
    if settings.get("tools") or settings.get("sub_tools"):
        options.update(tools=session.tools(settings["tools"]), sub_tools=session.tools(settings["sub_tools"]))
    engine = RLM_REPL(client=session.root, sub_client=session.sub, log_dir=log_dir,
                      on_event=_both(session.observe, on_event), **options)
    answer = None
    try:
        answer = engine.completion(context=context, query=trajectory.root.query)
    except (BudgetExceeded, ReplayDiverged, ClientError):
        pass  # run_end says how it ended; the session holds a divergence
    end = next((e for e in reversed(engine.trace) if isinstance(e, RunEnd) and e.parent_id is None), None)
    status = end.status if end is not None else "error"
    turns = end.turns if end is not None else 0
    divergence = session.check_end(answer, status, turns)
    return ReplayResult(divergence, answer, trajectory.root.answer, status, turns, engine.trace)


def _both(first: Callable[[Event], None], second: Callable[[Event], None] | None) -> Callable[[Event], None]:
    if second is None:
        return first

    def listener(event: Event) -> None:
        first(event)
        second(event)

    return listener


def _options(settings: dict[str, Any], sandbox: str | None) -> dict[str, Any]:
    """RLM_REPL keyword arguments from recorded settings (defaults where a file has none)."""
    limits = settings.get("limits") or {}
    recorded_sandbox = settings.get("sandbox")
    options = {
        "max_iterations": settings.get("max_iterations"), "max_output_length": settings.get("max_output_length"),
        "exec_timeout": settings.get("exec_timeout"), "system_prompt": settings.get("prompt"),
        "sub_call_chars": settings.get("sub_call_chars"), "context_window": settings.get("context_window"),
        "max_reply_tokens": settings.get("reply_tokens"), "max_depth": settings.get("max_depth"),
        "max_concurrency": settings.get("max_concurrency"), "cache": settings.get("cache"),
        # Compaction as recorded: off for a run without it (and for recordings older than it).
        "compact": bool(settings.get("compact_at")), "compact_at": settings.get("compact_at"),
        "sandbox": sandbox or (recorded_sandbox if recorded_sandbox not in (None, "custom") else None),
        **{name: limits.get(name) for name in ("max_cost", "max_tokens", "max_sub_calls", "max_time")},
    }
    return {name: value for name, value in options.items() if value is not None}
