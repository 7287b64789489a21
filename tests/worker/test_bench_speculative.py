"""`cascade bench speculative`'s question set and prompt (the model runs are the bench's, never asserted)."""
from __future__ import annotations

import pytest
from helpers.env import SHARED

from router.core.answers import same_answer
from router.core.errors import UserError
from worker.bench.speculative import N_SHOTS, STOP, _read, draw_questions, few_shot_template, parse_spec

QUESTIONS = SHARED / "benchmarks" / "questions"


def test_the_prompt_has_worked_train_examples_whose_answers_grade_as_right():
    train = _read(QUESTIONS / "gsm8k.train.jsonl.gz")
    t = few_shot_template(train)
    assert t.count("Question: ") == N_SHOTS + 1 and t.endswith("Question: {prompt}\nAnswer:")
    assert "<<" not in t  # the calculator annotations are gone
    shots = t.split("\n\n")[1:-1]
    for shot, row in zip(shots, [r for r in train if r["question"] in t]):
        assert same_answer(shot, row["gold"], "number")  # the "####" answer of each example is its gold
        assert not any(s in shot.split("Answer:", 1)[1] for s in STOP)  # a worked answer never trips a stop


def test_questions_are_drawn_from_the_test_split_by_seed():
    test = _read(QUESTIONS / "gsm8k.test.jsonl.gz")
    a, b, c = draw_questions(test, 30, 0), draw_questions(test, 30, 0), draw_questions(test, 30, 1)
    assert a == b and a != c and len({q.id for q in a}) == 30
    assert all(q.id.startswith("gsm8k-test-") and q.gold for q in a)


def test_bad_specs_and_missing_files_are_user_errors(tmp_path):
    assert parse_spec("opt:0.3").alpha == 0.3 and parse_spec("always").name == "always"
    with pytest.raises(UserError, match="did you mean 'diff'"):
        parse_spec("dif:0.1")
    with pytest.raises(UserError, match="could not convert|alpha"):
        parse_spec("opt:x")
    with pytest.raises(UserError, match="CASCADE_SHARED"):
        _read(tmp_path / "gsm8k.test.jsonl.gz")
