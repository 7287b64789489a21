"""Cascade routing in full: the expected-max arithmetic against brute force, lam = 0,
an order that is not the price order, the tuner on planted data (routing on the
query, agreement of cheap models), and the errors bad input gets."""
from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
from helpers.labelled import keyword_rows

from router.core import cascade
from router.core.attempt import Attempt, Query
from router.core.errors import PolicyError
from router.core.policies import make_policy
from router.core.policies.cascade_routing import Model, choose, expected_max, logit
from router.core.policy import Needs, TierInfo
from router.core.records import Record, Response
from router.lab.simulate import TierModel, simulate
from router.lab.tuners import fit
from router.lab.tuning import NotApplicable, Target

TIERS = [TierInfo("a", 0), TierInfo("b", 1), TierInfo("c", 2)]
Q = Query("q", "?")


def est(cost: float, q: float, spread=((0.0,), (0.0,), (0.0,)), sig: float = 0.0, agree: float = 0.0,
        sig_missing: float = 0.0) -> dict:
    """q_pre = q whatever the query; q_post = sigmoid(logit q + sig * s + agree * (agreeing - disagreeing)),
    s = -1 for a signal below 0, +1 above (the calibration's logit), 0 when absent."""
    e = math.e / (1 + math.e)
    return {"cost": cost, "pre": [logit(q), 0.0], "post": [0.0, sig, sig_missing, agree, -agree, 0.0, logit(q)],
            "spread": {k: list(v) for k, v in zip("012", spread)}, "edges": [0.0], "levels": [1 - e, e],
            "missing": 0.5}


def brute_max(known: float, supports) -> float:
    vals = [max([known, *combo]) for combo in itertools.product(*supports)] if supports else [known]
    return float(np.mean(vals))


def brute_choice(models, costs, lam, q_pres, run_pos, q_run):
    """The best set by enumeration with brute-force expectations (ties: cheaper, smaller)."""
    unrun = [p for p in range(len(models)) if p not in run_pos]
    known = max(q_run, default=0.0)
    best = None
    for size in range(0 if run_pos else 1, len(unrun) + 1):
        for T in itertools.combinations(unrun, size):
            c = sum(costs[p] for p in T)
            v = brute_max(known, [models[p].support(q_pres[p], len(run_pos)) for p in T]) - lam * c
            key = (-round(v, 9), round(c, 9), size)
            if best is None or key < best[0]:
                best = (key, T)
    return best[1]


def test_expected_max_is_exact_against_enumeration():
    rng = np.random.default_rng(3)
    for _ in range(50):
        sup = [rng.random(rng.integers(1, 5)) for _ in range(rng.integers(0, 4))]
        known = float(rng.random()) * rng.integers(0, 2)
        assert expected_max(known, sup) == pytest.approx(brute_max(known, sup), abs=1e-12)


def test_choose_scores_every_set_as_enumeration_does():
    rng = np.random.default_rng(5)
    for trial in range(40):
        k = int(rng.integers(2, 6))
        models = [Model(str(i), est(1.0, float(rng.uniform(0.2, 0.9)),
                                    [tuple(rng.normal(0, rng.uniform(0, 2), 4)) for _ in range(3)]))
                  for i in range(k)]
        costs = list(rng.uniform(0.01, 1.0, k))
        q_pres = [m.q_pre(0.0) for m in models]
        run = list(rng.choice(k, int(rng.integers(0, k)), replace=False))
        q_run = list(rng.uniform(0.1, 0.9, len(run)))
        lam = float(rng.choice([0.0, 0.05, 0.3, 2.0]))
        nxt, _ = choose(models, costs, lam, q_pres, run, q_run)
        T = brute_choice(models, costs, lam, q_pres, run, q_run)
        assert nxt == (min(T, key=lambda p: (costs[p], -q_pres[p], p)) if T else None), trial


# -- fixtures with known decisions -------------------------------------------------------
def policy(estimates: dict, lam: float, **kw):
    return make_policy("cascade-routing", TIERS, {"estimates": estimates, "lam": lam, "chain": ["a", "b", "c"], **kw})


ROUTING = {"a": est(0.1, 0.5), "b": est(0.3, 0.8), "c": est(1.0, 0.9)}


