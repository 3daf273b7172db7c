"""The benchmarks by name, and the grid of tasks a bench run covers.

A `TaskSpec` names a task without building it (a 1M-token context is 4 MB), so a run can
list, skip and resume tasks cheaply; `build_task` makes the task itself, deterministically.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from rlm.bench import oolong, pairs, sniah
from rlm.bench.tasks import Task, length_label, parse_length
from rlm.errors import ConfigError

__all__ = ["BENCHMARKS", "TaskSpec", "build_task", "task_specs"]

BENCHMARKS: dict[str, Callable[[int, int, int], Task]] = {
    "sniah": sniah.generate,
    "oolong": oolong.generate,
    "oolong-pairs": pairs.generate,
}


@dataclass(frozen=True, order=True)
class TaskSpec:
    """Which task: benchmark, length in tokens, seed and index."""

    benchmark: str
    length: int
    seed: int
    index: int

    @property
    def id(self) -> str:
        """The same id as `Task.id`."""
        return f"{self.benchmark}-{length_label(self.length)}-s{self.seed}-{self.index}"


@functools.lru_cache(maxsize=8)
def build_task(spec: TaskSpec) -> Task:
    """The task a spec names (the last few are kept, so several methods share one build)."""
    try:
        generate = BENCHMARKS[spec.benchmark]
    except KeyError:
        raise ConfigError(f"unknown benchmark {spec.benchmark!r}; choose from: {', '.join(BENCHMARKS)}") from None
    return generate(spec.length, spec.seed, spec.index)


def task_specs(benchmarks: list[str], lengths: list[str | int], count: int, seed: int) -> list[TaskSpec]:
    """Every (benchmark, length, index) of a run, `count` tasks per benchmark and length."""
    unknown = [name for name in benchmarks if name not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark {unknown[0]!r}; choose from: {', '.join(BENCHMARKS)}")
    if count < 1:
        raise ConfigError(f"the number of tasks must be at least 1, got {count}")
    tokens = sorted({parse_length(length) for length in lengths})
    if not tokens:
        raise ConfigError("give at least one context length, such as 8k")
    return [
        TaskSpec(benchmark, length, seed, index)
        for benchmark in benchmarks
        for length in tokens
        for index in range(count)
    ]
