"""The benchmark generators: deterministic, the right size, and their gold answers re-derived
independently from the context text (labels inferred from the wording, as a model would)."""

from __future__ import annotations

import datetime
import itertools
import re
from collections import Counter

import pytest

from rlm.bench import oolong, pairs, sniah
from rlm.bench.suite import TaskSpec, build_task, task_specs
from rlm.bench.tasks import CHARS_PER_TOKEN, length_label, parse_length
from rlm.bench.wordlists import LABELS, SLOTS, TEMPLATES
from rlm.errors import ConfigError


def _template_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        re.escape(part) if i % 2 == 0 else "(?:" + "|".join(map(re.escape, SLOTS[part])) + ")"
        for i, part in enumerate(parts)
    )
    return re.compile(pattern + "$")


_PATTERNS = [(label, _template_pattern(t)) for label, templates in TEMPLATES.items() for t in templates]


def infer_label(instance: str) -> str:
    """The label of an instance from its text alone; it must match templates of exactly one label."""
    labels = {label for label, pattern in _PATTERNS if pattern.match(instance)}
    assert len(labels) == 1, (instance, labels)
    return labels.pop()


_LINE = re.compile(r"^Date: (\w{3} \d{2}, \d{4}) \|\| User: (\d+) \|\| Instance: (.+)$")


def parse_context(context: str) -> list[tuple[datetime.date, int, str]]:
    """(date, user, label) of every line, read from the text."""
    rows = []
    for line in context.split("\n"):
        match = _LINE.match(line)
        assert match, line
        date = datetime.datetime.strptime(match.group(1), "%b %d, %Y").date()
        rows.append((date, int(match.group(2)), infer_label(match.group(3))))
    return rows


# -- lengths and determinism ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "tokens"), [("8k", 8192), ("8K", 8192), ("1m", 1048576), ("1000", 1000), (4096, 4096)])
def test_parse_length(text: str, tokens: int) -> None:
    assert parse_length(text) == tokens


@pytest.mark.parametrize("text", ["", "eight", "8g", "100"])
def test_bad_lengths_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ConfigError, match="8k|at least 256"):
        parse_length(text)


def test_length_labels() -> None:
    assert [length_label(n) for n in (8192, 1048576, 1000)] == ["8k", "1m", "1000"]


@pytest.mark.parametrize("name", ["sniah", "oolong", "oolong-pairs"])
def test_tasks_are_deterministic_and_sized(name: str) -> None:
    spec = TaskSpec(name, 2048, 7, 3)
    first = build_task(spec)
    build_task.cache_clear()
    again = build_task(spec)
    assert (again.context, again.question, again.answer) == (first.context, first.question, first.answer)
    other = build_task(TaskSpec(name, 2048, 8, 3))
    assert other.context != first.context
    target = 2048 * CHARS_PER_TOKEN
    assert target <= len(first.context) <= target * 1.05
    assert first.id == spec.id == f"{name}-2k-s7-3"


def test_task_specs_cover_the_grid() -> None:
    specs = task_specs(["sniah", "oolong"], ["16k", "8k"], 2, 5)
    assert len(specs) == 8
    assert specs[0] == TaskSpec("sniah", 8192, 5, 0)
    with pytest.raises(ConfigError, match="unknown benchmark 'ruler'"):
        task_specs(["ruler"], ["8k"], 1, 0)


# -- S-NIAH -------------------------------------------------------------------------------------


@pytest.mark.parametrize("haystack", ["noise", "salad"])
def test_sniah_has_exactly_one_needle_holding_the_answer(haystack: str) -> None:
    depths = set()
    for index in range(6):
        task = sniah.generate(4096, 0, index, haystack=haystack)
        found = re.findall(r"special magic numbers? for ([\w-]+) is: (\d{7})\.", task.context)
        assert found == [(task.meta["key"], task.answer)]
        assert task.meta["key"] in task.question
        depths.add(round(task.meta["depth"], 1))
    assert len(depths) > 2  # the needle moves


