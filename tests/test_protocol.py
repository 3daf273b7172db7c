"""The frame protocol between the host and the worker process: length-prefixed JSON, never pickle."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from rlm.sandbox.protocol import MAX_FRAME, FrameReader, ProtocolError, encode_frame, write_frame


# -- the frame protocol ---------------------------------------------------------------------------


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


def test_frames_round_trip(pipe):
    read_fd, write_fd = pipe
    messages = [
        {"op": "exec", "code": "print('hi')", "max_output": 10},
        {"op": "result", "stdout": "ünïcode ✓ \u2028 and text", "n": [1, 2.5, None, True]},
        {"op": "empty"},
    ]
    for message in messages:
        write_frame(write_fd, message)
    reader = FrameReader(read_fd)
    assert [reader.read() for _ in messages] == messages


def test_a_lone_surrogate_crosses_the_pipe_as_a_question_mark(pipe):
    """Such text could not be sent on over HTTP or written to a trace, so it is replaced."""
    read_fd, write_fd = pipe
    write_frame(write_fd, {"op": "result", "stdout": "bad \ud800 text"})
    assert FrameReader(read_fd).read() == {"op": "result", "stdout": "bad ? text"}


def test_frames_arriving_in_pieces_are_assembled(pipe):
    read_fd, write_fd = pipe
    reader = FrameReader(read_fd)
    frame = encode_frame({"op": "llm_query", "prompts": ["a" * 1000]})
    for piece in (frame[:2], frame[2:4], frame[4:500]):
        os.write(write_fd, piece)
        assert reader.read(deadline=time.monotonic() + 0.02) is None
    os.write(write_fd, frame[500:] + encode_frame({"op": "next"}))
    assert reader.read(deadline=time.monotonic() + 1) == {"op": "llm_query", "prompts": ["a" * 1000]}
    assert reader.read(deadline=time.monotonic() + 1) == {"op": "next"}


def test_read_returns_none_when_the_deadline_passes(pipe):
    reader = FrameReader(pipe[0])
    started = time.monotonic()
    assert reader.read(deadline=started + 0.1) is None
    assert 0.08 <= time.monotonic() - started < 1
    assert reader.read(deadline=time.monotonic() - 1) is None  # already past: no wait


def test_large_frame_round_trips_through_a_pipe(pipe):
    read_fd, write_fd = pipe
    message = {"op": "result", "stdout": "z" * 3_000_000}
    writer = threading.Thread(target=write_frame, args=(write_fd, message))
    writer.start()  # larger than the pipe buffer: the write blocks until we read
    assert FrameReader(read_fd).read(deadline=time.monotonic() + 10) == message
    writer.join()


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ((MAX_FRAME + 1).to_bytes(4, "big") + b"{}", "corrupt frame header"),
        (len(b"{not json").to_bytes(4, "big") + b"{not json", "not valid JSON"),
        (len(b"\xff\xfe").to_bytes(4, "big") + b"\xff\xfe", "not valid JSON"),
        (len(b"[1, 2]").to_bytes(4, "big") + b"[1, 2]", "'op'"),
        (len(b'{"no": 1}').to_bytes(4, "big") + b'{"no": 1}', "'op'"),
    ],
)
def test_corrupt_frames_raise_protocol_error(pipe, raw, complaint):
    read_fd, write_fd = pipe
    os.write(write_fd, raw)
    with pytest.raises(ProtocolError, match=complaint):
        FrameReader(read_fd).read(deadline=time.monotonic() + 1)


def test_end_of_stream_raises_protocol_error(pipe):
    read_fd, write_fd = pipe
    os.write(write_fd, encode_frame({"op": "x"})[:3])
    os.close(write_fd)
    with pytest.raises(ProtocolError, match="end of stream"):
        FrameReader(read_fd).read()


def test_frames_are_json_never_pickle():
    frame = encode_frame({"op": "ready", "pid": 7})
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert json.loads(frame[4:]) == {"op": "ready", "pid": 7}
