"""cascade-routing and automix: decisions on hand-made estimates with known answers,
tuning that meets its target through router.simulate and never reads the test
split, renamed tiers, and `cascade evaluate` reporting them (or why not)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.env import BENCH
from helpers.labelled import chosen_knobs, scramble

from router.core.attempt import Attempt, Query
from router.core.errors import PolicyError
from router.core.policies import POLICIES, make_policy
from router.core.policies.automix import AutoMix
from router.core.policies.cascade_routing import CascadeRouting
from router.core.policy import Needs, TierInfo
from router.core.records import Dataset, load_dataset
from router.lab.evaluate import evaluate
from router.lab.labelled import prepare
from router.lab.tuners import TUNERS, fit
from router.lab.tuning import NotApplicable, Target, pav
from worker.cli.tune_cmd import tune

DATA = BENCH
MMLU = DATA / "rc-mmlu.jsonl.gz"
TRIVIA = DATA / "rc-triviaqa.jsonl.gz"

TIERS = [TierInfo("a", 0), TierInfo("b", 1), TierInfo("c", 2)]
Q = Query("q1", "?")


def att(tier: int, signal: float | None, name: str = "logprob") -> Attempt:
    t = TIERS[tier]
    return Attempt(t.name, t.index, t.name, "ans-" + t.name, {} if signal is None else {name: signal})


def test_pav_is_monotone_and_keeps_the_weighted_mean():
    v, w = [0.3, 0.1, 0.5, 0.4, 0.9], [1, 3, 1, 1, 2]
    out = pav(v, w)
    assert out == sorted(out)
    assert np.dot(out, w) == pytest.approx(np.dot(v, w))
    assert pav([0.1, 0.2], [1, 1]) == [0.1, 0.2]


# -- automix: known decisions ----------------------------------------------------------
STEP = {
    "edges": [0.5],
    "prior": {"good": 0.5, "needy": 0.3, "hopeless": 0.2},
    "likelihood": {"good": [0.2, 0.8], "needy": [0.7, 0.3], "hopeless": [0.5, 0.5]},
    "gain": {"good": -0.1, "needy": 1.0, "hopeless": 0.0},
    "cost": 2.0,
}


def am(lam: float) -> AutoMix:
    return make_policy("automix", TIERS, {"steps": {"a": STEP}, "lam": lam, "chain": ["a", "c"]})


def test_automix_posterior_decision():
    # low bin: post ∝ (0.1, 0.21, 0.1) -> E[gain] = (-0.01 + 0.21) / 0.41 = 0.4878
    g_low = (0.5 * 0.2 * -0.1 + 0.3 * 0.7) / (0.5 * 0.2 + 0.3 * 0.7 + 0.2 * 0.5)
    # high bin: post ∝ (0.4, 0.09, 0.1) -> (-0.04 + 0.09) / 0.59
    g_high = (0.5 * 0.8 * -0.1 + 0.3 * 0.3) / (0.5 * 0.8 + 0.3 * 0.3 + 0.2 * 0.5)
    g_none = 0.5 * -0.1 + 0.3  # no observation: the prior
    for sig, g in ((0.2, g_low), (0.9, g_high), (None, g_none)):
        crit = g / 2.0
        d = am(crit * 0.999).decide(Q, [att(0, sig, "p_true")])
        assert (d.action, d.next_tier) == ("escalate", 2), sig
        assert am(crit * 1.001).decide(Q, [att(0, sig, "p_true")]).action == "accept"
    assert am(0.0).decide(Q, [att(0, 0.9, "p_true"), att(2, 0.1, "p_true")]).reason == "last tier of the chain"
    p = am(0.1)
    assert p.needs(0) == Needs(signals=("p_true",))
    assert make_policy("automix", TIERS, json.loads(json.dumps(p.params()))).params() == p.params()
    with pytest.raises(PolicyError, match="no fitted step"):
        make_policy("automix", TIERS, {"steps": {}, "chain": ["a", "c"]})


def test_registered_with_tuners():
    assert POLICIES["cascade-routing"] is CascadeRouting and POLICIES["automix"] is AutoMix
    assert {"cascade-routing", "automix"} <= set(TUNERS)


# -- tuning on the shared files ----------------------------------------------------
@pytest.fixture(scope="module")
def trivia() -> Dataset:
    return load_dataset(TRIVIA)






@pytest.mark.parametrize("policy", ["cascade-routing", "automix"])
def test_tuning_never_reads_the_test_split(trivia, policy):
    models = ["llama3.2-3b", "gpt-4o-mini", "llama3.1-70b", "llama3.1-405b"]
    a = evaluate(trivia, policy, models=models)
    b = evaluate(scramble(trivia), policy, models=models)
    assert chosen_knobs(a, [policy]) == chosen_knobs(b, [policy])
    ea = next(e for e in a["policies"] if e["name"] == policy)
    eb = next(e for e in b["policies"] if e["name"] == policy)
    assert ea["applicable"] and ea["aiq"] is not None
    assert ea["parity"]["accuracy"] != eb["parity"]["accuracy"]  # the test labels did change


@pytest.mark.parametrize("policy", ["cascade-routing", "automix"])
def test_fit_meets_the_budget_through_simulate(trivia, policy):
    L = prepare(trivia, models=["llama3.2-3b", "gpt-4o-mini", "llama3.1-405b"])
    train, _ = L.train_test()
    tiers = L.tiers(train)
    cost = np.mean([r.responses["llama3.1-405b"].cost_usd for r in train])
    f = fit(policy, train, tiers, Target.budget(cost / 3))  # fit() replays with simulate (confirm)
    assert f.train_cost <= cost / 3 * (1 + 1e-9)
    assert f.train_accuracy > np.mean([r.responses["gpt-4o-mini"].correct for r in train]) - 0.05
    assert f.search["configurations"] > 5


def test_automix_not_applicable_without_p_true_and_both_reported_on_mmlu():
    models = ["llama3.2-3b", "gpt-4o-mini", "qwen2.5-72b-instruct"]
    by = {e["name"]: e for p in ("automix", "cascade-routing") for e in evaluate(MMLU, p, models=models)["policies"]}
    assert by["automix"]["applicable"] is False and "p_true" in by["automix"]["reason"]
    cr_ = by["cascade-routing"]
    assert cr_["applicable"] and cr_["aiq"] is not None and len(cr_["frontier"]) >= 10
    assert by["threshold-2tier"]["applicable"]
    L = prepare(MMLU, models=["llama3.2-3b", "qwen2.5-72b-instruct"])
    train, _ = L.train_test()
    with pytest.raises(NotApplicable, match="p_true"):
        fit("automix", train, L.tiers(train), Target.match_best())


def test_tune_renames_tiers_in_the_fitted_params(tmp_path):
    out = tmp_path / "p.json"
    for policy, key in (("automix", "steps"), ("cascade-routing", "estimates")):
        r = CliRunner().invoke(tune, ["--data", str(TRIVIA), "--policy", policy, "--match-best", "--out", str(out),
                                      "--models", "gpt-4o-mini,llama3.1-405b",
                                      "--tier-names", "gpt-4o-mini=small,llama3.1-405b=big"])
        assert r.exit_code == 0, r.output
        doc = json.loads(out.read_text())
        assert doc["name"] == policy and doc["params"]["chain"] == ["small", "big"]
        assert set(doc["params"][key]) <= {"small", "big"} and "small" in doc["params"][key]
        pol = make_policy(policy, [TierInfo("small", 0), TierInfo("big", 1)], doc["params"])
        assert pol.params() == doc["params"]
        assert math.isfinite(doc["fitted"]["train_accuracy"])
