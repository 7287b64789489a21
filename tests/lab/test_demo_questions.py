"""The demo's generated question set, answer extraction, grading and calibration (pure)."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from router.core.errors import UserError
from router.lab import demo_questions as dq


def test_generation_is_deterministic_and_seeded():
    a = dq.generate(60, seed=0)
    assert a == dq.generate(60, seed=0)
    assert [q.prompt for q in a] != [q.prompt for q in dq.generate(60, seed=1)]


def test_levels_follow_the_weights_and_prompts_are_unique():
    qs = dq.generate(60, seed=0)
    assert len(qs) == 60
    assert Counter(q.level for q in qs) == dq.level_counts(60) == {1: 21, 2: 18, 3: 12, 4: 9}
    assert len({q.prompt for q in qs}) == 60
    assert len({q.id for q in qs}) == 60
    examples = {p for p, _ in dq.FEW_SHOT_EXAMPLES + dq.TINY_EXTRA_EXAMPLES}
    assert not examples & {q.prompt for q in qs}
    # every family of a level is used before one is used twice
    fams = Counter(q.family for q in qs)
    for level in (1, 2, 3, 4):
        counts = [fams[f] for f, (lvl, _) in dq.FAMILIES.items() if lvl == level]
        assert max(counts) - min(counts) <= 1


def test_level_counts_add_up():
    for n in (1, 2, 7, 13, 60, 101):
        c = dq.level_counts(n)
        assert sum(c.values()) == n and all(v >= 0 for v in c.values())


def _check(q: dq.Question) -> str:
    """Recompute a gold answer from the prompt alone."""
    p = q.prompt
    if m := re.fullmatch(r"What is (\d+) ([+-]|times) (\d+)\?", p):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b if op == "-" else a * b)
    if m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", p):
        factor = {(frm, to): f for frm, to, f in dq.CONVERSIONS}[(m[3], m[1])]
        return str(int(m[2]) * factor)
    if m := re.fullmatch(r"Which is bigger, (\d+) or (\d+)\?", p):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"What letter comes after (\w) in the alphabet\?", p):
        return chr(ord(m[1]) + 1)
    if m := re.fullmatch(r"What day comes after (\w+)\?", p):
        return dq.DAYS[(dq.DAYS.index(m[1]) + 1) % 7]
    if m := re.fullmatch(r"What month comes after (\w+)\?", p):
        return dq.MONTHS[(dq.MONTHS.index(m[1]) + 1) % 12]
    if m := re.fullmatch(r"What is the plural of (\w+)\?", p):
        return m[1] + "s"
    raise AssertionError(f"unrecognised prompt {p!r}")


def test_gold_answers_are_right():
    qs = dq.generate(400, seed=7, families=list(dq.FAMILIES))
    assert {q.family for q in qs} == set(dq.FAMILIES)
    for q in qs:
        assert _check(q) == q.answer, q


def test_few_shot_examples_are_right_too():
    for prompt, answer in dq.FEW_SHOT_EXAMPLES + dq.TINY_EXTRA_EXAMPLES:
        q = dq.Question("x", prompt, answer, "number" if answer.isdigit() else "word", "ex", 0)
        assert _check(q).lower() == answer.lower()


def test_few_shot_template():
    for block in (dq.FEW_SHOT, dq.FEW_SHOT_TINY):
        assert block.count("{prompt}") == 1
        assert block.endswith("Q: {prompt}\nA:")
    assert dq.FEW_SHOT_TINY.startswith(dq.FEW_SHOT.split("Q: {prompt}")[0])
    assert dq.STOP == ("\n",)


@pytest.mark.parametrize("text,kind,want", [
    ("42", "number", "42"),
    (" 1,248 ", "number", "1248"),
    ("The answer is 17.", "number", "17"),
    ("12.0", "number", "12"),
    ("-5", "number", "-5"),
    ("none", "number", None),
    ("", "number", None),
    (None, "number", None),
    ("tuesday", "word", "Tuesday"),
    ("Saturday.", "word", "Saturday"),
    ("E\nF", "word", "E"),
    ("42", "word", None),
])
def test_extract(text, kind, want):
    assert dq.extract(text, kind) == want


def test_grade():
    assert dq.grade(" 83", "83", "number")
    assert not dq.grade("830", "83", "number")
    assert dq.grade("cats", "cats", "word") and dq.grade("Cats", "cats", "word")
    assert not dq.grade("cat", "cats", "word")
    assert not dq.grade(None, "7", "number")


def test_item_carries_the_gold_fields():
    q = dq.generate(1, seed=3)[0]
    item = q.item()
    assert item["id"] == q.id and item["prompt"] == q.prompt and item["gold"] == q.answer
    assert item["kind"] == q.kind and item["level"] == q.level


def test_calibration_and_demo_parts_share_no_question():
    cal = dq.generate(300, seed=1000, prefix="c", part="calibration")
    demo = dq.generate(100, seed=0, part="demo")
    assert {q.prompt for q in cal}.isdisjoint({q.prompt for q in demo})
    assert all(dq.part_of(q.prompt) == "calibration" for q in cal) and all(dq.part_of(q.prompt) == "demo" for q in demo)
    # without a part, two seeds share many of the trivial questions: the parts are what keeps them apart
    assert {q.prompt for q in dq.generate(300, seed=1000)} & {q.prompt for q in dq.generate(100, seed=0)}
    with pytest.raises(UserError, match="unknown part"):
        dq.generate(5, part="test")
