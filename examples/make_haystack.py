"""Write a needle-in-a-haystack text file for trying `rlm ask` (deterministic from a seed).

    python examples/make_haystack.py [--lines 10000] [--seed 7] > haystack.txt
"""

from __future__ import annotations

import argparse
import random

SUBJECTS = ["The committee", "A traveller", "The old lighthouse", "Our neighbour", "The river", "A small dog"]
VERBS = ["remembered", "ignored", "painted", "described", "followed", "questioned"]
OBJECTS = ["the morning fog", "a quiet harbour", "the long winter", "an empty station", "the market square"]


def haystack(lines: int, seed: int) -> tuple[str, str]:
    """The text and the magic number hidden in it."""
    rng = random.Random(seed)
    number = str(rng.randrange(1_000_000, 10_000_000))
    rows = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(lines)]
    rows.insert(rng.randrange(lines), f"One of the special magic numbers for lantern-42 is: {number}.")
    return "\n".join(rows) + "\n", number


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    text, _ = haystack(args.lines, args.seed)
    print(text, end="")
