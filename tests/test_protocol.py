"""The frame protocol between the host and the worker process: length-prefixed JSON, never pickle."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from rlm.sandbox.protocol import (
    HOST_FRAME_CAP,
    HOST_FRAMES,
    MAX_JSON_ITEMS,
    WORKER_FRAME_CAP,
    WORKER_FRAMES,
    FrameReader,
    ProtocolError,
    ProtocolViolation,
    check_frame,
    encode_frame,
    fit_frame,
    result_frames,
    write_frame,
)


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
        ((HOST_FRAME_CAP + 1).to_bytes(4, "big") + b"{}", "over the cap"),
        (len(b"{not json").to_bytes(4, "big") + b"{not json", "not valid JSON"),
        (len(b"\xff\xfe").to_bytes(4, "big") + b"\xff\xfe", "not valid JSON"),
        (len(b"[1, 2]").to_bytes(4, "big") + b"[1, 2]", "'op'"),
        (len(b'{"no": 1}').to_bytes(4, "big") + b'{"no": 1}', "'op'"),
    ],
)
def test_corrupt_frames_raise_protocol_violation(pipe, raw, complaint):
    read_fd, write_fd = pipe
    os.write(write_fd, raw)
    with pytest.raises(ProtocolViolation, match=complaint):
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


# -- what the host accepts from a worker: caps and schema ---------------------------------------


def _worker_reader(fd: int) -> FrameReader:
    return FrameReader(fd, limit=WORKER_FRAME_CAP, max_items=MAX_JSON_ITEMS, schema=WORKER_FRAMES)


def _raw(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_an_over_cap_length_is_refused_from_the_header_alone(pipe):
    read_fd, write_fd = pipe
    os.write(write_fd, (1 << 30).to_bytes(4, "big"))  # no body follows: reading one would block
    started = time.monotonic()
    with pytest.raises(ProtocolViolation, match=f"1,073,741,824 bytes, over the cap of {WORKER_FRAME_CAP:,}"):
        _worker_reader(read_fd).read(deadline=time.monotonic() + 5)
    assert time.monotonic() - started < 1


def test_the_reader_buffers_one_frame_at_most(pipe):
    read_fd, write_fd = pipe
    first, second = {"op": "hello", "pid": 1}, {"op": "ready", "pid": 1}
    os.write(write_fd, encode_frame(first) + encode_frame(second))
    assert _worker_reader(read_fd).read() == first
    assert FrameReader(read_fd).read() == second  # still in the pipe, not in the first reader


@pytest.mark.parametrize(
    "body",
    [
        b"[" + b"{}," * 1_300_000 + b"{}]",  # 3.9 MB of empty objects
        b"[" + b"1.5," * 1_000_000 + b"1.5]",
        b'{"op":"result","x":[' + b'"ab",' * 800_000 + b'"ab"]}',
    ],
    ids=["objects", "floats", "strings"],
)
def test_a_frame_of_many_small_values_is_refused(pipe, body):
    read_fd, write_fd = pipe
    assert len(body) < WORKER_FRAME_CAP
    writer = threading.Thread(target=os.write, args=(write_fd, _raw(body)))
    writer.start()
    with pytest.raises(ProtocolViolation, match="more than 100,000 JSON values"):
        _worker_reader(read_fd).read(deadline=time.monotonic() + 10)
    writer.join()


def test_separators_inside_strings_do_not_count(pipe):
    read_fd, write_fd = pipe
    text = '[1, "a,b", {"c": [2]}], \\" [{,' * 40_000  # 400,000 separators, all inside the string
    message = {"op": "error", "id": 3, "error": text}
    writer = threading.Thread(target=write_frame, args=(write_fd, message))
    writer.start()
    assert _worker_reader(read_fd).read(deadline=time.monotonic() + 10) == message
    writer.join()


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "not valid JSON"),  # nesting past the parser's depth (fits the pipe)
        (b'{"op":"result","duration":NaN}', "NaN is not JSON"),
        (b'{"op":"result","n":' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
    ids=["deep", "nan", "huge-int"],
)
def test_json_the_parser_refuses_is_a_violation(pipe, body, complaint):
    read_fd, write_fd = pipe
    os.write(write_fd, _raw(body))
    with pytest.raises(ProtocolViolation, match=complaint):
        _worker_reader(read_fd).read(deadline=time.monotonic() + 5)


_RESULT = {"op": "result", "id": 1, "stdout": "", "stderr": "", "error": None, "final": None,
           "interrupted": False, "duration": 0.1}
_ITEM = {"query": "q", "context": None, "format": "text", "file": False}


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        ({"op": "pwn"}, "unknown op 'pwn'"),
        ({"no": "op"}, "not an object with an 'op'"),
        ({**_RESULT, "stdout": 5}, "'stdout' of a 'result' frame is a int, not str"),
        ({**_RESULT, "interrupted": 1}, "'interrupted' of a 'result' frame is a int, not bool"),
        ({**_RESULT, "id": True}, "'id' of a 'result' frame is a bool"),
        ({key: value for key, value in _RESULT.items() if key != "final"}, "without its 'final' field"),
        ({**_RESULT, "extra": 1}, "unknown field 'extra'"),
        ({"op": "var", "id": 1, "found": True, "names": ["a", 7]}, "'names' of a 'var' frame holds a int"),
        ({"op": "llm_query", "id": 1, "kind": "llm_query", "prompts": [1]}, "prompts of an 'llm_query' request"),
        ({"op": "llm_query", "id": 1, "kind": "llm_query", "prompts": ["a", "b"]}, "with 2 prompts"),
        ({"op": "llm_query", "id": 1, "kind": "shell", "prompts": ["a"]}, "not one of"),
        ({"op": "llm_query", "id": 1, "kind": "rlm_query", "prompts": [{"query": "q"}]}, "not an object with the fields"),
        ({"op": "llm_query", "id": 1, "kind": "rlm_query", "prompts": [{**_ITEM, "context": "c", "file": True}]},
         "both a context file and a context text"),
        ({"op": "context", "id": 1, "type": "str", "total_length": 1, "chunk_count": 1, "chunk_lengths": [0] * 101},
         "over its cap of 100"),
    ],
)
def test_frames_that_break_the_schema_are_violations(pipe, message, complaint):
    read_fd, write_fd = pipe
    write_frame(write_fd, message)
    with pytest.raises(ProtocolViolation, match=complaint):
        _worker_reader(read_fd).read(deadline=time.monotonic() + 5)


def test_frames_within_the_schema_pass(pipe):
    read_fd, write_fd = pipe
    messages = [
        _RESULT,
        {"op": "llm_query", "id": 2, "kind": "rlm_query_batched", "prompts": [_ITEM, {**_ITEM, "file": True}]},
        {"op": "var", "id": 3, "found": False, "value": None, "names": ["x"]},
    ]
    for message in messages:
        write_frame(write_fd, message)
    reader = _worker_reader(read_fd)
    assert [reader.read() for _ in messages] == messages


def test_fit_frame_cuts_the_longest_text_with_a_mark_until_the_frame_fits():
    message = {"op": "result", "stdout": "é" * 3_000_000, "stderr": "short", "final": "x" * 1_000_000}
    frame = fit_frame(dict(message), ("stdout", "stderr", "final"))
    assert len(frame) - 4 <= WORKER_FRAME_CAP
    decoded = json.loads(frame[4:])
    assert "characters omitted" in decoded["stdout"] and decoded["stdout"].startswith("é")
    assert decoded["stderr"] == "short" and decoded["final"] == message["final"]


# -- the host's answers to a sub-call ---------------------------------------------------------------


def test_answers_go_in_frames_under_the_cap_that_say_whether_more_follow():
    answers = ["a" * 1_000, "é" * 500] * 30 + ["z" * 20_000, "\0" * 5_000, "lone \ud800"]
    frames = list(result_frames(7, answers, limit=10_000))
    assert len(frames) > 5 and all(len(frame) - 4 <= 10_000 for frame in frames)
    messages = [check_frame(json.loads(frame[4:]), HOST_FRAMES) for frame in frames]
    assert [message["more"] for message in messages] == [True] * (len(frames) - 1) + [False]
    assert {message["id"] for message in messages} == {7}
    got = [answer for message in messages for answer in message["results"]]
    assert got[:60] == answers[:60] and got[-1] == "lone ?"
    for cut, kept in ((got[60], "z"), (got[61], "\0")):  # too long for a frame alone: cut, marked
        assert cut.startswith(kept * 100) and cut.endswith(kept * 100) and "characters omitted" in cut
    assert "the full text was 5,000 characters" in got[61]


def test_no_answers_is_one_frame_and_one_answer_repeated_is_encoded_once():
    assert [json.loads(frame[4:]) for frame in result_frames(1, [])] == [
        {"op": "llm_result", "id": 1, "more": False, "results": []}]
    answer = "x" * 1_000
    frames = result_frames(2, [answer] * 10_000, limit=100_000)
    first = json.loads(next(frames)[4:])  # made on demand: the rest are not built yet
    assert first["more"] is True and 97 <= len(first["results"]) <= 100
    assert sum(len(json.loads(frame[4:])["results"]) for frame in frames) == 10_000 - len(first["results"])


def test_the_reader_waits_on_a_descriptor_numbered_past_1023(pipe):
    """select() refuses such a descriptor (a host with many files open); the reader polls."""
    import fcntl
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2048:
        pytest.skip("needs 2048 descriptors")
    read_fd, write_fd = pipe
    high = fcntl.fcntl(read_fd, fcntl.F_DUPFD_CLOEXEC, 1024)
    try:
        reader = FrameReader(high)
        assert reader.read(deadline=time.monotonic() + 0.05) is None
        write_frame(write_fd, {"op": "late"})
        assert reader.read(deadline=time.monotonic() + 5) == {"op": "late"}
    finally:
        os.close(high)
