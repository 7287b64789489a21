"""Worked-answer checks (router/core/worked.py) and the answer scorer that reads them and
the query's hashed words (`checks`, `words`): slips found, cut expressions not taken
for slips; a cascade whose cheap tier errs by arithmetic slips on some questions and by
misreading one kind of question saves with both blocks and cannot without them; auto
takes that candidate from the train rows."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from router.core import worked
from router.core.errors import PolicyError
from router.core.policies import make_policy
from router.core.policy import tier_infos
from router.core.scorers import AnswerScorer, feature_count
from router.lab.labelled import build_table, prepare
from router.lab.simulate import simulate
from router.lab.tuners import auto, confirm, make_tuner
from router.lab.tuning import NotApplicable, Target, TargetUnreachable


def test_a_slip_is_found_and_sound_arithmetic_is_not():
    assert worked.evaluate("3 * (60 - 2) / 4") == pytest.approx(43.5)
    assert worked.evaluate("1/0") is None and worked.evaluate("2**3") is None and worked.evaluate("x+1") is None
    assert worked.equalities("So 3 x 60 = <<3*60=180>>180 meters, and 180 * 3 = 540.") == [True, True, True]
    assert worked.equalities("12 + 6 + 3 = 22 candies\n#### 22") == [False]
    assert worked.equalities("\\frac{12}{2} = 6 and 2 \\times 7 = 15") == [True, False]
    # sides cut out of expressions written partly in words, a bullet, a variable: not checked
    assert worked.equalities("Tip = 25% of $20 = 0.25 * 20 = $5.") == [True]  # not "$20 = 0.25 * 20"
    assert worked.equalities("2U + K - 17 = 411\n8 = 2x\n- 2 + 0.5 = 2.5") == [True]
    f = dict(zip(worked.FEATURES, worked.features("Ann has 4 apples and 7 pears.", "4 + 7 = 12\n#### 12.5")))
    assert f["slip"] == 1.0 and f["slip_share"] == 1.0 and f["unused_share"] == 0.0 and f["final_fraction"] == 1.0
    assert worked.features("q", None) == [0.0] * len(worked.FEATURES)


def test_a_scorer_with_checks_and_words_is_plain_json_and_checked():
    n = feature_count(0, [], [], checks=True, words=64)
    sc = AnswerScorer({"kind": "number", "agree": 0, "signals": [], "checks": True, "text": [], "words": 64,
                       "bias": 0.5, "w": [0.0] * n})
    assert AnswerScorer(sc.params()).params() == sc.params() and sc.params()["words"] == 64
    assert 0.0 < sc.score("Ann has 4 apples", "4 + 4 = 9\n#### 9", []) < 1.0
    with pytest.raises(PolicyError, match=r"w must be a list of .*5 checks.*64 words"):
        AnswerScorer({**sc.params(), "w": [0.0] * (n - 1)})
    with pytest.raises(PolicyError, match="checks must be true or false"):
        AnswerScorer({**sc.params(), "checks": "yes"})
    with pytest.raises(PolicyError, match="words must be a number of hash buckets"):
        AnswerScorer({**sc.params(), "words": -1})


NAMES = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo"]


def word_problems(n: int, seed: int, split: str) -> list[dict]:
    """s (cost 1) answers apple questions right 75% of the time, a wrong answer always
    with an arithmetic slip; dozen questions it misreads (a dozen taken as 10) 85% of
    the time, with sound arithmetic. l (cost 10) is right 97% of the time."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        who = rng.choice(NAMES)
        if rng.random() < 0.6:
            prompt = f"{who} has {a} apples and buys {b} more. How many apples does {who} have?"
            gold = a + b
            right = rng.random() < 0.75
            got = gold if right else gold + rng.choice([-3, -2, -1, 1, 2, 3])
            text = f"{who} has {a} + {b} = {got} apples.\n#### {got}"
        else:
            prompt = f"{who} buys {a} dozen eggs. How many eggs does {who} buy?"
            gold = 12 * a
            right = rng.random() < 0.15
            per = 12 if right else 10
            got = a * per
            text = f"{who} buys {a} * {per} = {got} eggs.\n#### {got}"
        strong = rng.random() < 0.97
        out.append({"id": f"{split}-{i}", "prompt": prompt, "split": split, "gold": str(gold), "responses": {
            "s": {"text": text, "correct": float(right), "cost_usd": 1.0},
            "l": {"text": f"The answer is {gold if strong else gold + 1}.\n#### {gold if strong else gold + 1}",
                  "correct": float(strong), "cost_usd": 10.0}}})
    return out


