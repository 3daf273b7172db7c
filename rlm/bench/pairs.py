"""OOLONG-Pairs: list every pair of users meeting a condition over their records' hidden labels.

The records are OOLONG's (`rlm.bench.oolong`). Twenty query types, after the paper's
OOLONG-Pairs set, ask for all pairs of users where both meet a label, count or date
condition, or where one meets one condition and the other another. The answer is the set
of pairs, each written `(smaller id, larger id)`, sorted, or `[]` when none qualifies; a
reply scores the F1 of its pairs against the gold set. The work is quadratic in the number
of users, which is what makes this task hard for a model reading the context directly.
"""

from __future__ import annotations

import datetime
import itertools
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

from rlm.bench.oolong import PREAMBLE, Record, format_records, make_records
from rlm.bench.tasks import CHARS_PER_TOKEN, Task, task_rng
from rlm.bench.wordlists import LABELS

__all__ = ["QUERY_COUNT", "generate", "gold_pairs"]

_FORMAT = (
    "List every such pair of user ids, one pair per line, written as (smaller id, larger id), with the "
    "pairs sorted. If no pair qualifies, answer []."
)


@dataclass
class _User:
    """What the conditions look at: a user's label counts and the dates of each label."""

    counts: Counter = field(default_factory=Counter)
    dates: dict[str, list[datetime.date]] = field(default_factory=lambda: defaultdict(list))

    def has(self, label: str) -> bool:
        return self.counts[label] > 0

    def months(self, label: str) -> set[tuple[int, int]]:
        return {(d.year, d.month) for d in self.dates[label]}


_Pred = Callable[[_User, _User], bool]  # pred(u, v): u and v in this role order


@dataclass(frozen=True)
class _Params:
    a: str
    b: str
    c: str
    day: datetime.date
    year: int
    n: int

    @property
    def day_text(self) -> str:
        return f"{self.day:%b %d, %Y}"


def _queries(p: _Params) -> list[tuple[str, _Pred]]:
    """The twenty query types: (condition in words, predicate over a pair in one role order)."""
    a, b, c = (repr(x) for x in (p.a, p.b, p.c))
    both = _both
    return [
        (f"both users have at least one instance of {a}", both(lambda u: u.has(p.a))),
        (f"both users have at least one instance of {a} or of {b}", both(lambda u: u.has(p.a) or u.has(p.b))),
        (f"both users have at least one instance of {a} and at least one of {b}",
         both(lambda u: u.has(p.a) and u.has(p.b))),
        (f"both users have exactly one instance of {a}", both(lambda u: u.counts[p.a] == 1)),
        (f"both users have at least two instances of {a}", both(lambda u: u.counts[p.a] >= 2)),
        (f"neither user has any instance of {a}", both(lambda u: not u.has(p.a))),
        (f"both users have more instances of {a} than of {b}", both(lambda u: u.counts[p.a] > u.counts[p.b])),
        (f"both users have an instance of {a} dated after {p.day_text}",
         both(lambda u: any(d > p.day for d in u.dates[p.a]))),
        (f"both users have an instance of {a} dated before {p.day_text}",
         both(lambda u: any(d < p.day for d in u.dates[p.a]))),
        (f"both users have an instance of {a} dated in {p.year}",
         both(lambda u: any(d.year == p.year for d in u.dates[p.a]))),
        (f"both users have at most one instance of {a} and at least one of {b}",
         both(lambda u: u.counts[p.a] <= 1 and u.has(p.b))),
        (f"one user has an instance of {a} but none of {b}, and the other has an instance of {b} but none of {a}",
         lambda u, v: u.has(p.a) and not u.has(p.b) and v.has(p.b) and not v.has(p.a)),
        (f"one user has exactly one instance of {a} and the other has at least two",
         lambda u, v: u.counts[p.a] == 1 and v.counts[p.a] >= 2),
        (f"both users have the same number of instances of {a}, and that number is at least one",
         lambda u, v: u.counts[p.a] == v.counts[p.a] >= 1),
        (f"the two users together have exactly {p.n} instances of {a}",
         lambda u, v: u.counts[p.a] + v.counts[p.a] == p.n),
        (f"both users have an instance of {a} in the same calendar month (same month of the same year)",
         lambda u, v: bool(u.months(p.a) & v.months(p.a))),
        (f"one user has an instance of {a} and the other an instance of {b} in the same calendar month",
         lambda u, v: bool(u.months(p.a) & v.months(p.b))),
        (f"both users have at least one instance of {a}, all of them dated before {p.day_text}",
         both(lambda u: u.has(p.a) and all(d < p.day for d in u.dates[p.a]))),
        (f"both users have at least one instance of each of {a}, {b} and {c}",
         both(lambda u: u.has(p.a) and u.has(p.b) and u.has(p.c))),
        (f"both users have as many instances of {a} as of {b}, at least one of each",
         both(lambda u: u.counts[p.a] == u.counts[p.b] >= 1)),
    ]


QUERY_COUNT = 20


def _both(condition: Callable[[_User], bool]) -> _Pred:
    return lambda u, v: condition(u) and condition(v)


def _users(records: list[Record]) -> dict[int, _User]:
    users: dict[int, _User] = defaultdict(_User)
    for record in records:
        users[record.user].counts[record.label] += 1
        users[record.user].dates[record.label].append(record.date)
    return users


def gold_pairs(records: list[Record], predicate: _Pred) -> list[list[int]]:
    """Every pair (lower id first, sorted) for which the predicate holds in either role order."""
    users = _users(records)
    return [
        [low, high]
        for low, high in itertools.combinations(sorted(users), 2)
        if predicate(users[low], users[high]) or predicate(users[high], users[low])
    ]


def _params(rng: random.Random, records: list[Record]) -> _Params:
    a, b, c = rng.sample(LABELS, 3)
    dates = sorted(r.date for r in records)
    day = dates[len(dates) // 4 + rng.randrange(max(len(dates) // 2, 1))]
    return _Params(a=a, b=b, c=c, day=day, year=rng.choice((2022, 2023, 2024)), n=rng.choice((2, 3)))


def generate(length: int, seed: int, index: int) -> Task:
    """One OOLONG-Pairs task of about `length` tokens; the query type cycles with `index` (20 types)."""
    rng = task_rng("oolong-pairs", length, seed, index)
    records = make_records(rng, length * CHARS_PER_TOKEN, users_per_record=0.1, max_users=300)
    query = index % QUERY_COUNT
    condition, predicate = _queries(_params(rng, records))[query]
    pairs = gold_pairs(records, predicate)
    question = f"{PREAMBLE}\n\nFind all pairs of distinct users such that {condition}. {_FORMAT}"
    return Task(
        benchmark="oolong-pairs", length=length, seed=seed, index=index, context=format_records(records),
        question=question, answer=pairs, kind="pairs",
        meta={"query": query + 1, "records": len(records), "users": len(_users(records)), "pairs": len(pairs)},
    )
