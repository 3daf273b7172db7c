"""Big contexts: no copy through the pipe, no second copy in the host, one copy in the worker.

Sizes here are small (tens of MB); the 1 GB figures are measured by bench/sandbox.py.
"""

from __future__ import annotations

import os
import tracemalloc

import pytest

from helpers import ok
from rlm.sandbox import ContextSource, create_sandbox
from rlm.sandbox.textfile import MIN_SIZE, read_ascii

MB = 1_000_000


def _peak_while(action) -> int:
    """Peak bytes of Python allocations in this process while `action` runs."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- context_bytes, on every level ----------------------------------------------------------------


def test_context_bytes_are_the_files_own_bytes(sandbox, tmp_path):
    data = "naïve ✓ line\n".encode() * 1000 + b"tail \xff byte"  # not valid UTF-8 at the end
    path = tmp_path / "ctx.txt"
    path.write_bytes(data)
    sandbox.load_context(ContextSource(path=path))
    code = (
        "import re\n"
        "print(len(context_bytes), context_bytes[:6], len(re.findall(rb'line', context_bytes)))\n"
        "print(context.endswith('tail \\ufffd byte'))"
    )
    assert ok(sandbox, code) == f"{len(data)} {'naïve'.encode()!r} 1000\nTrue\n"


def test_context_bytes_of_a_str_context_and_of_structured_ones(sandbox):
    sandbox.load_context(ContextSource(value="grüße " * 10))
    assert ok(sandbox, "print(context_bytes[:].decode() == context, len(context_bytes))") == "True 80\n"
    sandbox.load_context(ContextSource(value=["a", "b"]))
    assert ok(sandbox, "print(context_bytes)") == "None\n"


@pytest.mark.parametrize("repeat", [10, 20_000], ids=["in the frame", "through a file"])
def test_a_str_context_small_or_large_arrives_exactly(sandbox, repeat):
    text = "grüße \u2603 " * repeat  # 100 characters, or 200,000: past what goes in the frame itself
    sandbox.load_context(ContextSource(value=text))
    code = "print(len(context), context_bytes[:].decode() == context, context[-8:])"
    assert ok(sandbox, code) == f"{len(text)} True {text[-8:]}\n"


def test_context_bytes_is_restored_after_model_code_overwrites_it(sandbox):
    sandbox.load_context(ContextSource(value="abc"))
    ok(sandbox, "context_bytes = b'clobbered'")
    assert ok(sandbox, "print(bytes(context_bytes[:3]))") == "b'abc'\n"
    assert "context_bytes" not in ok(sandbox, "SHOW_VARS()")


def test_an_ascii_file_above_the_fast_path_size_loads_exactly(sandbox, tmp_path):
    text = "".join(f"record {i:08d}: value\n" for i in range(MIN_SIZE // 10))
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="ascii")
    described = sandbox.load_context(ContextSource(path=path))
    assert described["total_length"] == len(text) > MIN_SIZE
    assert ok(sandbox, "print(context.count('record'), context[-23:-1], hash(context) == hash(context[:]))") == (
        f"{MIN_SIZE // 10} record {MIN_SIZE // 10 - 1:08d}: value True\n"
    )


# -- the fast ASCII read, directly ----------------------------------------------------------------


@pytest.fixture
def ascii_file(tmp_path):
    data = (b"0123456789abcdef" * (3 * MIN_SIZE // 16))[: 3 * MIN_SIZE + 5]
    path = tmp_path / "ascii.txt"
    path.write_bytes(data)
    return path, data


def test_read_ascii_equals_a_plain_decode(ascii_file):
    path, data = ascii_file
    fd = os.open(path, os.O_RDONLY)
    try:
        text = read_ascii(fd, len(data))
    finally:
        os.close(fd)
    assert text == data.decode("ascii")
    assert type(text) is str and text.isascii()


@pytest.mark.parametrize("where", [0, MIN_SIZE + 7, -1])
def test_read_ascii_gives_up_on_a_non_ascii_byte_anywhere(ascii_file, where):
    path, data = ascii_file
    changed = bytearray(data)
    changed[where] = 0xC3
    path.write_bytes(bytes(changed))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_ascii(fd, len(changed)) is None
    finally:
        os.close(fd)


def test_read_ascii_leaves_small_and_shrunken_files_to_the_plain_decode(ascii_file):
    path, data = ascii_file
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_ascii(fd, MIN_SIZE - 1) is None
        assert read_ascii(fd, len(data) + 1000) is None  # the file is shorter than it claimed
    finally:
        os.close(fd)


# -- memory: the host holds no second copy; the worker holds one ----------------------------------


def test_a_str_context_is_written_in_pieces_not_copied_whole(bridge):
    big = "x" * (100 * MB)
    with create_sandbox("subprocess", bridge) as box:
        peak = _peak_while(lambda: box.load_context(ContextSource(value=big)))
        assert ok(box, "print(len(context))") == f"{100 * MB}\n"
    assert peak < 40 * MB, f"loading a 100 MB str held {peak:,} bytes at once in the host"


def test_a_list_context_is_streamed_as_json(bridge):
    chunks = ["y" * 100_000 for _ in range(500)]  # 50 MB in all
    with create_sandbox("subprocess", bridge) as box:
        peak = _peak_while(lambda: box.load_context(ContextSource(value=chunks)))
        assert ok(box, "print(len(context), len(context[0]))") == "500 100000\n"
    assert peak < 5 * MB, f"loading a 50 MB list held {peak:,} bytes at once in the host"


def test_a_path_context_is_never_read_by_the_host(bridge, tmp_path):
    path = tmp_path / "ctx.txt"
    path.write_bytes(b"z" * (50 * MB))
    with create_sandbox("subprocess", bridge) as box:
        peak = _peak_while(lambda: box.load_context(ContextSource(path=path)))
        assert ok(box, "print(len(context))") == f"{50 * MB}\n"
    assert peak < 2 * MB, f"loading a 50 MB file held {peak:,} bytes in the host"  # 1 MiB: the frame reader


@pytest.mark.parametrize("level", ["subprocess", "strict", "bwrap"])
def test_the_worker_holds_an_ascii_context_once(bridge, tmp_path, level):
    """Peak resident memory grows by the text, not by text + mapped file (VmHWM counts both)."""
    path = tmp_path / "ctx.txt"
    path.write_bytes(b"log line with some words\n" * (64 * MB // 25))
    peak = "int(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])"
    with create_sandbox(level, bridge) as box:
        ok(box, f"before = {peak}")
        box.load_context(ContextSource(path=path))
        grown_kib = int(ok(box, f"{peak} - before"))
    assert 60_000 < grown_kib < 100_000, f"the worker grew by {grown_kib} KiB for a 64 MB file"
