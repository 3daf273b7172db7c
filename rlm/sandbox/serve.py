"""The worker process: it confines itself as the host asks, then serves frames until told to stop.

Started as `python -I -c BOOT` (subprocess.py) or forked by the fork server (forkserver.py),
it talks JSON frames (protocol.py) on its stdin/stdout and receives descriptors on the file
channel; `Session` (worker.py) runs the cells. It leaves, with everything it started, when
the host goes.

Standard library only, like worker.py: start-up time counts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from rlm.sandbox.worker import LLMQueryError, Session, _pending_interrupt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["main"]

_session: Session | None = None


def _on_sigint(signum: int, frame: object) -> None:
    # Interrupt only model code; anywhere else (protocol I/O) remember it for later.
    if _session is not None and _session.running_user_code:
        raise KeyboardInterrupt
    _pending_interrupt.set()


def main() -> None:
    """Serve one session over frames on stdin/stdout until 'shutdown' or end of input.

    argv: [.., sys.path prefix, file-channel fd, (host pid)]: the Unix socket on which the
    host passes the context's file descriptor (see protocol.py); the host's pid when the
    fork server made us (see forkserver.py).
    """
    global _session
    from rlm.sandbox import subcalls
    from rlm.sandbox.confine import apply
    from rlm.sandbox.protocol import HOST_FRAMES, FrameReader, write_bytes, write_frame

    # Keep the protocol on private descriptors, and point fds 0/1 elsewhere so that stray
    # writes from model code (os.write(1, ...), C extensions) cannot corrupt a frame.
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull, encoding="utf-8")
    reader = FrameReader(proto_in, schema=HOST_FRAMES)
    files = int(sys.argv[2])
    # A worker forked by the fork server is not the host's child: it watches the host itself.
    host = os.pidfd_open(int(sys.argv[3])) if len(sys.argv) > 3 else None
    os.write(files, b"\0")  # the kernel attaches our credentials: the host learns our pid as it sees it
    write_frame(proto_out, {"op": "hello", "pid": os.getpid()})
    setup = reader.read()
    facts = apply(setup)  # limits, Landlock, seccomp: before any thread starts (see confine.py)
    subcalls.remember_scratch(os.getcwd())  # where large rlm_query contexts go: model code may chdir
    # A process forked by model code (where fork is allowed) must not talk to the host too.
    os.register_at_fork(after_in_child=lambda: [os.close(fd) for fd in (proto_in, proto_out, files)])

    bridge_lock = threading.Lock()  # model code may call llm_query from several threads
    in_flight: list = [None]  # the id of the "exec" running now: its sub-calls carry it

    def bridge(kind: str, prompts: list) -> list[str]:
        answers: list[str] = []
        with bridge_lock:
            if in_flight[0] is None:
                raise LLMQueryError(f"{kind} can only be called while a cell runs, not from a thread it left behind")
            try:
                for frame, sealed in subcalls.requests(kind, prompts, in_flight[0]):
                    subcalls.send_files(files, sealed)
                    write_bytes(proto_out, frame)
                    answers += _answers(reader, kind)
            except ValueError as exc:  # a prompt too large for a frame: told without our frames
                raise ValueError(str(exc)) from None
        return answers

    _session = Session(bridge, process_wide=True, tools=setup.get("tools"))  # host tools: names, never code
    signal.signal(signal.SIGINT, _on_sigint)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(), host, proto_out), daemon=True).start()
    # Sent before any model code runs: what confinement the worker applied (for the trajectory).
    write_frame(proto_out, {"op": "ready", "pid": os.getpid(), **facts})
    _serve(_session, reader, proto_out, files, bridge_lock, in_flight)


def _answers(reader: Any, kind: str) -> list[str]:
    """The host's answers to one sub-call request: its llm_result frames, until one says no more follow.

    Answers too many for the worker's memory are dropped, and the frames still due read all the
    same (so the next frame read is the next request's), before MemoryError is raised.
    """
    from rlm.sandbox.protocol import ProtocolError

    answers: list[str] | None = []
    error = None
    more = True
    while more:
        try:
            reply = reader.read()
        except MemoryError:  # the frame stays in the reader: read again with the answers dropped
            if answers is None:
                raise
            answers = None
            continue
        if reply["op"] != "llm_result":
            raise ProtocolError(f"the host answered a sub-call with {reply['op']!r}")
        error, more = error or reply.get("error"), reply["more"]
        if answers is not None and "results" in reply:
            try:
                answers += reply["results"]
            except MemoryError:
                answers = None
    if error:
        raise LLMQueryError(error)
    if answers is None:
        raise MemoryError(f"{kind}: the answers do not fit in the REPL's memory (memory_limit); ask for fewer at once")
    return answers


_REQUESTS = ("exec", "load_context", "get_var")
_CUT_FIELDS = ("stdout", "stderr", "final", "value", "error")  # cut, longest first, to fit a frame


def _serve(session: Session, reader: Any, out: int, files: int, bridge_lock: Any, in_flight: list) -> None:
    """Answer the host's requests until 'shutdown' or end of input."""
    from rlm.sandbox.protocol import ProtocolError, fit_frame, write_bytes

    while True:
        try:
            message = reader.read()
        except ProtocolError:  # end of input: the host is gone (it kills us when it closes a session)
            _leave_orphaned()
        op = message["op"]
        if op == "shutdown":
            return
        _pending_interrupt.clear()
        in_flight[0] = message["id"] if op == "exec" else None
        if op in _REQUESTS:
            reply = _dispatch(session, message, files)
        else:
            reply = {"op": "error", "error": f"unexpected op {op!r}"}
        # Under the bridge's lock: a sub-call from a thread the cell left running is sent before
        # this reply, or not at all.
        with bridge_lock:
            in_flight[0] = None
            write_bytes(out, fit_frame({**reply, "id": message.get("id", 0)}, _CUT_FIELDS))


def _exit_when_orphaned(parent: int, host: int | None, proto_out: int) -> None:
    """If the host dies without closing us (SIGKILL, say), remove our scratch files and exit.

    The host's death closes the read end of our output pipe (poll reports an error on ours);
    a change of parent, or the host's pidfd turning readable when our parent is the fork
    server, catches a host whose pipe lives on in a process it forked.
    """
    import select

    watch = select.poll()
    watch.register(proto_out, select.POLLERR)
    if host is not None:
        watch.register(host, select.POLLIN)
    while not watch.poll(500) and (host is not None or os.getppid() == parent):
        pass
    _leave_orphaned()


def _leave_orphaned() -> None:
    """Kill what model code started, remove our scratch files and exit (from either thread:
    whichever sees the host go first). At the confined levels model code cannot start a
    process, and the kill finds nothing (it may not even be allowed to look)."""
    from rlm.sandbox.kernel import kill_descendants

    try:
        kill_descendants(os.getpid())
    except OSError:
        pass
    scratch = os.getcwd()
    if os.path.basename(scratch).startswith("rlm-session-"):
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    os._exit(70)


def _dispatch(session: Session, message: dict, files: int) -> dict:
    """The reply to one request, its texts within the caps the host states (protocol.py)."""
    from rlm.sandbox.protocol import MAX_ANSWER_CHARS, MAX_ERROR_CHARS, MAX_NAMES
    from rlm._text import truncate_middle

    op = message["op"]
    try:
        if op == "exec":
            reply = {"op": "result", **session.execute(message["code"], message["max_output"])}
        elif op == "load_context":
            reply = {"op": "context", **_load_context(session, message, files)}
        else:
            reply = {"op": "var", **session.get_variable(message["name"])}
            if "names" in reply:
                reply["names"] = reply["names"][:MAX_NAMES]
    except (OSError, ValueError, MemoryError, RecursionError) as exc:
        reply = {"op": "error", "error": f"{type(exc).__name__}: {exc}"}
    for name, cap in (("final", MAX_ANSWER_CHARS), ("value", MAX_ANSWER_CHARS), ("error", MAX_ERROR_CHARS)):
        if isinstance(reply.get(name), str):
            reply[name] = truncate_middle(reply[name], cap)
    return reply


def _load_context(session: Session, message: dict, files: int) -> dict:
    name = message.get("name", "context")
    if "value" in message:
        return session.set_context(message["value"], name=name)
    if "text" in message:
        return session.set_context(message["text"], message["text"].encode(), name=name)
    if "json" in message:
        return session.set_context(json.loads(message["json"]), name=name)
    return session.load_context_fd(_receive_fd(files), message["format"], name=name)


def _receive_fd(channel: int) -> int:
    """The next file descriptor the host passed on the file channel (see protocol.py)."""
    import socket

    sock = socket.socket(fileno=channel)
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    finally:
        sock.detach()  # the channel stays open for the next context
    if len(fds) != 1:
        raise OSError("the context's file descriptor did not arrive")
    return fds[0]


if __name__ == "__main__":
    main()
