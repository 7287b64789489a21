"""Comparators: what agrees with the reference, and what cannot be read at all."""
from __future__ import annotations

import pytest

from router.core.comparators import (
    CanonicalComparator,
    ComparatorError,
    EmbeddingComparator,
    make_comparator,
    resolved,
)


def verdicts(comp, ref, texts):
    r = comp.canonical([ref])[0]
    return [None if f is None else comp.same(f, r) for f in comp.canonical(texts)]


def test_choice_letters_agree_however_written_and_prose_cannot_be_read():
    comp = CanonicalComparator("choice")
    assert verdicts(comp, "B", ["(B)", "The answer is **B**.", "C", "I am not sure", "", None]) == [
        True, True, False, None, None, None]


def test_numbers_agree_as_numbers_and_text_without_one_cannot_be_read():
    comp = CanonicalComparator("number")
    assert verdicts(comp, "#### 1000", ["so it costs $1,000.00", "#### 1e3", "#### 999", "no idea"]) == [
        True, True, False, None]


def test_auto_kind_is_fixed_by_the_reference_answers():
    assert resolved(CanonicalComparator("auto"), ["A", "B", "C", "d"]).kind == "choice"
    assert resolved(CanonicalComparator("auto"), ["Paris", "Nicholas Nickleby"]).kind == "text"
    assert resolved(CanonicalComparator("number"), ["A"]).kind == "number"  # a kind given is kept
    # mixed traffic (numbers and words): each answer read by its own form, so words stay readable
    mixed = resolved(CanonicalComparator("auto"), ["7812", "342", "hats", "12", "Saturday"])
    assert mixed.kind == "auto" and verdicts(mixed, "hats", ["Hats.", "7812"]) == [True, False]
    # a rare refusal of the reference does not make a multiple-choice file "mixed"
    assert resolved(CanonicalComparator("auto"), ["A", "B", "C", "D"] * 5 + ["I cannot answer"]).kind == "choice"


def test_short_text_agrees_after_normalisation_only():
    comp = CanonicalComparator("text")
    assert verdicts(comp, "The Nicholas Nickleby.", ["nicholas nickleby", "Nicholas Nickleby novel", "  "]) == [
        True, False, None]


def test_embedding_comparator_accepts_a_paraphrase_and_rejects_another_answer():
    comp = EmbeddingComparator(0.85)
    assert verdicts(comp, "William Shakespeare", ["Shakespeare", "Charles Dickens", "william shakespeare!", ""]) == [
        True, False, True, None]


def test_bad_comparator_settings_are_named():
    with pytest.raises(ComparatorError, match="unknown comparator 'fuzzy'"):
        make_comparator("fuzzy")
    with pytest.raises(ComparatorError, match="unknown answer kind 'letter'"):
        make_comparator("canonical", kind="letter")
    with pytest.raises(ComparatorError, match="similarity must lie in"):
        make_comparator("embedding", similarity=2.0)
