"""The benchmark scorers on hand-made replies, with the published rules worked out by hand."""

from __future__ import annotations

import pytest

from rlm.bench.scoring import normalize, parse_number, parse_pairs, score, score_exact, score_numeric, score_pairs, score_substring

# -- S-NIAH: case-insensitive substring ---------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "gold", "expected"),
    [
        ("4827163", "4827163", 1.0),
        ("The special magic number is 4827163.", "4827163", 1.0),
        ("the answer is ABC-12", "abc-12", 1.0),
        ("482716", "4827163", 0.0),  # a prefix of the number is not the number
        ("48 27 163", "4827163", 0.0),
        ("", "4827163", 0.0),
    ],
)
def test_substring(reply: str, gold: str, expected: float) -> None:
    assert score_substring(reply, gold) == expected


# -- OOLONG numeric: 0.75 ** |gold - reply| -----------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "gold", "expected"),
    [
        ("12", 12, 1.0),
        ("13", 12, 0.75),
        ("10", 12, 0.5625),
        ("Answer: 9", 12, 0.75**3),
        ("There are 14 such instances.", 12, 0.5625),
        ("1,204", 1204, 1.0),
        ("12.", 12, 1.0),
        ("**12**", 12, 1.0),
        ("none of them", 12, 0.0),
        ("0", 0, 1.0),
    ],
)
def test_numeric(reply: str, gold: int, expected: float) -> None:
    assert score_numeric(reply, gold) == pytest.approx(expected)


def test_numeric_reads_the_text_after_the_last_answer_marker() -> None:
    assert parse_number("I counted 3 in the first half and 4 in the second. Answer: 7") == 7
    assert parse_number("Final answer: 1,024") == 1024


def test_numeric_far_off_tends_to_zero() -> None:
    assert 0 < score_numeric("100", 0) < 1e-12


# -- OOLONG other answers: exact match after normalizing ------------------------------------------


@pytest.mark.parametrize(
    ("reply", "gold", "expected"),
    [
        ("location", "location", 1.0),
        ("Location.", "location", 1.0),
        ("  'Human Being' ", "human being", 1.0),
        ("Label: numeric value", "numeric value", 1.0),
        ("Answer: more common than", "more common than", 1.0),
        ("more   common\nthan", "more common than", 1.0),
        ("less common than", "more common than", 0.0),
        ("The most common category is location", "location", 0.0),  # exact match, not containment
        ("entity, location", "location", 0.0),
    ],
)
def test_exact(reply: str, gold: str, expected: float) -> None:
    assert score_exact(reply, gold) == expected


def test_normalize() -> None:
    assert normalize("**Answer:** `Entity`.") == "entity"


# -- OOLONG-Pairs: F1 over sets of unordered pairs -------------------------------------------------

GOLD = [[1, 2], [1, 3], [2, 3], [4, 5]]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("(1, 2)\n(1, 3)\n(2, 3)\n(4, 5)", 1.0),
        ("(2, 1) (3, 1) (3, 2) (5, 4)", 1.0),  # order inside a pair does not matter
        ("[1, 2], [1, 3], [2, 3], [4, 5], (1, 2)", 1.0),  # duplicates count once
        ("(1, 2)\n(1, 3)", 2 * (1.0 * 0.5) / (1.0 + 0.5)),  # precision 1, recall 1/2
        ("(1, 2)\n(1, 3)\n(7, 8)\n(8, 9)", 0.5),  # precision 1/2, recall 1/2
        ("(7, 8)", 0.0),
        ("[]", 0.0),
        ("no pairs found", 0.0),
        ("(1, 1)", 0.0),  # a user paired with itself is not a pair
    ],
)
def test_pairs_f1(reply: str, expected: float) -> None:
    assert score_pairs(reply, GOLD) == pytest.approx(expected)


def test_pairs_both_empty_is_perfect_and_one_empty_is_zero() -> None:
    assert score_pairs("[]", []) == 1.0
    assert score_pairs("(1, 2)", []) == 0.0


def test_parse_pairs_orders_each_pair() -> None:
    assert parse_pairs("(30215, 10002)\n[5, 9]") == {(10002, 30215), (5, 9)}


# -- dispatch --------------------------------------------------------------------------------------


def test_no_answer_scores_zero_for_every_kind() -> None:
    for kind, gold in (("substring", "1"), ("numeric", 1), ("exact", "x"), ("pairs", [])):
        assert score(kind, None, gold) == 0.0


def test_score_dispatches_by_kind() -> None:
    assert score("substring", "it is 42", "42") == 1.0
    assert score("numeric", "41", "42") == 0.75
    assert score("exact", "Entity", "entity") == 1.0
    assert score("pairs", "(1, 2)", [[1, 2]]) == 1.0
    with pytest.raises(ValueError, match="no scorer"):
        score("bleu", "x", "y")
