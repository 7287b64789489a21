"""Pseudo-labels from a file's own answers: counted skips, never silent grades;
and the comparison of tuning on them against tuning on real grades."""
from __future__ import annotations

import pytest
from helpers.cli import cascade

from router.core.comparators import CanonicalComparator, make_comparator
from router.core.records import Dataset, load_dataset, parse_record, record_json
from router.lab import pseudo_check
from router.lab.evaluate import evaluate, render
from router.lab.labelled import DataError, prepare
from router.lab.pseudo_labels import GOLD, most_accurate, pseudo_label, pseudo_reference
from router.lab.tuners import RiskSpec


def rec(i, answers, grades=None, split="train"):
    grades = grades or {}
    return parse_record({"id": str(i), "prompt": f"q{i}", "split": split, "responses": {
        m: {"text": t, "correct": grades.get(m)} for m, t in answers.items()}}, f"row {i}")


ROWS = [
    rec(0, {"s": "A", "m": "B", "top": "B"}, {"s": 0.0, "m": 1.0, "top": 1.0}),
    rec(1, {"s": "(C)", "m": "C", "top": "C"}, {"s": 1.0, "m": 1.0, "top": 1.0}),
    rec(2, {"s": "I cannot say", "m": "D", "top": "A"}, {"s": 0.0, "m": 0.0, "top": 0.0}),
    rec(3, {"s": "B", "m": "B", "top": "no idea"}, {"s": 1.0, "m": 1.0, "top": 0.0}),
]


def test_agreement_with_the_reference_replaces_correct_and_unreadable_answers_are_counted():
    out, rep = pseudo_label(ROWS, "top", CanonicalComparator("choice"))
    labels = [{m: r.correct for m, r in row.responses.items()} for row in out]
    assert labels == [
        {"s": 0.0, "m": 1.0, "top": 1.0},
        {"s": 1.0, "m": 1.0, "top": 1.0},
        {"s": 0.0, "m": 0.0, "top": 1.0},   # "I cannot say": unreadable, graded as disagreement and counted
        {"s": None, "m": None, "top": None},  # the reference gave no letter: the row stays unlabelled
    ]
    assert rep.comparator == "canonical answers (choice)"
    assert (rep.rows, rep.labelled_rows, rep.reference_unreadable, rep.first_unreadable_id) == (4, 3, 1, "3")
    assert rep.unparsed == {"s": 1}
    assert rep.agreement == {"s": pytest.approx(1 / 3), "m": pytest.approx(2 / 3), "top": 1.0}
    # fidelity: pseudo == real grade (row 2: top was wrong, yet agrees with itself)
    assert rep.fidelity["top"] == pytest.approx(2 / 3) and rep.fidelity["m"] == 1.0
    assert all(r.labels == "agreement with 'top'" for r in out)
    text = "\n".join(rep.lines())
    assert "not against the truth" in text and "1 unreadable answers graded as disagreement" in text


def test_skip_mode_leaves_unreadable_answers_unlabelled_and_prepare_names_the_dropped_rows():
    out, rep = pseudo_label(ROWS, "top", CanonicalComparator("choice"), unparsed="skip")
    assert out[2].responses["s"].correct is None and rep.unparsed == {"s": 1}
    L = prepare(load_dataset_from(out))
    assert [r.id for r in L.records] == ["0", "1"] and L.dropped["rows"] == 2


def load_dataset_from(records):
    return Dataset("mem.jsonl", list(records), ["s", "m", "top"])


def test_labels_round_trip_through_the_file_format_and_name_the_reference():
    out, _ = pseudo_label(ROWS, "top", CanonicalComparator("choice"))
    again = parse_record(record_json(out[0]), "again")
    assert again == out[0].__class__(**{**out[0].__dict__, "line": 0})
    assert pseudo_reference(again.labels) == "top" and pseudo_reference(None) is None


def test_bad_input_is_named():
    with pytest.raises(DataError, match="reference model 'gpt' is not among the models"):
        pseudo_label(ROWS, "gpt", CanonicalComparator())
    with pytest.raises(DataError, match="unparsed answers"):
        pseudo_label(ROWS, "top", CanonicalComparator(), unparsed="zero")
    with pytest.raises(DataError, match="no rows"):
        pseudo_label([], "top", CanonicalComparator())
    assert most_accurate(ROWS, ["s", "m", "top"]) == "m"


def test_pseudo_labels_of_a_shared_file_track_its_real_grades(bench):
    ds = load_dataset(bench / "rc-mmlu.jsonl.gz")
    train = ds.split("train")
    ref = most_accurate(train, ds.models)
    _, rep = pseudo_label(train, ref, make_comparator("canonical"))
    assert rep.reference_unreadable == 0 and rep.agreement[ref] == 1.0
    # multiple-choice letters: agreeing with a strong reference is mostly being right
    assert min(rep.fidelity.values()) > 0.6


def test_compare_tunes_on_pseudo_labels_and_scores_both_on_real_test_grades(bench):
    res = pseudo_check.compare(bench / "rc-mmlu.jsonl.gz", make_comparator("canonical"),
                               risk=RiskSpec(0.05, 0.1), fractions=(0.5,))
    assert res["split"] == "train/test" and len(res["pseudo_labels"]) == 1
    rows = {r["target"].split(" ")[0]: r for r in res["results"]}
    assert set(rows) == {"budget", "risk"}
    for r in rows.values():
        assert r["real"]["rows"] == r["pseudo"]["rows"] == 1531  # every test row, real grades
        assert r["accuracy_gap"] == pytest.approx(r["pseudo"]["accuracy"] - r["real"]["accuracy"])
    assert "scored on the real grades" in pseudo_check.render(res)


def test_pseudo_label_command_writes_a_file_that_evaluate_reports_as_agreement(bench, tmp_path):
    out = tmp_path / "pl.jsonl.gz"
    p = cascade("pseudo-label", "--data", str(bench / "rc-mmlu.jsonl.gz"), "--out", str(out), home=tmp_path)
    assert "agreement with 'qwen2.5-72b-instruct'" in p.stdout and "not against the truth" in p.stdout
    ds = load_dataset(out)
    assert len(ds.records) == 1816 and all(r.responses["qwen2.5-72b-instruct"].correct == 1.0 for r in ds.records)
    text = render(evaluate(out, "threshold", points=20))
    assert "labels: agreement with 'qwen2.5-72b-instruct': every accuracy below is agreement" in text
    bad = cascade("pseudo-label", "--data", str(bench / "rc-mmlu.jsonl.gz"), "--out", str(out), "--reference",
                  "gpt-5", home=tmp_path, check=False)
    assert bad.returncode == 1 and "--reference 'gpt-5' is not in rc-mmlu.jsonl.gz" in bad.stderr


def test_gold_as_the_reference_gives_real_grades_by_the_same_comparator():
    rows = [parse_record({"id": str(i), "prompt": "q", "gold": g, "responses": {
        "a": {"text": a}, "b": {"text": b}}}, "row") for i, (g, a, b) in enumerate(
            [("7812", "7812", "7,812"), ("342", "342", "343"), ("12", "12.0", "twelve"), ("hats", "Hats.", "hat"),
             (None, "1", "2")])]
    out, rep = pseudo_label(rows, GOLD, CanonicalComparator("auto"))  # mixed: numbers and words
    assert [(r.responses["a"].correct, r.responses["b"].correct) for r in out] == [
        (1.0, 1.0), (1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (None, None)]  # no gold: ungraded, and counted
    assert all(r.labels is None for r in out) and rep.reference_unreadable == 1
    assert rep.lines()[0].startswith("grades: `correct` = agreement with each row's gold answer")