def test_lam_zero_routes_to_the_best_quality_model_and_lam_trades_it_for_cost():
    """Nothing is learnt by running a model (no spread): cascade routing is routing."""
    p = policy(ROUTING, 0.0)
    assert p.plan(Q).first == 2
    d = p.decide(Q, [Attempt("c", 2, "c", "x")])
    assert d.action == "accept" and d.answer_from == 0
    assert policy(ROUTING, 0.2).plan(Q).first == 1  # b: 0.8 - 0.06 > c: 0.9 - 0.2
    assert policy(ROUTING, 5.0).plan(Q).first == 0
    assert p.needs(0) == Needs()


AGREE = {
    # a: alone it says nothing (no spread); beside an answer already given, agreement tells a lot
    "a": est(0.1, 0.3, [(0.0,), (-3.0, 3.0), (-3.0, 3.0)], agree=3.0),
    # b: its confidence signal separates right from wrong
    "b": est(0.3, 0.7, [(-2.0, 2.0)] * 3, sig=2.0),
    "c": est(1.0, 0.85),
}


def rec(sig_b: float, ans_a: str, right: dict[str, float]) -> Record:
    return Record("r", "?", "test", None, None, {
        "a": Response(ans_a, right["a"], 0.1, None, None, None, None, None),
        "b": Response("B", right["b"], 0.3, None, None, None, sig_b, None),
        "c": Response("C", right["c"], 1.0, None, None, None, None, None),
    })


def test_the_order_can_differ_from_the_price_order():
    """At the start the best set is {b, c}: b runs first, before the cheaper a. When
    b's confidence is low, a (cheaper than b) becomes worth running next, because
    beside b's answer its agreement is informative; when they agree the query stops
    without c."""
    p = policy(AGREE, 0.1, signal="logprob")
    assert p.plan(Q).first == 1
    models = [Model(n, AGREE[n]) for n in "abc"]
    q_pres = [m.q_pre(0.0) for m in models]
    assert brute_choice(models, p.costs, 0.1, q_pres, [], []) == (1, 2)
    tiers = [TierModel(t.name, t.name) for t in TIERS]
    # b unsure, a agrees with b: stop at {b, a}; answer from the higher q_post
    out = simulate(p, tiers, [rec(-1.0, "B", {"a": 1.0, "b": 1.0, "c": 0.0})])[0]
    assert out.calls == ["b", "a"] and out.correct == 1.0
    # b unsure, a disagrees: c runs too
    out = simulate(p, tiers, [rec(-1.0, "A", {"a": 0.0, "b": 0.0, "c": 1.0})])[0]
    assert out.calls == ["b", "a", "c"] and out.final_model == "c"
    # b confident: stop at once
    out = simulate(p, tiers, [rec(1.0, "A", {"a": 0.0, "b": 1.0, "c": 1.0})])[0]
    assert out.calls == ["b"] and out.final_model == "b"
    assert p.needs(1) == Needs(signals=("logprob",))


def test_lam_zero_runs_while_a_model_can_still_add_and_returns_the_best_estimate():
    p = policy(AGREE, 0.0, signal="logprob")
    tiers = [TierModel(t.name, t.name) for t in TIERS]
    # b confident (q_post 0.945): no model's possible estimate exceeds it, even free
    out = simulate(p, tiers, [rec(1.0, "B", {"a": 1.0, "b": 1.0, "c": 0.0})])[0]
    assert out.calls == ["b"]
    # b unsure (0.24): a agreeing lifts a to 0.896 > c's 0.85, so c cannot add: a's answer
    out = simulate(p, tiers, [rec(-1.0, "B", {"a": 1.0, "b": 0.0, "c": 0.0})])[0]
    assert out.calls == ["b", "a"] and out.final_model == "a" and out.correct == 1.0
    d = cascade.step(p, Q, p.plan(Q), [Attempt("b", 1, "b", "B", {"logprob": -1.0}), Attempt("a", 0, "a", "B")])
    assert d.action == "accept" and d.answer_from == 1  # not the last call's by rule: the best estimate's
    d = cascade.step(p, Q, p.plan(Q), [Attempt("b", 1, "b", "B", {"logprob": -1.0}), Attempt("a", 0, "a", "A"),
                                       Attempt("c", 2, "c", "C")])
    assert d.action == "accept" and d.answer_from == 2


