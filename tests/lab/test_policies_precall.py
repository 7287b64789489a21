"""Pre-call policies: the learned `router` (RouteLLM / Hybrid LLM style) and
`select-then-route`: they learn what they should on hand-made data, decide only
through the Policy interface (JSON params, rebuilt by name), their tuners never
read the test split, and `evaluate` reports them on the shared files."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.env import BENCH
from helpers.labelled import chosen_knobs, keyword_rows, scramble

from router.core.attempt import Query
from router.core.features import QueryFeaturizer, text_features
from router.core.policies import POLICIES, make_policy
from router.core.policy import Needs, tier_infos
from router.core.portfolio import Price
from router.core.records import Dataset, Record, Response, load_dataset
from router.lab.evaluate import evaluate
from router.lab.metrics import summarize
from router.lab.simulate import TierModel, simulate
from router.lab.tuners import TUNERS, fit
from router.lab.tuning import Target

DATA = BENCH
MMLU = DATA / "rc-mmlu.jsonl.gz"
RL_GSM8K = DATA / "routellm-gsm8k.jsonl.gz"


def _resp(correct: float, cost: float | None, p_true: float | None = None) -> Response:
    return Response("x", correct, cost, None, None, None, None, p_true)


TIERS = [TierModel("small", "small"), TierModel("big", "big")]


# -- features --------------------------------------------------------------------------
def test_text_features_are_stable_sparse_and_normalised():
    idx, vals = text_features("The cat sat; the CAT sat!", 4096)
    idx2, _ = text_features("the cat sat the cat sat", 4096)
    assert list(idx) == list(idx2) and list(idx) == sorted(set(idx)) and idx.max() < 4096
    assert np.isclose((vals ** 2).sum(), 1.0)
    f = QueryFeaturizer(4096, ["law", "math"])
    i, v = f("The cat", "math")
    assert f.dim == 4096 + 1 + 2 and i[-1] == 4096 + 2 and v[-1] == 1.0 and i[-2] == 4096
    assert f("The cat", "unseen")[0][-1] == 4096  # an unknown category sets no column


# -- router ------------------------------------------------------------------------------
def test_router_learns_the_deciding_word():
    train, test = keyword_rows(200, "train", 1), keyword_rows(100, "test", 2)
    f = fit("logistic-router", train, TIERS, Target.match_best())  # the target: big's train accuracy, 1.0
    assert f.train_accuracy == 1.0 and f.train_cost < 0.6e-3
    pol = make_policy("logistic-router", tier_infos(TIERS), json.loads(json.dumps(f.params)))
    out = simulate(pol, TIERS, test)
    s = summarize(out, TIERS)
    assert s["accuracy"] == 1.0 and s["cost"] == pytest.approx((1e-5 + 1e-3) / 2)
    assert all(o.calls == ["small" if "zebra" in r.prompt else "big"] for o, r in zip(out, test))
    # exactly one call per query, decided in plan()
    plan = pol.plan(Query("q", "zebra river"))
    assert plan.first == 0 and plan.allowed == (0, 1)
    assert pol.needs(0) == Needs()


def test_router_params_are_json_and_rebuild_identically():
    train = keyword_rows(60, "train", 3)
    f = fit("logistic-router", train, TIERS, Target.budget(1e-3))
    text = json.dumps(f.params)
    assert len(text) < 200_000
    pol = make_policy("logistic-router", tier_infos(TIERS), json.loads(text))
    assert pol.params() == f.params
    assert set(f.params) == {"alpha", "order", "features", "models"}


def test_router_alpha_sweeps_from_cheap_to_dear():
    train = keyword_rows(100, "train", 4)
    f = fit("logistic-router", train, TIERS, Target.budget(1e-3))
    infos = tier_infos(TIERS)
    base = {k: v for k, v in f.params.items() if k != "alpha"}
    base["order"] = ["small", "big"]
    base["models"] = {m: f.params["models"].get(m, {"bias": 0.0, "w": ""}) for m in base["order"]}
    costs = [summarize(simulate(make_policy("logistic-router", infos, {**base, "alpha": a}), TIERS, train), TIERS)["cost"]
             for a in (0.0, 0.5, 1.01)]
    assert costs[0] == pytest.approx(1e-5) and costs[0] <= costs[1] <= costs[2]


def test_router_runs_without_costs_or_confidences():
    rows = keyword_rows(80, "train", 5, costs=False)
    tiers = [TierModel("small", "small"), TierModel("big", "big", Price(per_call=1.0))]
    f = fit("logistic-router", rows, tiers, Target.budget(0.6))
    assert f.train_cost <= 0.6 + 1e-9 and f.train_accuracy > 0.9


# -- select-then-route ---------------------------------------------------------------------
def _category_rows(n: int, split: str, with_conf: bool) -> list[Record]:
    """math: 'small' always right; law: 'small' wrong, 'big' right; p_true tells them apart."""
    rows = []
    for i in range(n):
        cat = "math" if i % 2 == 0 else "law"
        ok = cat == "math"
        rows.append(Record(f"{split}-{i}", f"q {i}", split, cat, None,
                           {"small": _resp(float(ok), 1e-5, (0.9 if ok else 0.2) if with_conf else None),
                            "big": _resp(1.0, 1e-3, 0.95 if with_conf else None)}))
    return rows


@pytest.mark.parametrize("with_conf", [False, True])
def test_select_then_route_shortlists_per_category(with_conf):
    train, test = _category_rows(40, "train", with_conf), _category_rows(20, "test", with_conf)
    f = fit("select-then-route", train, TIERS, Target.match_best())
    p = f.params
    assert p["shortlists"]["law"] == ["big"]
    assert p["shortlists"]["math"][0] == "small"
    assert (p["signal"] == "p_true") == with_conf and (p["threshold"] is None) == (not with_conf)
    pol = make_policy("select-then-route", tier_infos(TIERS), json.loads(json.dumps(p)))
    assert pol.params() == p
    assert pol.needs(0) == (Needs(signals=("p_true",)) if with_conf else Needs())
    s = summarize(simulate(pol, TIERS, test), TIERS)
    assert s["accuracy"] == 1.0 and s["cost"] == pytest.approx((1e-5 + 1e-3) / 2)
    # an unseen or missing category uses the default shortlist
    assert pol.plan(Query("q", "x", "history")).first == pol.plan(Query("q", "x", None)).first


def test_select_then_route_cascades_within_the_shortlist():
    infos = tier_infos(TIERS)
    pol = make_policy("select-then-route", infos, {"default": ["small", "big"], "shortlists": {"law": ["big"]},
                                                   "signal": "p_true", "threshold": 0.5})
    row = Record("r", "q", "test", "math", None, {"small": _resp(0.0, 1e-5, 0.1), "big": _resp(1.0, 1e-3, 0.9)})
    (o,) = simulate(pol, TIERS, [row])
    assert o.calls == ["small", "big"] and o.correct == 1.0
    (o,) = simulate(pol, TIERS, [dataclasses.replace(row, category="law")])
    assert o.calls == ["big"]


# -- registration, tuning reads train only, evaluate reports them ------------------------------
def test_registered_with_tuners():
    assert {"logistic-router", "select-then-route"} <= set(POLICIES) and {"logistic-router", "select-then-route"} <= set(TUNERS)






@pytest.fixture(scope="module")
def mmlu_small() -> Dataset:
    ds = load_dataset(MMLU)
    keep = [r for r in ds.records if r.split == "train"] + [r for r in ds.records if r.split == "test"][:400]
    return Dataset(ds.path, keep, list(ds.models), ds.models_meta)


@pytest.mark.parametrize("policy", ["logistic-router", "select-then-route"])
def test_scrambled_test_labels_do_not_change_the_fitted_params(mmlu_small, policy):
    test_ids = {r.id for r in mmlu_small.records if r.split == "test"}
    a = evaluate(mmlu_small, policy, points=20)
    b = evaluate(scramble(mmlu_small, test_ids), policy, points=20)
    ka, kb = chosen_knobs(a, {policy}), chosen_knobs(b, {policy})
    assert ka == kb and ka[policy]["frontier"]
    assert a["best_single"] != b["best_single"]  # the scramble took effect
    e = next(e for e in a["policies"] if e["name"] == policy)  # reported next to the baselines
    assert e["applicable"] and e["aiq"] is not None and len(e["frontier"]) >= 10
    assert {x["name"] for x in a["policies"]} >= {policy, "threshold-2tier", "random"}
    if policy == "select-then-route":
        p = e["frontier"][-1]["params"]
        assert p["signal"] == "logprob" and len(p["shortlists"]) == 57


def test_evaluate_reports_apgr_on_routellm_gsm8k():
    res = evaluate(RL_GSM8K, "logistic-router", points=20, folds=2)
    assert res["cost_unit"] == "strong_calls"
    e = next(e for e in res["policies"] if e["name"] == "logistic-router")
    assert e["applicable"] and e["apgr"] is not None and 0.3 < e["apgr"] < 1.0
    res = evaluate(RL_GSM8K, "select-then-route", points=20, folds=2)
    e = next(e for e in res["policies"] if e["name"] == "select-then-route")
    assert e["applicable"] and e["apgr"] is not None
    assert e["fold_knobs"][0]["parity"]["threshold"] is None  # no confidence: cheapest shortlisted only


def test_tune_cli_renames_the_tiers(tmp_path):
    from worker.cli.tune_cmd import tune

    rows = keyword_rows(60, "train", 6)
    path = tmp_path / "kw.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt, "split": r.split, "responses": {
        m: {"text": "x", "correct": x.correct, "cost_usd": x.cost_usd} for m, x in r.responses.items()}}) + "\n"
        for r in rows))
    for policy in ("logistic-router", "select-then-route"):
        out = tmp_path / f"{policy}.json"
        r = CliRunner().invoke(tune, ["--data", str(path), "--policy", policy, "--budget", "0.001",
                                      "--tier-names", "small=cheap,big=dear", "--out", str(out)])
        assert r.exit_code == 0, r.output
        doc = json.loads(out.read_text())
        text = json.dumps(doc["params"])
        assert '"small"' not in text and '"big"' not in text and ('"cheap"' in text or '"dear"' in text)
        infos = tier_infos([TierModel("cheap", "small"), TierModel("dear", "big")])
        assert make_policy(policy, infos, doc["params"]).params() == doc["params"]
