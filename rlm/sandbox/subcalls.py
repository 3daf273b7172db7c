"""How the worker sends one sub-call to the host: frames under the cap, large contexts as files in scratch.

A frame from the worker may not exceed `protocol.WORKER_FRAME_CAP`, so a call is cut up here:
a batch whose prompts do not fit one frame (or has more than `MAX_BATCH` of them) goes as
several requests, one after the other; a single prompt that cannot fit raises ValueError in
model code, naming the limit. An `rlm_query` context of more than `FILE_CONTEXT_CHARS`
characters does not travel in the frame at all: it is written to a file in the worker's
scratch directory, unlinked as soon as it is made, and passed on the file channel
(SCM_RIGHTS) just before the frame that names it; the host reopens it read-only and hands it
to the child's sandbox (workerio.py), never reading it itself.

Scratch, not a memory file (memfd, which the seccomp filter denies): the file takes room in
scratch until the last descriptor to it closes, so all the contexts in flight together are
bounded by scratch's total (at `strict` and `bwrap`), like every file model code writes. The
file cannot be sealed: the worker (model code holding another descriptor to it) could still
change it while the child reads it, which spoils only that child's run (a crash, then a
restart with what the file holds then), never the host.

Runs inside the worker; standard library only.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterator

from rlm.sandbox.protocol import MAX_BATCH, WORKER_FRAME_CAP, ProtocolError, encode_frame

__all__ = ["FILE_CONTEXT_CHARS", "remember_scratch", "requests", "send_files"]

FILE_CONTEXT_CHARS = 1 << 18  # characters: a longer rlm_query context goes as a file
_FRAME_ROOM = 4096  # bytes of a frame that are not prompts (op, kind, id, punctuation)
_WRITE_CHUNK = 16 << 20  # characters encoded and written at a time
_scratch: str | None = None  # the scratch directory, as an absolute path (remember_scratch)


def remember_scratch(path: str) -> None:
    """Where context files are written: the worker's scratch directory, its working directory at
    start (serve.py calls this before any model code runs, which may change directory later)."""
    global _scratch
    _scratch = os.path.abspath(path)


def requests(kind: str, items: list, request_id: int) -> Iterator[tuple[bytes, list]]:
    """The frames that carry one sub-call, each with the context files (descriptors) it names.

    `items` are prompts (str) for the llm kinds, or {"query", "context", "format", "file"} objects
    for the rlm kinds. Files are made one frame at a time; the caller sends and closes them.
    """
    wire = [_wire_item(item) for item in items] if kind.startswith("rlm_") else list(items)
    message = {"op": "llm_query", "id": request_id, "kind": kind, "prompts": wire}
    if len(wire) <= MAX_BATCH:
        try:
            frame = encode_frame(message, WORKER_FRAME_CAP)
        except ProtocolError:
            pass  # too large as one frame: cut up below
        else:
            yield frame, _files(items, wire)
            return
    for start, end in _parts(kind, wire):
        part = {**message, "prompts": wire[start:end]}
        yield encode_frame(part, WORKER_FRAME_CAP), _files(items[start:end], wire[start:end], start)


def _wire_item(item: dict) -> dict:
    context = item["context"]
    if context is not None and len(context) > FILE_CONTEXT_CHARS:
        return {"query": item["query"], "context": None, "format": item["format"], "file": True}
    return item


def _parts(kind: str, wire: list) -> list[tuple[int, int]]:
    """Runs of items that each fit one frame; ValueError if one item alone cannot."""
    budget = WORKER_FRAME_CAP - _FRAME_ROOM
    parts: list[tuple[int, int]] = []
    start, used = 0, 0
    for index, item in enumerate(wire):
        size = len(json.dumps(item, ensure_ascii=False).encode("utf-8", "replace")) + 1
        if size > budget:
            what = "the prompt" if len(wire) == 1 else f"prompt {index}"
            hint = " or pass the text as its context" if kind.startswith("rlm_") else ""
            raise ValueError(
                f"{kind}: {what} is {size:,} bytes as sent to the host; one request carries at most "
                f"{budget:,} bytes (about {round(budget / (1 << 20))} MiB): split it{hint}"
            )
        if index > start and (used + size > budget or index - start >= MAX_BATCH):
            parts.append((start, index))
            start, used = index, 0
        used += size
    parts.append((start, len(wire)))
    return parts


def _files(items: list, wire: list, first: int = 0) -> list[int]:
    """A context file for each item marked "file", in order (`first`: the index of items[0] in the call)."""
    files: list[int] = []
    try:
        for index, (item, sent) in enumerate(zip(items, wire), first):
            if type(sent) is dict and sent.get("file"):  # (an llm prompt with a model has no "file")
                files.append(_scratch_file(index, item["context"]))
    except BaseException:
        for fd in files:
            os.close(fd)
        raise
    return files


def _scratch_file(index: int, text: str) -> int:
    """An unnamed file in scratch holding `text` as UTF-8 (lone surrogates as "?"); OSError
    saying what to do if scratch refuses it (full, or the text over the file-size limit)."""
    directory = _scratch if _scratch is not None else os.getcwd()
    path = os.path.join(directory, f".rlm-context-{os.urandom(8).hex()}")
    try:
        previous = os.umask(0o077)  # whatever model code set: the host reopens it as its owner
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        finally:
            os.umask(previous)
        os.unlink(path)  # no name: its room in scratch is freed with its last descriptor
    except OSError as exc:
        raise OSError(exc.errno, f"rlm_query: context {index} goes to the child as a file in scratch "
                                 f"({directory}), which could not be made: {exc.strerror}") from None
    try:
        for start in range(0, len(text), _WRITE_CHUNK):
            view = memoryview(text[start : start + _WRITE_CHUNK].encode("utf-8", "replace"))
            while view:
                view = view[os.write(fd, view) :]
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, (
            f"rlm_query: context {index} ({len(text):,} characters) goes to the child as a file in scratch, "
            f"which refused it ({exc.strerror}): scratch holds at most the file-size limit (file_size_limit), "
            "with the files kept there; pass a smaller context, or delete files from scratch"
        )) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def send_files(channel: int, files: list[int]) -> None:
    """Pass `files` to the host on the file channel, one per message, and close them here."""
    if not files:
        return
    import socket

    sock = socket.socket(fileno=channel)
    try:
        for fd in files:
            socket.send_fds(sock, [b"c"], [fd])
    finally:
        sock.detach()  # the channel stays open
        for fd in files:
            os.close(fd)