def test_params_round_trip_and_bad_params_are_named():
    p = policy(AGREE, 0.1, signal="logprob")
    assert json.loads(json.dumps(p.params())) == p.params()
    assert make_policy("cascade-routing", TIERS, p.params()).params() == p.params()
    with pytest.raises(PolicyError, match="estimates"):
        make_policy("cascade-routing", TIERS, {"lam": 1.0})
    with pytest.raises(PolicyError, match="lacks 'spread'"):
        make_policy("cascade-routing", TIERS, {"estimates": {"a": {"cost": 1, "pre": [0, 0], "post": [0] * 7}}})
    with pytest.raises(PolicyError, match="lam"):
        policy(AGREE, -1.0)
    with pytest.raises(PolicyError, match="'x' is not a tier"):
        make_policy("cascade-routing", TIERS, {"estimates": {**AGREE, "x": AGREE["a"]}})
    with pytest.raises(PolicyError, match=r"no estimates for chain tier\(s\) \['c'\]"):
        make_policy("cascade-routing", TIERS, {"estimates": {"a": AGREE["a"], "b": AGREE["b"]},
                                               "chain": ["a", "b", "c"]})
    with pytest.raises(PolicyError, match="go together"):
        policy(AGREE, 0.1, features={"text": "hashed", "buckets": 16, "categories": []})


# -- the tuner on planted data -----------------------------------------------------------
def _resp(text: str, correct: float, cost: float) -> Response:
    return Response(text, correct, cost, None, None, None, None, None)


def voter_rows(n: int, split: str, seed: int) -> list[Record]:
    """Two cheap models each right with probability 0.7 (a wrong one answers one of the
    three other letters at random); a dear one always right. The prompts say nothing."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        gold = rng.choice("ABCD")
        resp = {}
        for m, cost in (("v1", 0.01), ("v2", 0.01)):
            ok = rng.random() < 0.7
            resp[m] = _resp(gold if ok else rng.choice([x for x in "ABCD" if x != gold]), float(ok), cost)
        resp["strong"] = _resp(gold, 1.0, 1.0)
        rows.append(Record(f"{split}-{i}", f"question {rng.randrange(10**6)}", split, None, gold, resp))
    return rows


def test_tuner_learns_to_route_on_the_query():
    train, test = keyword_rows(200, "train", 1, answer="A"), keyword_rows(100, "test", 2, answer="A")
    tiers = [TierModel("small", "small"), TierModel("big", "big")]
    f = fit("cascade-routing", train, tiers, Target.match_best(), text="hashed", buckets=256)
    assert f.train_accuracy == 1.0 and f.train_cost < 0.7e-3
    pol = make_policy("cascade-routing", [TierInfo("small", 0), TierInfo("big", 1)], f.params)
    outs = simulate(pol, tiers, test)
    assert np.mean([o.correct for o in outs]) >= 0.95
    assert np.mean([o.calls == ["small"] for o in outs]) >= 0.4  # half the queries never need big


def test_tuner_learns_that_agreeing_cheap_models_need_no_strong_call():
    train, test = voter_rows(600, "train", 1), voter_rows(400, "test", 2)
    tiers = [TierModel("v1", "v1"), TierModel("v2", "v2"), TierModel("strong", "strong")]
    f = fit("cascade-routing", train, tiers, Target.budget(0.6), text="hashed", buckets=64)
    assert f.train_cost <= 0.6
    pol = make_policy("cascade-routing", [TierInfo(t.name, i) for i, t in enumerate(tiers)], f.params)
    outs = simulate(pol, tiers, test)
    acc, cost = np.mean([o.correct for o in outs]), np.mean([o.cost_usd for o in outs])
    # agree -> accept (right 0.49 / 0.52 of the time), else strong: about 0.97 at cost 0.5;
    # any mix of single models at that cost reaches only 0.7 + 0.3 * cost
    assert cost <= 0.65 and acc >= 0.93 and acc > 0.7 + 0.3 * cost + 0.05
    agreed = [o for o in outs if "strong" not in o.calls]
    assert agreed and all(len(o.calls) == 2 for o in agreed)


def test_tuner_errors_name_the_count():
    tiers = [TierModel("small", "small"), TierModel("big", "big")]
    with pytest.raises(NotApplicable, match="19 train rows are too few"):
        fit("cascade-routing", keyword_rows(19, "train", 1, answer="A"), tiers, Target.match_best())
    rows = keyword_rows(40, "train", 1, answer="A")
    for r in rows:
        r.responses["small"] = _resp("A", 1.0, 1e-5)
    with pytest.raises(NotApplicable, match="of one class"):
        fit("cascade-routing", rows, tiers, Target.match_best())
    assert math.isfinite(logit(1.0))
