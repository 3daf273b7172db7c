"""How the worker sends one sub-call to the host: frames under the cap, large contexts as sealed files.

A frame from the worker may not exceed `protocol.WORKER_FRAME_CAP`, so a call is cut up here:
a batch whose prompts do not fit one frame (or has more than `MAX_BATCH` of them) goes as
several requests, one after the other; a single prompt that cannot fit raises ValueError in
model code, naming the limit. An `rlm_query` context of more than `FILE_CONTEXT_CHARS`
characters does not travel in the frame at all: it is written to a memory file (memfd),
sealed against any change, and passed on the file channel (SCM_RIGHTS) just before the
frame that names it; the host hands it to the child's sandbox as an open file.

Runs inside the worker; standard library only.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterator

from rlm.sandbox.protocol import MAX_BATCH, WORKER_FRAME_CAP, ProtocolError, encode_frame

__all__ = ["FILE_CONTEXT_CHARS", "requests", "send_files"]

FILE_CONTEXT_CHARS = 1 << 18  # characters: a longer rlm_query context goes as a sealed file
_FRAME_ROOM = 4096  # bytes of a frame that are not prompts (op, kind, id, punctuation)
_WRITE_CHUNK = 16 << 20  # characters encoded and written at a time


def requests(kind: str, items: list, request_id: int) -> Iterator[tuple[bytes, list]]:
    """The frames that carry one sub-call, each with the sealed files (descriptors) it names.

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
        yield encode_frame(part, WORKER_FRAME_CAP), _files(items[start:end], wire[start:end])


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


def _files(items: list, wire: list) -> list[int]:
    """A sealed memory file for each item marked "file", in order."""
    files: list[int] = []
    try:
        for item, sent in zip(items, wire):
            if type(sent) is dict and sent["file"]:
                files.append(_sealed_file(item["context"]))
    except BaseException:
        for fd in files:
            os.close(fd)
        raise
    return files


def _sealed_file(text: str) -> int:
    """A memfd holding `text` as UTF-8 (lone surrogates as "?"), sealed: no writes, no resizing, no new seals."""
    import fcntl

    fd = os.memfd_create("rlm-context", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        for start in range(0, len(text), _WRITE_CHUNK):
            view = memoryview(text[start : start + _WRITE_CHUNK].encode("utf-8", "replace"))
            while view:
                view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
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
