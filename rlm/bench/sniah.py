"""S-NIAH: one needle in a haystack, after RULER's single-needle task.

The haystack is filler text: the same five noise sentences over and over ("noise"), or
random sentences of common words ("salad"). One needle sentence,
"One of the special magic numbers for <key> is: <7-digit number>.", sits at a random depth,
between two sentences. The question asks for the number; a reply is right when it contains
the number (case-insensitive substring match, as published).
"""

from __future__ import annotations

import random
from typing import Literal

from rlm.bench.tasks import CHARS_PER_TOKEN, Task, task_rng
from rlm.bench.wordlists import NEEDLE_WORDS, NOISE_SENTENCES, SALAD_WORDS
from rlm.errors import ConfigError

__all__ = ["HAYSTACKS", "generate", "needle_sentence"]

Haystack = Literal["noise", "salad"]
HAYSTACKS: tuple[str, ...] = ("noise", "salad")


def needle_sentence(key: str, value: str) -> str:
    """The sentence hidden in the haystack."""
    return f"One of the special magic numbers for {key} is: {value}."


def generate(length: int, seed: int, index: int, *, haystack: Haystack = "noise") -> Task:
    """One S-NIAH task of about `length` tokens (deterministic from its arguments)."""
    if haystack not in HAYSTACKS:
        raise ConfigError(f"unknown haystack {haystack!r}; choose one of: {', '.join(HAYSTACKS)}")
    rng = task_rng("sniah", length, seed, index)
    key = f"{rng.choice(NEEDLE_WORDS)}-{rng.choice(SALAD_WORDS)}-{rng.randrange(10, 100)}"
    value = str(rng.randrange(1_000_000, 10_000_000))
    needle = needle_sentence(key, value)
    budget = max(length * CHARS_PER_TOKEN - len(needle) - 1, 0)
    sentences = _noise(budget) if haystack == "noise" else _salad(budget, rng)
    depth = rng.random()
    position = round(depth * len(sentences))
    sentences.insert(position, needle)
    question = (
        f"What is the special magic number for {key} mentioned in the provided text? "
        "Answer with the number."
    )
    return Task(
        benchmark="sniah", length=length, seed=seed, index=index, context=" ".join(sentences),
        question=question, answer=value, kind="substring",
        meta={"haystack": haystack, "depth": round(position / max(len(sentences) - 1, 1), 4), "key": key},
    )


def _noise(budget: int) -> list[str]:
    sentences: list[str] = []
    used = 0
    while used < budget:
        sentence = NOISE_SENTENCES[len(sentences) % len(NOISE_SENTENCES)]
        sentences.append(sentence)
        used += len(sentence) + 1
    return sentences


def _salad(budget: int, rng: random.Random) -> list[str]:
    sentences: list[str] = []
    used = 0
    while used < budget:
        words = rng.choices(SALAD_WORDS, k=rng.randrange(6, 13))
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        used += len(sentence) + 1
    return sentences
