"""Benchmark tasks: what a generator makes, and how context lengths are named and sized.

A context length is given in tokens, as in the paper (2^13 .. 2^20), and turned into
characters at `CHARS_PER_TOKEN`, a usual figure for English text with current tokenizers;
the exact token count depends on the model's tokenizer. Every task is deterministic from
(benchmark, length, seed, index): the same four always give the same context, question and
answer, on any machine.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from rlm.errors import ConfigError

__all__ = ["CHARS_PER_TOKEN", "AnswerKind", "Task", "parse_length", "length_label", "task_rng"]

CHARS_PER_TOKEN = 4

AnswerKind = Literal["substring", "numeric", "exact", "pairs"]

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([km]?)\s*$", re.IGNORECASE)
_MULTIPLIER = {"": 1, "k": 1024, "m": 1024 * 1024}


@dataclass(frozen=True)
class Task:
    """One benchmark question over one generated context.

    `answer` is the gold answer: a string, or for OOLONG-Pairs a list of [user, user] pairs
    (lower id first, sorted). `kind` says how `rlm.bench.scoring.score` compares a reply.
    """

    benchmark: str
    length: int  # target context length in tokens
    seed: int
    index: int
    context: str = field(repr=False)
    question: str
    answer: Any
    kind: AnswerKind
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """A stable id such as `sniah-8k-s0-3`."""
        return f"{self.benchmark}-{length_label(self.length)}-s{self.seed}-{self.index}"

    def describe(self) -> dict[str, Any]:
        """Everything but the context, for results files."""
        return {
            "task_id": self.id,
            "benchmark": self.benchmark,
            "length": self.length,
            "seed": self.seed,
            "index": self.index,
            "question": self.question,
            "expected": self.answer,
            "kind": self.kind,
            "context_chars": len(self.context),
            "meta": self.meta,
        }


def parse_length(text: str | int) -> int:
    """Tokens from `8192`, `8k` (8,192) or `1m` (1,048,576); at least 256."""
    if isinstance(text, int):
        tokens = text
    else:
        match = _LENGTH.match(text)
        if not match:
            raise ConfigError(f"cannot read the length {text!r}; write tokens such as 8192, 8k, 128k or 1m")
        tokens = int(float(match.group(1)) * _MULTIPLIER[match.group(2).lower()])
    if tokens < 256:
        raise ConfigError(f"a context length must be at least 256 tokens, got {text!r}")
    return tokens


def length_label(tokens: int) -> str:
    """`8k` for 8192, `1m` for 1048576, else the number itself."""
    for suffix, size in (("m", 1024 * 1024), ("k", 1024)):
        if tokens % size == 0:
            return f"{tokens // size}{suffix}"
    return str(tokens)


def task_rng(benchmark: str, length: int, seed: int, index: int) -> random.Random:
    """The random source of one task; string seeds hash the same way on every run and machine."""
    return random.Random(f"rlm-bench/{benchmark}/{length}/{seed}/{index}")
