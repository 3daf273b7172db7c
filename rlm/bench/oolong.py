"""OOLONG-style aggregation over labeled records (after OOLONG's trec-coarse split).

The context has one record per line, `Date: <date> || User: <id> || Instance: <question>`.
Every instance is a question with a hidden label, one of six coarse classes (what it asks
for: an abbreviation's meaning, a thing, an explanation, a person, a place or a number). The
labels are never written down: a model must infer them from the wording, then aggregate:
count a label, find the most or least common one, compare two, count for one user or within
a date range. Numeric answers score 0.75^|gold - reply|, the others exact match.

Records come from our own templates (`rlm.bench.wordlists`), so the pool is labeled by
construction and its labels can be inferred from the text.
"""

from __future__ import annotations

import datetime
import random
from collections import Counter
from dataclasses import dataclass

from rlm.bench.tasks import CHARS_PER_TOKEN, Task, task_rng
from rlm.bench.wordlists import LABEL_WEIGHTS, LABELS, SLOTS, TEMPLATES

__all__ = ["Record", "PREAMBLE", "QUESTION_TYPES", "make_records", "format_records", "generate"]

_FIRST_DAY = datetime.date(2022, 1, 1)
_DAYS = 3 * 365
_COMPARISONS = ("more common than", "less common than", "same frequency as")

PREAMBLE = (
    "The context has one record per line: `Date: <date> || User: <user id> || Instance: <question>`. "
    "Each instance is a question that belongs to exactly one of these 6 categories: "
    + ", ".join(LABELS)
    + ". The categories are not written in the context: infer each one from what the question asks for "
    "(the meaning of an abbreviation; a thing such as an animal, color, food, instrument or sport; an "
    "explanation or definition; a person; a place; or a number, date or amount)."
)


@dataclass(frozen=True)
class Record:
    """One line of an OOLONG context, with its hidden label."""

    date: datetime.date
    user: int
    text: str
    label: str

    def line(self) -> str:
        return f"Date: {self.date:%b %d, %Y} || User: {self.user} || Instance: {self.text}"


def make_records(rng: random.Random, chars: int, users_per_record: float, max_users: int) -> list[Record]:
    """Records filling about `chars` characters, spread over a pool of users."""
    estimated = max(chars // 85, 4)
    n_users = min(max(int(estimated * users_per_record), 4), max_users)
    users = rng.sample(range(10_000, 100_000), n_users)
    records: list[Record] = []
    used = 0
    while used < chars or len(records) < 4:
        label = rng.choices(LABELS, weights=LABEL_WEIGHTS)[0]
        record = Record(
            date=_FIRST_DAY + datetime.timedelta(days=rng.randrange(_DAYS)),
            user=rng.choice(users),
            text=_instance(rng, label),
            label=label,
        )
        records.append(record)
        used += len(record.line()) + 1
    return records


def format_records(records: list[Record]) -> str:
    """The context text: one line per record."""
    return "\n".join(record.line() for record in records)


def _instance(rng: random.Random, label: str) -> str:
    template = rng.choice(TEMPLATES[label])
    values = {}
    for name in SLOTS:
        if "{" + name + "}" in template:
            values[name] = rng.choice(SLOTS[name])
    return template.format(**values)


def generate(length: int, seed: int, index: int) -> Task:
    """One OOLONG task of about `length` tokens; the question type cycles with `index`."""
    rng = task_rng("oolong", length, seed, index)
    records = make_records(rng, length * CHARS_PER_TOKEN, users_per_record=0.12, max_users=500)
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    made = _QUESTIONS[kind](rng, records)
    if made is None:  # the chosen question would have tied answers: count a label instead
        kind, made = "count_label", _count_label(rng, records)
    question, answer, numeric = made
    return Task(
        benchmark="oolong", length=length, seed=seed, index=index, context=format_records(records),
        question=f"{PREAMBLE}\n\n{question}", answer=str(answer), kind="numeric" if numeric else "exact",
        meta={"question_type": kind, "records": len(records)},
    )


_Made = tuple[str, object, bool]  # question, answer, numeric?
_NUMBER = "Answer with a number only."
_LABEL = "Answer with the category name only, exactly as written above."


def _count_label(rng: random.Random, records: list[Record]) -> _Made:
    label = rng.choice(LABELS)
    count = sum(r.label == label for r in records)
    return f"How many instances in the context belong to the category '{label}'? {_NUMBER}", count, True


def _extreme(records: list[Record], most: bool) -> str | None:
    counts = Counter({label: 0 for label in LABELS})
    counts.update(r.label for r in records)
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=most)
    if ranked[0][1] == ranked[1][1]:
        return None  # a tie has no single right answer
    return ranked[0][0]


def _most_common(rng: random.Random, records: list[Record]) -> _Made | None:
    label = _extreme(records, most=True)
    return None if label is None else (f"Which category is the most common among all instances? {_LABEL}", label, False)


def _least_common(rng: random.Random, records: list[Record]) -> _Made | None:
    label = _extreme(records, most=False)
    return None if label is None else (f"Which category is the least common among all instances? {_LABEL}", label, False)


def _compare(rng: random.Random, records: list[Record]) -> _Made:
    first, second = rng.sample(LABELS, 2)
    counts = Counter(r.label for r in records)
    a, b = counts[first], counts[second]
    answer = _COMPARISONS[0] if a > b else _COMPARISONS[1] if a < b else _COMPARISONS[2]
    question = (
        f"Is the category '{first}' more common than, less common than, or the same frequency as the "
        f"category '{second}'? Answer with exactly one of: {', '.join(_COMPARISONS)}."
    )
    return question, answer, False


def _busy_user(rng: random.Random, records: list[Record]) -> int:
    counts = Counter(r.user for r in records)
    busy = sorted(user for user, n in counts.items() if n >= 3) or sorted(counts)
    return rng.choice(busy)


def _user_count(rng: random.Random, records: list[Record]) -> _Made:
    user, label = _busy_user(rng, records), rng.choice(LABELS)
    count = sum(r.user == user and r.label == label for r in records)
    return f"How many instances from User {user} belong to the category '{label}'? {_NUMBER}", count, True


def _user_most_common(rng: random.Random, records: list[Record]) -> _Made | None:
    user = _busy_user(rng, records)
    label = _extreme([r for r in records if r.user == user], most=True)
    if label is None:
        return None
    return f"Which category is the most common among the instances from User {user}? {_LABEL}", label, False


def _date_range_count(rng: random.Random, records: list[Record]) -> _Made:
    start, end = sorted(rng.sample([r.date for r in records], 2))
    label = rng.choice(LABELS)
    count = sum(r.label == label and start <= r.date <= end for r in records)
    question = (
        f"How many instances dated from {start:%b %d, %Y} to {end:%b %d, %Y} (both days included) belong "
        f"to the category '{label}'? {_NUMBER}"
    )
    return question, count, True


_QUESTIONS = {
    "count_label": _count_label,
    "most_common": _most_common,
    "least_common": _least_common,
    "compare": _compare,
    "user_count": _user_count,
    "user_most_common": _user_most_common,
    "date_range_count": _date_range_count,
}
QUESTION_TYPES: tuple[str, ...] = tuple(_QUESTIONS)
