"""The routed threshold cascade: a pre-call router on the query text picks where a
threshold cascade starts. It learns from text which queries the cheap tier misses
(word shapes carry it to numbers it never saw), decides only through the Policy
interface, and its tuner's figures are what `simulate` replays."""
from __future__ import annotations

import json
import random

import numpy as np

from router.core.attempt import Attempt, Query
from router.core.features import QueryFeaturizer, shape, text_features
from router.core.policies import POLICIES, make_policy
from router.core.policy import tier_infos
from router.core.records import Record, Response
from router.lab.metrics import summarize
from router.lab.simulate import TierModel, simulate
from router.lab.tuners import TUNERS, fit
from router.lab.tuning import Target

TIERS = [TierModel("small", "small"), TierModel("big", "big")]
INFOS = tier_infos(TIERS)


def _resp(correct: bool, cost: float, conf: float) -> Response:
    return Response("x", float(correct), cost, None, None, None, None, None, signals={"sum_logprob": conf})


def _rows(n: int, seed: int, numbers: range) -> list[Record]:
    """Half one-digit products (small right, sure of itself), half two-digit ones (small
    wrong, and as sure of itself as when right half of the time); big always right.
    Two-digit numbers come from `numbers`, so train and test can use different ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hard = i % 2 == 1
        a, b = (rng.choice(numbers), rng.choice(numbers)) if hard else (rng.randrange(2, 10), rng.randrange(2, 10))
        conf = (-0.05 if rng.random() < 0.5 else -2.0) if hard else -0.05
        rows.append(Record(f"q{seed}-{i}", f"What is {a} times {b}?", "train", None, None,
                           {"small": _resp(not hard, 1.0, conf), "big": _resp(True, 4.0, -0.1)}))
    return rows


def test_word_shapes_write_numbers_as_their_digit_count():
    assert shape("What is 47 times 8?") == "What is  num2  times  num1 ?"
    i1, _ = text_features("What is 47 times 83?", 4096, True)
    i2, v2 = text_features("What is 12 times 55?", 4096, True)
    plain, _ = text_features("What is 12 times 55?", 4096)
    assert len(set(i1) & set(i2)) > len(set(text_features("What is 47 times 83?", 4096)[0]) & set(plain))
    assert np.isclose((v2 ** 2).sum(), 1.0)
    f = QueryFeaturizer(4096, (), shapes=True)
    m = f.matrix([("What is 12 times 55?", None)]).toarray()[0]
    idx, vals = f("What is 12 times 55?", None)
    assert np.allclose(m[idx], vals) and np.count_nonzero(m) == len(idx)


def test_tuner_routes_predictably_hard_queries_past_the_cheap_tier():
    train, test = _rows(200, 1, range(10, 60)), _rows(200, 2, range(60, 100))
    fitted = fit("routed-threshold", train, TIERS, Target.accuracy(1.0), signal="sum_logprob")  # confirm()ed
    assert fitted.train_accuracy == 1.0
    pol = make_policy("routed-threshold", INFOS, json.loads(json.dumps(fitted.params)))
    out = simulate(pol, TIERS, test)
    # two-digit products it never saw go straight to big; one-digit ones are answered by small
    for rec, o in zip(test, out):
        hard = rec.id.endswith(("1", "3", "5", "7", "9"))
        assert o.calls == (["big"] if hard else ["small"]), (rec.prompt, o.calls)
    s = summarize(out, TIERS)
    assert s["accuracy"] == 1.0 and s["cost"] == (100 * 1.0 + 100 * 4.0) / 200
    # the threshold cascade alone must pay small on every query for the same accuracy
    plain = fit("threshold", train, TIERS, Target.accuracy(1.0), signal="sum_logprob", min_tiers=1)
    assert summarize(simulate(make_policy("threshold", INFOS, plain.params), TIERS, test), TIERS)["cost"] > s["cost"]


def test_the_cascade_still_checks_the_answers_of_routed_queries():
    train = _rows(200, 1, range(10, 100))
    params = fit("routed-threshold", train, TIERS, Target.accuracy(1.0), signal="sum_logprob").params
    pol = make_policy("routed-threshold", INFOS, params)
    q = Query("e", "What is 3 times 4?")
    plan = pol.plan(q)
    assert plan.first == 0 and plan.allowed == (0, 1)
    sure = Attempt("small", 0, "small", "12", {"sum_logprob": -0.01})
    unsure = Attempt("small", 0, "small", "13", {"sum_logprob": -5.0})
    assert pol.decide(q, [sure]).action == "accept"
    d = pol.decide(q, [unsure])
    assert d.action == "escalate" and d.next_tier == 1
    hard = Query("h", "What is 71 times 38?")
    assert pol.plan(hard).first == 1 and pol.plan(hard).allowed == (1, 0)  # small only as a fallback
    assert pol.decide(hard, [Attempt("small", 0, "small", "1", {"sum_logprob": -5.0})]).reason == "fallback tier"


def test_registered_with_a_tuner_and_params_rebuild_identically():
    assert "routed-threshold" in POLICIES and "routed-threshold" in TUNERS
    params = fit("routed-threshold", _rows(100, 3, range(10, 100)), TIERS, Target.accuracy(1.0),
                 signal="sum_logprob").params
    assert params["router"]["features"]["shapes"] is True and params["router"]["order"] == ["small", "big"]
    p1 = make_policy("routed-threshold", INFOS, params)
    p2 = make_policy("routed-threshold", INFOS, json.loads(json.dumps(p1.params())))
    assert p2.params() == p1.params()
