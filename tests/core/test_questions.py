"""A live recording keeps only what the models produced: the question text, gold answer
and grade are joined from the shared question files when it is read."""
from __future__ import annotations

import json

import pytest

from router.core.errors import RecordsError
from router.core.questions import grade, question
from router.core.records import load_dataset
from router.lab.local_bench import MAX_CHARS, build


def test_a_row_without_prompt_is_joined_and_graded(tmp_path, bench):
    shared = str(bench.parent)
    q = question("mmlu-test-0", shared)
    g = question("gsm8k-test-0", shared)
    rows = [{"id": "mmlu-test-0", "responses": {"a": {"text": q.gold}, "b": {"text": "(" + q.gold + ")"},
                                                 "c": {"text": "Z"}}},
            {"id": "gsm8k-test-0", "responses": {"a": {"text": f"{g.gold}.00"}, "b": {"text": "7"},
                                                  "c": {"text": None}}}]
    path = tmp_path / "rec.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(path)
    m, n = ds.records
    assert m.prompt.startswith(q.prompt.split("\n")[0]) and "\nA. " in m.prompt and m.gold == q.gold
    assert m.split == "test" and m.category == "mmlu"
    assert [m.responses[x].correct for x in "abc"] == [1.0, 1.0, 0.0]
    assert [n.responses[x].correct for x in "abc"] == [1.0, 0.0, 0.0]
    assert grade("False, because", question("bbh-boolean_expressions-1", shared)) == 0.0  # gold True


def test_unknown_question_ids_are_named(tmp_path, bench):
    path = tmp_path / "rec.jsonl"
    path.write_text(json.dumps({"id": "mmlu-test-99999999", "responses": {"a": {"text": "A"}}}) + "\n")
    with pytest.raises(RecordsError, match="rec.jsonl:1: question 'mmlu-test-99999999' is not in"):
        load_dataset(path)


def test_the_benchmark_draw_is_seeded_and_leaves_out_its_few_shot_examples(bench):
    plan = {"mmlu.dev": 5, "gsm8k.test": 5, "bbh/boolean_expressions": 4}
    a, b = build(plan, seed=3, shared=str(bench.parent)), build(plan, seed=3, shared=str(bench.parent))
    assert [q.id for q in a.questions] == [q.id for q in b.questions] and len(a.questions) == 14
    assert not set(a.examples) & {q.id for q in a.questions}
    assert all(len(q.prompt) <= MAX_CHARS for q in a.questions)
    assert a.template.count("Question: ") == len(a.examples) + 1 and a.template.endswith("{prompt}\nAnswer:")
    assert {q.split for q in a.questions if q.set.startswith("bbh")} <= {"train", "test"}
