"""`rlm bench`: the paper's kind of table (accuracy and cost per method and context length) on your models.

    from rlm.bench import task_specs, run_bench, write_report, Models, RunSettings

Benchmarks (generated, deterministic from a seed): `sniah` (one needle in a haystack),
`oolong` (aggregate hidden labels of records), `oolong-pairs` (all user pairs meeting a
condition). Methods: `base`, `rlm-depth0`, `rlm`, `rlm-depth2`. See the README's
"Benchmarks" section.
"""

from __future__ import annotations

from rlm.bench.methods import DEFAULT_METHODS, METHODS, Models, Outcome, RunSettings, run_method, unavailable_reason
from rlm.bench.report import summarize, to_markdown, write_report
from rlm.bench.runner import load_results, run_bench
from rlm.bench.scoring import score
from rlm.bench.suite import BENCHMARKS, TaskSpec, build_task, task_specs
from rlm.bench.tasks import Task, parse_length

__all__ = [
    "BENCHMARKS",
    "DEFAULT_METHODS",
    "METHODS",
    "Models",
    "Outcome",
    "RunSettings",
    "Task",
    "TaskSpec",
    "build_task",
    "load_results",
    "parse_length",
    "run_bench",
    "run_method",
    "score",
    "summarize",
    "task_specs",
    "to_markdown",
    "unavailable_reason",
    "write_report",
]
