"""The bounded text buffers both sandboxes capture output with, and head-and-tail truncation."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from rlm._text import BoundedText, omission_marker, truncate_middle


# -- text helpers ---------------------------------------------------------------------------------


def test_truncate_middle_leaves_short_text_alone():
    assert truncate_middle("", 0) == ""
    assert truncate_middle("abc", 3) == "abc"
    assert truncate_middle("abc", 100) == "abc"


def test_truncate_middle_keeps_head_and_tail_and_states_the_length():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    cut = truncate_middle(text, 101)
    assert cut == text[:50] + omission_marker(1000 - 101, 1000) + text[-51:]
    assert "899 characters omitted" in cut and "1,000 characters" in cut


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_truncate_middle_with_tiny_limits(limit):
    text = "0123456789"
    cut = truncate_middle(text, limit)
    head, tail = limit // 2, limit - limit // 2
    assert cut.startswith(text[:head]) and cut.endswith(text[len(text) - tail :] if tail else "]\n")
    assert "10 characters" in cut


@pytest.mark.parametrize("limit", [0, 1, 2, 7, 100, 1001, 5000])
def test_bounded_text_equals_truncate_middle_for_many_write_patterns(limit):
    rng = random.Random(limit)
    for trial in range(40):
        total = rng.choice([0, 1, limit, limit + 1, 2 * limit + 4096, 2 * limit + 4097, rng.randrange(30_000)])
        text = "".join(rng.choice("abcdefgh\n✓") for _ in range(total))
        pattern = trial % 4
        sink = BoundedText(limit)
        position = 0
        while position < len(text):
            if pattern == 0:
                step = len(text)  # one write
            elif pattern == 1:
                step = 1  # one character at a time
            elif pattern == 2:
                step = rng.randrange(1, 9000)  # mixed sizes, some larger than the limit
            else:
                step = rng.choice([0, 1, 4096, limit + 1])  # empty writes included
            if step == 0:
                sink.write("")
                step = 1
            position_end = min(len(text), position + step)
            assert sink.write(text[position:position_end]) == position_end - position
            position = position_end
        assert sink.getvalue() == truncate_middle(text, limit), (limit, total, pattern)
        assert sink.total == len(text)


def test_bounded_text_memory_stays_bounded():
    sink = BoundedText(1000)
    piece = "y" * 1000
    tracemalloc.start()
    try:
        for _ in range(10_000):
            sink.write(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, f"{peak} bytes held while writing 10 MB"
    assert "10,000,000 characters" in sink.getvalue()
