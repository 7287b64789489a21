"""The pre-call routers of issue 11 (routellm mf/sw/classifier, hybrid-llm, optllm,
cargo): their maths on small planted fixtures, their tuners on keyword data, and
the errors bad input gets."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.labelled import keyword_rows

from router.core.attempt import Query
from router.core.errors import PolicyError
from router.core.policies import make_policy
from router.core.policies.optllm import assign_batch, pareto_front, route_all
from router.core.policy import TierInfo, tier_infos
from router.core.quality import QueryEncoder, bradley_terry, pack, predictor_from_params
from router.core.records import Record, Response
from router.lab.metrics import summarize
from router.lab.quality_fit import fit_mf
from router.lab.simulate import TierModel, simulate
from router.lab.tuners import fit
from router.lab.tuning import NotApplicable, Target

TIERS = [TierModel("small", "small"), TierModel("big", "big")]
ROUTERS = [("routellm", {"scorer": "mf"}), ("routellm", {"scorer": "sw"}), ("routellm", {"scorer": "linear"}),
           ("optllm", {}), ("cargo", {}), ("hybrid-llm", {})]


def _resp(correct: float, cost: float | None) -> Response:
    return Response("x", correct, cost, None, None, None, None, None)


# -- the maths on planted fixtures ---------------------------------------------------------
def test_matrix_factorisation_recovers_a_planted_ranking():
    """Three query clusters, three models, a different planted best model per cluster:
    the fitted MF ranks the models of every cluster as planted."""
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 3.0
    planted = np.array([[0.9, 0.5, 0.1], [0.1, 0.9, 0.5], [0.5, 0.1, 0.9]])  # cluster x model P(correct)
    cluster = rng.integers(0, 3, 600)
    X = centres[cluster] + rng.normal(0, 0.3, (600, 3))
    Y = (rng.random((600, 3)) < planted[cluster]).astype(float).T
    pred = predictor_from_params(fit_mf(X, Y, h=3, l2=1e-4), 3, 3)
    got = pred.predict(centres)
    for c in range(3):
        assert list(np.argsort(-got[c])) == list(np.argsort(-planted[c])), (c, got[c])


def test_bradley_terry_orders_by_wins():
    wins = np.array([[0.0, 8.0, 9.0], [2.0, 0.0, 6.0], [1.0, 4.0, 0.0]])
    r = bradley_terry(wins)
    assert r[0] > r[1] > r[2] and abs(r.sum()) < 1e-9


def test_optllm_front_is_non_dominated_and_covers_every_lam():
    rng = np.random.default_rng(1)
    Q = rng.random((40, 4))
    costs = np.array([0.0, 0.1, 0.4, 1.0])
    front = pareto_front(Q, costs)
    pts = [(p["cost"], p["quality"]) for p in front]
    assert len(pts) >= 2
    for i, (c, q) in enumerate(pts):
        for j, (c2, q2) in enumerate(pts):
            if i != j:
                assert not (c2 <= c and q2 >= q and (c2 < c or q2 > q)), (pts[i], pts[j])
    # no assignment at any lam beats the front
    rows = np.arange(40)
    for lam in np.linspace(0, 3, 61):
        ch = route_all(Q, costs, lam)
        c, q = costs[ch].mean(), Q[rows, ch].mean()
        assert any(fc <= c + 1e-12 and fq >= q - 1e-12 for fc, fq in pts)
    # the batch assignment under a budget stays within it, and takes the best such point
    b = pts[len(pts) // 2][0] + 1e-9
    got = assign_batch(Q, costs, b)
    assert got["cost"] <= b and got["quality"] == max(q for c, q in pts if c <= b)
    with pytest.raises(PolicyError, match="below the cheapest"):
        assign_batch(Q, costs, -1.0)


def _linear_router(lam: float) -> object:
    tiers = [TierInfo("cheap", 0), TierInfo("mid", 1), TierInfo("dear", 2)]
    enc = QueryEncoder("hashed", 16, [])
    W = np.zeros((3, enc.dim))
    return make_policy("routellm", tiers, {
        "lam": lam, "order": ["cheap", "mid", "dear"], "costs": {"cheap": 0.0, "mid": 0.3, "dear": 1.0},
        "features": enc.params(),
        "predictor": {"kind": "linear", "W": pack(W), "b": pack(np.array([0.0, 1.0, 2.0]))}})


def test_quality_router_with_lam_zero_picks_the_best_predicted_model_and_lam_trades_cost():
    assert _linear_router(0.0).plan(Query("q", "anything")).first == 2
    assert _linear_router(10.0).plan(Query("q", "anything")).first == 0


# -- tuners on keyword data ----------------------------------------------------------------
@pytest.mark.parametrize("policy,opts", ROUTERS, ids=[p + str(o.get("scorer", "")) for p, o in ROUTERS])
def test_routers_learn_the_deciding_word_and_rebuild_from_json(policy, opts):
    train, test = keyword_rows(200, "train", 1), keyword_rows(100, "test", 2)
    f = fit(policy, train, TIERS, Target.match_best(), text="hashed", buckets=256, **opts)
    assert f.train_accuracy == 1.0 and f.train_cost < 0.7e-3
    pol = make_policy(policy, tier_infos(TIERS), json.loads(json.dumps(f.params)))
    assert pol.params() == f.params
    s = summarize(simulate(pol, TIERS, test), TIERS)
    assert s["accuracy"] >= 0.95 and s["cost"] < 0.7e-3


# -- bad input -----------------------------------------------------------------------------
def test_too_few_rows_or_one_class_is_a_clear_error():
    with pytest.raises(NotApplicable, match="12 train rows are too few"):
        fit("routellm", keyword_rows(12, "train", 3), TIERS, Target.budget(1.0), text="hashed")
    rows = [Record(f"r{i}", f"q {i}", "train", None, None, {"small": _resp(1.0, 1e-5), "big": _resp(1.0, 1e-3)})
            for i in range(30)]
    with pytest.raises(NotApplicable, match="every model's 30 train outcomes are of one class"):
        fit("optllm", rows, TIERS, Target.budget(1.0), text="hashed")


def test_tiers_the_policy_or_the_portfolio_lack_are_named():
    f = fit("routellm", keyword_rows(60, "train", 4), TIERS, Target.budget(1.0), text="hashed", scorer="linear")
    with pytest.raises(PolicyError, match=r"order tier 'big' is not a tier of this portfolio"):
        make_policy("routellm", [TierInfo("small", 0), TierInfo("huge", 1)], f.params)
    with pytest.raises(PolicyError, match=r"portfolio tier\(s\) \['extra'\] have no fitted prediction"):
        make_policy("routellm", [TierInfo("small", 0), TierInfo("big", 1), TierInfo("extra", 2)], f.params)


# -- select-then-route: taxonomy, shrinkage, judges ----------------------------------------
def test_taxonomy_detects_the_classes_and_answer_keys_compare_answers():
    from router.core.taxonomy import answer_key, detect

    assert detect("Which is warmer?\nA) ice\nB) fire\nC) snow") == "multiple-choice"
    assert detect("Tom has 3 apples and buys 5 more. How many apples does he have?") == "math"
    assert detect("Who wrote Hamlet?") == "factual"
    assert detect("def f(x):\n    return x") == "code"
    assert detect("Write a poem about the sea") == "open"
    assert answer_key("C\n") == answer_key("(C) fire") == "C"
    assert answer_key("so the total is 1,000.") == answer_key("1000") == "1000"
    assert answer_key("  Paris. ") == "paris" and answer_key(None) is None


def _judge_rows(n: int, split: str) -> list[Record]:
    """'a' and 'b' (cheap) agree exactly when both are right; 'c' (dear) is always right."""
    rows = []
    for i in range(n):
        ok = i % 3 != 0
        resp = {"a": Response("B" if ok else "A", float(ok), 1e-5, None, None, None, None, None),
                "b": Response("B" if ok else "C", float(ok), 2e-5, None, None, None, None, None),
                "c": Response("B", 1.0, 1e-3, None, None, None, None, None)}
        rows.append(Record(f"{split}-{i}", f"Pick one\nA) x\nB) y\nC) z {i}", split, None, None, resp))
    return rows


def test_select_then_route_judges_escalate_when_they_disagree():
    tiers = [TierModel(m, m) for m in ("a", "b", "c")]
    f = fit("select-then-route", _judge_rows(60, "train"), tiers, Target.match_best())
    assert f.params["judges"] is True and f.train_accuracy == 1.0
    assert f.params["shortlists"] == {"auto:multiple-choice": ["a", "b", "c"]}
    test = _judge_rows(30, "test")
    out = simulate(make_policy("select-then-route", tier_infos(tiers), f.params), tiers, test)
    assert all(o.correct == 1.0 for o in out)
    assert [len(o.calls) for o in out] == [3 if i % 3 == 0 else 2 for i in range(30)]


def test_select_then_route_shrinks_small_classes_toward_the_global_ranking():
    from router.lab.tuners.select_then_route import shortlist

    correct = np.array([[1.0, 1.0], [0.0, 1.0]])  # two rows of a class: model 0 looks best
    prior = np.array([0.2, 0.9])                   # globally model 1 is far better
    assert shortlist(correct, [0, 1], 0.0) == (0,)
    assert shortlist(correct, [0, 1], 0.0, shrink=40.0, prior=prior) == (1,)


def test_optllm_plans_a_batch_within_its_budget_in_the_submitter_path():
    from router.core import cascade

    train = keyword_rows(200, "train", 7)
    f = fit("optllm", train, TIERS, Target.budget(1e-3), text="hashed", buckets=256)
    infos = tier_infos(TIERS)
    queries = [r.query() for r in keyword_rows(40, "test", 8)]
    for budget in (0.01, 0.25, 1.0):  # mean cost relative to big's; small's is 0.01
        pol = make_policy("optllm", infos, {**f.params, "batch_budget": budget})
        starts = cascade.start_batch(pol, queries)
        assert np.mean([pol.costs[pol.order.index(s.tier)] for s in starts]) <= budget + 1e-9
    with pytest.raises(PolicyError, match="below the cheapest"):
        cascade.start_batch(make_policy("optllm", infos, {**f.params, "batch_budget": 0.001}), queries)
    # with the whole budget the zebra-free queries (where small fails) all go to big
    starts = cascade.start_batch(make_policy("optllm", infos, {**f.params, "batch_budget": 1.0}), queries)
    assert all(s.tier == 1 for s, q in zip(starts, queries) if "zebra" not in q.prompt)
