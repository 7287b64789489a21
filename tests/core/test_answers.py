"""Canonical answers: the cases agreement and pseudo-labels depend on."""
from __future__ import annotations

import pytest

from router.core.answers import Answer, infer_kind, normalize_answer, normalize_text, same_answer


@pytest.mark.parametrize("text", ["B", " b ", "(B)", "B)", "B.", "**B**", "B: True, False", "B) wet palms",
                                  "Answer: B", "The answer is (B).", "the correct option is B"])
def test_multiple_choice_letters(text):
    assert normalize_answer(text, "choice") == Answer("choice", "B")


@pytest.mark.parametrize("text", ["A Christmas Carol", "I", "I do", "Okay,", "The answer is a dog"])
def test_text_that_only_starts_like_a_letter_is_text_in_auto(text):
    assert normalize_answer(text).kind == "text"


def test_a_bare_lowercase_letter_is_a_choice_only_when_asked():
    assert normalize_answer("b", "choice") == Answer("choice", "B")
    assert normalize_answer("A. A. Milne", "choice") == Answer("choice", "A")
    assert normalize_answer("A. A. Milne") == Answer("text", "milne")


@pytest.mark.parametrize("a,b", [("#### 1,000", "1000"), ("$1000.00", "1000"), ("1e3", "1,000"), ("0.5", "1/2"),
                                 ("-3", "-3.0"), ("So she makes 9 * $2 = $18 every day.", "18"),
                                 ("The answer is 42, since 6 * 7 = 42.", "42"),
                                 ("Step 1: 5 + 5 = 10\n#### 12", "12")])
def test_numbers_compare_as_exact_values(a, b):
    assert same_answer(a, b, "number")


def test_numbers_that_differ_do_not_agree():
    assert not same_answer("#### 18", "#### 19", "number")
    assert not same_answer("0.333", "1/3", "number")  # exact fractions, no rounding
    assert normalize_answer("no digits here", "number") is None


def test_marker_wins_over_later_numbers_and_auto_reads_markers_and_bare_numbers():
    assert normalize_answer("#### 7\nchecked with 3 other ways", "number") == Answer("number", "7")
    assert normalize_answer("#### 7") == Answer("number", "7")
    assert normalize_answer("12") == Answer("number", "12")
    assert normalize_answer("12 apples").kind == "text"


@pytest.mark.parametrize("a,b", [("Noonoo", "noonoo!"), ("The Beatles", "beatles"), ("Beyoncé", "Beyonce"),
                                 ("  New   York City. ", "new york city"), ("an apple", "Apple")])
def test_short_text_normalisation(a, b):
    assert same_answer(a, b, "text")
    assert same_answer(a, b)


def test_different_texts_and_missing_answers_never_agree():
    assert not same_answer("Paris", "London")
    assert not same_answer(None, None)
    assert not same_answer("", "")
    assert not same_answer("  ", "A")
    assert not same_answer("...", "!!!")  # nothing left after normalisation
    assert normalize_text("The  Hobbit!") == "hobbit"


def test_kinds_do_not_mix():
    assert not same_answer("A", "a apple")
    assert not same_answer("#### 1", "1 (one)", "auto")


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown answer kind 'letter'"):
        normalize_answer("A", "letter")


def test_infer_kind():
    assert infer_kind(["A", "B", "C", "I do", None]) == "choice"
    assert infer_kind(["Step 1: 2 + 2 = 4\nSo the total is 4 apples in the basket.", "#### 5", "#### 6"]) == "number"
    assert infer_kind(["Paris", "Noonoo", "A Christmas Carol"]) == "text"
    assert infer_kind([None, " "]) == "text"