# -- OOLONG -------------------------------------------------------------------------------------


def test_every_instance_template_can_be_told_apart() -> None:
    task = build_task(TaskSpec("oolong", 32768, 0, 0))
    labels = Counter(label for _, _, label in parse_context(task.context))
    assert set(labels) == set(LABELS)
    assert labels.most_common(1)[0][0] != "abbreviation"  # the weights make it rare


def _rederive(question: str, rows: list) -> str:
    """The gold answer of an OOLONG question, computed from the parsed rows."""
    counts = Counter({label: 0 for label in LABELS}) + Counter(label for *_, label in rows)
    counts.update({label: 0 for label in LABELS})
    categories = re.findall(r"category '([^']+)'", question.split("\n\n")[-1])
    if m := re.search(r"from User (\d+)", question):
        mine = [row for row in rows if row[1] == int(m.group(1))]
        if "most common" in question:
            return Counter(label for *_, label in mine).most_common(1)[0][0]
        return str(sum(label == categories[0] for *_, label in mine))
    if m := re.search(r"dated from (.+?) to (.+?) \(", question):
        start, end = (datetime.datetime.strptime(d, "%b %d, %Y").date() for d in m.groups())
        return str(sum(label == categories[0] and start <= date <= end for date, _, label in rows))
    if "more common than, less common than" in question:
        a, b = counts[categories[0]], counts[categories[1]]
        return "more common than" if a > b else "less common than" if a < b else "same frequency as"
    if "most common among all" in question:
        return counts.most_common(1)[0][0]
    if "least common among all" in question:
        return min(counts, key=counts.get)
    return str(counts[categories[0]])


@pytest.mark.parametrize("index", range(len(oolong.QUESTION_TYPES)))
def test_oolong_gold_answers_follow_from_the_text(index: int) -> None:
    task = build_task(TaskSpec("oolong", 4096, 1, index))
    assert task.answer == _rederive(task.question, parse_context(task.context))
    assert task.kind == ("numeric" if task.answer.isdigit() else "exact")


def test_oolong_cycles_through_its_question_types() -> None:
    kinds = {build_task(TaskSpec("oolong", 8192, 0, i)).meta["question_type"] for i in range(14)}
    assert len(kinds) >= 6


# -- OOLONG-Pairs -------------------------------------------------------------------------------


def test_pairs_gold_of_the_first_query_follows_from_the_text() -> None:
    task = build_task(TaskSpec("oolong-pairs", 4096, 2, 0))
    label = re.search(r"at least one instance of '([^']+)'", task.question).group(1)
    users = {user for _, user, found in parse_context(task.context) if found == label}
    assert task.answer == [list(pair) for pair in itertools.combinations(sorted(users), 2)]


def test_all_twenty_pair_queries_generate_sorted_pairs() -> None:
    counts = []
    for index in range(pairs.QUERY_COUNT):
        task = build_task(TaskSpec("oolong-pairs", 2048, 0, index))
        assert task.meta["query"] == index + 1
        assert all(a < b for a, b in task.answer)
        assert task.answer == sorted(task.answer)
        counts.append(len(task.answer))
    assert len(set(counts)) > 5  # the conditions differ
    assert len({build_task(TaskSpec("oolong-pairs", 2048, 0, i)).question for i in range(20)}) == 20


def test_asymmetric_pair_condition_counts_either_role_order() -> None:
    records = [
        oolong.Record(datetime.date(2023, 1, 1), 1, "x", "entity"),
        oolong.Record(datetime.date(2023, 1, 1), 2, "x", "location"),
        oolong.Record(datetime.date(2023, 1, 1), 3, "x", "entity"),
    ]
    has = lambda user, label: user.counts[label] > 0  # noqa: E731
    only = lambda u, v: has(u, "location") and has(v, "entity")  # noqa: E731
    assert pairs.gold_pairs(records, only) == [[1, 2], [2, 3]]