@pytest.fixture
def problems(tmp_path) -> Path:
    path = tmp_path / "problems.jsonl"
    rows = word_problems(400, 0, "train") + word_problems(400, 1, "test")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _on_test(path: Path, options: dict) -> tuple[float, float, float]:
    """(test accuracy, its cost over l's, l's test accuracy) of frugalgpt tuned to parity on train."""
    L = prepare(path)
    train, test = L.train_test()
    tiers = L.tiers(train)
    infos = tier_infos(tiers)
    tuner = make_tuner("frugalgpt", build_table(train, tiers), infos, **options)
    fp = confirm(tuner.select(Target.match_best()), train, tiers)
    out = simulate(make_policy(fp.policy, infos, fp.params), tiers, test)
    ref = simulate(make_policy("single", infos, {"tier": "l"}), tiers, test)
    return (float(np.mean([o.correct for o in out])), sum(o.cost_usd for o in out) / sum(o.cost_usd for o in ref),
            float(np.mean([o.correct for o in ref])))


CHECKED = next(c.options for c in auto.CANDIDATES if c.name == "frugalgpt-checked")


def test_the_scorer_saves_with_checks_and_words_and_not_without(problems):
    acc, ratio, ref = _on_test(problems, CHECKED)
    assert acc >= ref - 0.01 and ratio <= 0.65
    # answer form alone (FrugalGPT's text-only scorer): the slips and the misread kind look alike
    try:
        acc0, ratio0, _ = _on_test(problems, {"text": []})
        assert acc0 < ref - 0.01 or ratio0 > 0.9
    except TargetUnreachable:
        pass
    for half in ({**CHECKED, "words": 0}, {**CHECKED, "checks": False, "require_checks": False}):  # each alone falls short
        try:
            acc1, ratio1, _ = _on_test(problems, half)
            assert acc1 < ref - 0.01 or ratio1 > ratio + 0.1
        except TargetUnreachable:
            pass


def test_auto_takes_the_checked_cascade_from_the_train_rows(problems, monkeypatch):
    monkeypatch.setattr(auto, "CANDIDATES", tuple(c for c in auto.CANDIDATES
                                                  if c.name in ("single", "frugalgpt", "frugalgpt-checked")))
    L = prepare(problems)
    train, _ = L.train_test()
    tiers = L.tiers(train)
    f = make_tuner("auto", build_table(train, tiers), tier_infos(tiers)).select(Target.match_best())
    assert f.search["auto"]["chosen"] == "frugalgpt-checked" and f.policy == "frugalgpt"
    sc = f.params["scorers"]["s"]
    assert sc["checks"] is True and sc["words"] == 4096


def test_the_checked_candidate_is_not_applicable_without_worked_numbers(tmp_path):
    rows = word_problems(60, 2, "train")
    for r in rows:
        for m in ("s", "l"):
            r["responses"][m]["text"] = "ABCD"[int(r["responses"][m]["correct"])]  # letters, no arithmetic
    path = tmp_path / "letters.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    L = prepare(path)
    tiers = L.tiers(L.records)
    with pytest.raises(NotApplicable, match="not worked numbers"):
        make_tuner("frugalgpt", build_table(L.records, tiers), tier_infos(tiers), **CHECKED)
