"""Batch runs: many questions, one RLM run each, on this machine or on a Ray cluster.

    import rlm.batch
    summary = rlm.batch.run("questions.jsonl", out="answers.jsonl")              # 4 at once, here
    summary = rlm.batch.run("questions.jsonl", out="answers.jsonl", ray="local")  # on a local Ray

Each input line is `{"id": ..., "query": ..., "context": ...}` (or `"context_path"` instead of
`"context"`), with per-item options if wanted (`rlm.batch.items`). Each result is appended to
`out` as its run ends, as one line `{"id", "answer", "status", "usage", "wall_time",
"trajectory", "error"}`, written whole and fsynced. Run the same batch again to go on after an
interruption: ids already answered are skipped, failed ones are retried only with
`retry_failed=True`, and an answers file made from another input or with other options is
refused (`rlm.batch.results`). The same from the shell: `rlm batch QUESTIONS.jsonl --out
ANSWERS.jsonl [--ray [ADDRESS]]`.
"""

from __future__ import annotations

from rlm.batch.cluster import TaskResources
from rlm.batch.items import LIMITS, BatchItem, read_input
from rlm.batch.options import OPTIONS
from rlm.batch.results import FIELDS
from rlm.batch.runner import BatchSummary, default_log_dir, run

__all__ = ["BatchItem", "BatchSummary", "FIELDS", "LIMITS", "OPTIONS", "TaskResources", "default_log_dir",
           "read_input", "run"]
