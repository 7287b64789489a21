"""Tuning: the vectorised search agrees with router.simulate, targets are met on
train, the test split is never read, and a tuned file runs through a portfolio."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.env import BENCH
from helpers.labelled import chosen_knobs, scramble

from router.core.attempt import Attempt, Query
from router.core.policies import POLICIES, make_policy
from router.core.policy import Decision, Knob, Plan, Policy, tier_infos
from router.core.portfolio import load_portfolio
from router.core.records import Dataset, Record, Response, load_dataset
from router.lab.evaluate import evaluate
from router.lab.labelled import build_table, prepare
from router.lab.metrics import summarize
from router.lab.simulate import TierModel, simulate, tiers_of
from router.lab.tuners import TUNERS, fit, make_tuner
from router.lab.tuners.threshold import ThresholdTuner, chain_grid, fast_threshold
from router.lab.tuning import NotApplicable, Target, TargetUnreachable, TuningError

DATA = BENCH
MMLU = DATA / "rc-mmlu.jsonl.gz"
TRIVIA = DATA / "rc-triviaqa.jsonl.gz"
GSM8K = DATA / "rc-gsm8k.jsonl.gz"


@pytest.fixture(scope="module")
def mmlu() -> Dataset:
    return load_dataset(MMLU)


def _tiers(ds: Dataset) -> list[TierModel]:
    return [TierModel(m, m) for m in ds.models]


# -- the fast path and simulate agree ---------------------------------------------
def test_fast_path_equals_simulate_on_random_configurations(mmlu):
    tiers = _tiers(mmlu)
    infos = tier_infos(tiers)
    test = mmlu.split("test")
    table = build_table(test, tiers)
    rng = random.Random(7)
    for _ in range(12):
        k = rng.choice([1, 2, 3, 4])
        chain = sorted(rng.sample(range(len(tiers)), k), key=lambda i: table.mean_cost()[i])
        ths = [float(np.quantile(table.conf["logprob"][i], rng.random())) for i in chain[:-1]]
        params = {"signal": "logprob", "chain": [tiers[i].name for i in chain],
                  "thresholds": {tiers[i].name: t for i, t in zip(chain, ths)}}
        s = summarize(simulate(make_policy("threshold", infos, params), tiers, test), tiers)
        acc, cost = fast_threshold(table, chain, ths, "logprob")
        assert acc == pytest.approx(s["accuracy"], abs=1e-12)
        assert cost == pytest.approx(s["cost"], rel=1e-12)


def test_every_grid_entry_equals_simulate():
    ds = load_dataset(TRIVIA)
    tiers = _tiers(ds)
    train = ds.split("train")
    table = build_table(train, tiers)
    tuner = ThresholdTuner(table, tier_infos(tiers), min_tiers=2, max_tiers=4)
    assert tuner.search["signal"] == "p_true" and tuner.search["chains"] > 10
    rng = np.random.default_rng(3)
    for flat in rng.choice(tuner._acc.size, 15, replace=False):
        params = tuner.params_of(int(flat))
        s = summarize(simulate(make_policy("threshold", tier_infos(tiers), params), tiers, train), tiers)
        assert tuner._acc[flat] == pytest.approx(s["accuracy"], abs=1e-12)
        assert tuner._cost[flat] == pytest.approx(s["cost"], rel=1e-12)


def _rec(i: int, confs: Sequence[float | None], right: Sequence[bool], split: str = "train") -> Record:
    resp = {
        f"m{j}": Response("a", float(r), float(j + 1), None, None, None, c, None)
        for j, (c, r) in enumerate(zip(confs, right))
    }
    return Record(f"r{i}", f"q{i}", split, None, None, resp, i + 1)


def test_fast_path_with_nan_inf_and_missing_confidences():
    nan, inf = float("nan"), float("inf")
    recs = [
        _rec(0, [nan, -0.1, None], [1, 1, 0]),
        _rec(1, [inf, -0.5, -0.1], [0, 0, 1]),
        _rec(2, [-inf, None, -0.1], [1, 0, 1]),
        _rec(3, [-0.2, -0.3, -0.1], [1, 1, 1]),
        _rec(4, [None, nan, -0.1], [0, 1, 0]),
    ]
    tiers = [TierModel(f"m{j}", f"m{j}") for j in range(3)]
    infos = tier_infos(tiers)
    table = build_table(recs, tiers)
    assert np.isnan(table.conf["logprob"][0]).sum() == 4  # NaN, +inf, -inf, null are all absent
    for ths in ([-0.25, -0.4], [-1.0, -1.0], [0.0, 0.0]):
        params = {"signal": "logprob", "chain": ["m0", "m1", "m2"], "thresholds": {"m0": ths[0], "m1": ths[1]}}
        s = summarize(simulate(make_policy("threshold", infos, params), tiers, recs), tiers)
        assert fast_threshold(table, [0, 1, 2], ths, "logprob") == pytest.approx((s["accuracy"], s["cost"]))


def test_chain_grid_shape_and_order():
    conf = [np.array([0.1, 0.9]), np.array([0.5, 0.2]), np.array([np.nan, np.nan])]
    correct = [np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([1.0, 1.0])]
    cost = [np.ones(2), 2 * np.ones(2), 4 * np.ones(2)]
    acc, tot = chain_grid(conf, correct, cost, [np.array([0.1, 0.5]), np.array([0.2, 0.6])])
    assert acc.shape == (4,)
    # (0.1, *): tier 0 accepts both -> acc .5, cost 1
    assert acc[0] == acc[1] == 0.5 and tot[0] == tot[1] == 1.0
    # (0.5, 0.2): row 0 -> tier 1 accepts (right); row 1 accepted at tier 0 (right)
    assert acc[2] == 1.0 and tot[2] == pytest.approx((1 + 3) / 2)
    # (0.5, 0.6): row 0 -> tier 1 rejects -> tier 2 (right)
    assert acc[3] == 1.0 and tot[3] == pytest.approx((1 + 7) / 2)


# -- targets ----------------------------------------------------------------------
def test_targets_are_met_on_train(mmlu):
    tiers = _tiers(mmlu)
    train = mmlu.split("train")
    f = fit("threshold", train, tiers, Target.budget(5e-5))
    assert f.train_cost <= 5e-5 and f.train_rows == 285
    f2 = fit("threshold", train, tiers, Target.budget(1e-4))
    assert f2.train_accuracy >= f.train_accuracy
    f3 = fit("threshold", train, tiers, Target.accuracy(0.80))
    assert f3.train_accuracy >= 0.80
    best = fit("threshold", train, tiers, Target.match_best())
    assert best.target_accuracy == pytest.approx(0.8771929824561403)  # qwen2.5-72b-instruct on train
    assert best.train_accuracy >= best.target_accuracy
    s = fit("single", train, tiers, Target.match_best())
    assert s.params == {"tier": "qwen2.5-72b-instruct"}
    r = fit("random", train, tiers, Target.budget(1e-4))
    assert set(r.params) == {"weights", "seed"} and abs(sum(r.params["weights"].values()) - 1) < 1e-9


def test_unreachable_targets_are_clear_errors(mmlu):
    tiers = _tiers(mmlu)
    train = mmlu.split("train")
    with pytest.raises(TargetUnreachable, match=r"target accuracy 0.9900 is not reachable.*highest it reaches is 0\.8"):
        fit("threshold", train, tiers, Target.accuracy(0.99))
    with pytest.raises(TargetUnreachable, match="not reachable"):
        fit("random", train, tiers, Target.accuracy(0.99))
    with pytest.raises(TargetUnreachable, match="below"):
        fit("single", train, tiers, Target.budget(1e-6))


@pytest.mark.parametrize("policy", sorted(TUNERS))
def test_an_unknown_tuning_option_is_named_before_any_fitting(mmlu, policy):
    with pytest.raises(TuningError, match=rf"policy '{policy}': unknown tuning option\(s\) \['nonsense'\]"):
        fit(policy, mmlu.split("train"), _tiers(mmlu), Target.match_best(), nonsense=1)


def test_threshold_not_applicable_without_confidences():
    ds = load_dataset(DATA / "routerbench-arc.jsonl.gz")
    L = prepare(ds)
    train, _ = L.train_test()
    with pytest.raises(NotApplicable, match="no confidence"):
        fit("threshold", train, L.tiers(train), Target.match_best())


# -- tuning never reads the test split ------------------------------------------------




def test_scrambled_test_labels_do_not_change_the_knobs(mmlu):
    test_ids = {r.id for r in mmlu.records if r.split == "test"}
    a = evaluate(mmlu, "threshold")
    b = evaluate(scramble(mmlu, test_ids), "threshold")
    assert chosen_knobs(a) == chosen_knobs(b)
    assert a["best_single_train"] == b["best_single_train"]
    # ...while the test scores do change, so the scramble took effect
    assert a["best_single"] != b["best_single"]


def test_crossfit_fold_knobs_ignore_the_held_out_fold():
    ds = load_dataset(GSM8K)
    L = prepare(ds)
    held_out = {r.id for r in L.folds(5, 0)[0][1]}
    a = evaluate(ds, "threshold", points=20)
    b = evaluate(scramble(ds, held_out), "threshold", points=20)
    assert a["split"]["mode"] == "5-fold cross-fitting"
    assert chosen_knobs(a, fold=0) == chosen_knobs(b, fold=0)
    assert chosen_knobs(a, fold=1) != chosen_knobs(b, fold=1)  # fold 1 tunes on those rows, so it may (and here does) move


# -- random routing -------------------------------------------------------------------
def test_random_routing_is_deterministic_and_weighted():
    infos = tier_infos([TierModel("a", "a"), TierModel("b", "b")])
    p = make_policy("random", infos, {"weights": {"a": 3, "b": 1}, "seed": 5})
    q = make_policy("random", infos, {"weights": {"a": 3, "b": 1}, "seed": 5})
    routes = [p.route(str(i)) for i in range(4000)]
    assert routes == [q.route(str(i)) for i in range(4000)]
    assert 0.22 < sum(routes) / 4000 < 0.28
    other = make_policy("random", infos, {"weights": {"a": 3, "b": 1}, "seed": 6})
    assert routes != [other.route(str(i)) for i in range(4000)]
    assert p.params() == {"weights": {"a": 0.75, "b": 0.25}, "seed": 5}


# -- a tuned file runs through a portfolio --------------------------------------------
def _portfolio(tmp: Path, tiers: dict[str, str], policy_file: str) -> Path:
    lines = []
    for name, model in tiers.items():
        lines += ["[[tiers]]", f'name = "{name}"',
                  f'backend = {{ kind = "replay", file = "{TRIVIA}", model = "{model}" }}', ""]
    lines += ["[policy]", f'file = "{policy_file}"']
    p = tmp / "portfolio.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("rename", [False, True])
def test_tuned_file_loads_through_the_portfolio(tmp_path, rename):
    from worker.cli.tune_cmd import tune

    ds = load_dataset(TRIVIA)
    names = {"gpt-4o-mini": "small", "llama3.1-70b": "medium", "llama3.1-405b": "large", "llama3.2-3b": "tiny"}
    args = ["--data", str(TRIVIA), "--policy", "threshold", "--match-best", "--out", str(tmp_path / "tuned.json")]
    if rename:
        args += ["--tier-names", ",".join(f"{m}={t}" for m, t in names.items())]
    r = CliRunner().invoke(tune, args)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "tuned.json").read_text())
    assert doc["name"] == "threshold" and doc["fitted"]["split"] == "train" and doc["fitted"]["train_rows"] == 300
    chain = doc["params"]["chain"]
    by_tier = doc["fitted"]["tiers"]
    pf = _portfolio(tmp_path, {t: by_tier[t] for t in chain}, "tuned.json")
    portfolio = load_portfolio(pf)
    assert portfolio.policy.name == "threshold" and portfolio.tier_names == chain
    if rename:
        assert set(chain) <= set(names.values())
    policy = portfolio.built_policy
    tiers = tiers_of(portfolio)
    s = summarize(simulate(policy, tiers, ds.split("train")), tiers)
    assert s["accuracy"] == pytest.approx(doc["fitted"]["train_accuracy"])
    assert s["cost"] == pytest.approx(doc["fitted"]["train_cost"])


# -- a policy without a dedicated tuner: generic grid over its bounded knobs -------------
class _Share(Policy):
    name = "share-test"
    knobs = (Knob("share", "float", "share of queries sent to the last tier", low=0.0, high=1.0),)

    def __init__(self, tiers, share: float = 0.0):
        super().__init__(tiers)
        self.share = float(share)

    def plan(self, query: Query) -> Plan:
        from router.core.policies.random_route import draw

        return Plan(first=self.last if draw(0, query.id) < self.share else 0)

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        return Decision("accept", "ok")

    def params(self) -> dict[str, Any]:
        return {"share": self.share}


def test_generic_grid_tuner(monkeypatch, mmlu):
    monkeypatch.setitem(POLICIES, _Share.name, _Share)
    tiers = [TierModel("llama3.2-3b", "llama3.2-3b"), TierModel("qwen2.5-72b-instruct", "qwen2.5-72b-instruct")]
    train = mmlu.split("train")
    f = fit("share-test", train, tiers, Target.budget(1e-4))
    assert f.train_cost <= 1e-4 and 0.0 < f.params["share"] < 1.0
    table = build_table(train, tiers)
    assert make_tuner("share-test", table, tier_infos(tiers)).select(Target.budget(1.0)).params == {"share": 1.0}
