"""Metrics on small hand-made files whose answers are worked out by hand below."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from router.lab import metrics
from router.lab.evaluate import budgets, evaluate

# --------------------------------------------------------------------------
# A three-model file, costs 1 / 3 / 12 USD, latencies 10 / 20 / 100 ms, logprob.
#
# train (10 rows)             test (10 rows)
#   cheap right on 0-4 (-0.1)   cheap right on 0-3 (-0.1), wrong on 4 but conf -0.1, wrong 5-9 (-3)
#         wrong on 5-9 (-3)     mid   right on 0-5 (-0.2), wrong 6-9 (-2.5)
#   mid   right on 0-6 (-0.2)   big   right on 0-7, wrong 8-9
#         wrong on 7-9 (-2.5)
#   big   right on 0-8, wrong 9
#
# Train accuracies .5 / .7 / .9: the best single model on train is big (0.9).
# Cheapest configuration reaching 0.9 on train:
#   cheap -> big   (accept cheap at -0.1):              cost 1 + .5*12        = 7.0
#   mid -> big     (accept mid at -0.2):                cost 3 + .3*12        = 6.6  <- best 2-tier
#   cheap -> mid -> big (-0.1, -0.2):                   cost 1 + .5*3 + .3*12 = 6.1  <- best overall
# On test the 3-tier one accepts cheap on 0-4 (4 right), mid on 5 (right), big on 6-9 (6, 7 right):
#   accuracy .7, cost 1 + .5*3 + .4*12 = 7.3, latency (5*10 + 1*30 + 4*130)/10 = 60 ms,
#   calls cheap 10, mid 5, big 4; vs best single on test (big, .8 at 12): delta -.1, ratio 7.3/12.
# The 2-tier one accepts mid on 0-5 (all right), big on 6-9 (6, 7 right): accuracy .8, cost 3 + .4*12 = 7.8.
# Oracle on test: rows 0-3 cheap (1), rows 4, 5 mid (3), rows 6, 7 big (12), rows 8, 9 nobody: cheap (1)
#   -> accuracy .8, cost (4 + 6 + 24 + 2)/10 = 3.6.
# --------------------------------------------------------------------------

COST = {"cheap": 1.0, "mid": 3.0, "big": 12.0}
LAT = {"cheap": 10.0, "mid": 20.0, "big": 100.0}


def _resp(model: str, right: bool, conf: float | None, **over) -> dict:
    r = {"text": "x", "correct": 1.0 if right else 0.0, "cost_usd": COST[model], "latency_ms": LAT[model],
         "tokens_in": None, "tokens_out": None, "logprob": conf, "p_true": None}
    r.update(over)
    return r


def hand_rows() -> list[dict]:
    rows = []
    for i in range(10):  # train
        rows.append({"id": f"tr-{i}", "prompt": f"q{i}", "split": "train", "responses": {
            "cheap": _resp("cheap", i <= 4, -0.1 if i <= 4 else -3.0),
            "mid": _resp("mid", i <= 6, -0.2 if i <= 6 else -2.5),
            "big": _resp("big", i <= 8, -0.05)}})
    for i in range(10):  # test
        rows.append({"id": f"te-{i}", "prompt": f"p{i}", "split": "test", "responses": {
            "cheap": _resp("cheap", i <= 3, -0.1 if i <= 4 else -3.0),
            "mid": _resp("mid", i <= 5, -0.2 if i <= 5 else -2.5),
            "big": _resp("big", i <= 7, -0.05)}})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def entry(res: dict, name: str) -> dict:
    return next(e for e in res["policies"] if e["name"] == name)


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> dict:
    p = write(tmp_path_factory.mktemp("data") / "hand.jsonl", hand_rows())
    return evaluate(p, "all", points=20)


def test_singles_best_single_and_oracle(hand):
    assert hand["split"] == {"mode": "train/test", "train": 10, "test": 10}
    assert hand["cost_unit"] == "usd" and hand["signal"] == "logprob"
    s = {x["name"]: x for x in hand["singles"]}
    assert (s["cheap"]["accuracy"], s["mid"]["accuracy"], s["big"]["accuracy"]) == (0.4, 0.6, 0.8)
    assert (s["cheap"]["cost"], s["mid"]["cost"], s["big"]["cost"]) == (1.0, 3.0, 12.0)
    assert s["big"]["latency_ms"] == 100.0 and s["big"]["calls"] == {"big": 10}
    assert hand["best_single"] == {"name": "big", "accuracy": 0.8, "cost": 12.0}
    assert hand["best_single_train"] == [{"name": "big", "accuracy": 0.9}]
    assert hand["oracle"] == {"accuracy": 0.8, "cost": 3.6}


def test_parity_of_the_threshold_cascades(hand):
    t = entry(hand, "threshold")["parity"]
    assert t["params"] == {"signal": "logprob", "chain": ["cheap", "mid", "big"],
                           "thresholds": {"cheap": -0.1, "mid": -0.2}}
    assert t["target_accuracy"] == 0.9 and t["train_accuracy"] == 0.9 and t["train_cost"] == 6.1
    assert t["accuracy"] == 0.7 and t["cost"] == 7.3
    assert t["accuracy_delta"] == pytest.approx(-0.1)
    assert t["cost_ratio"] == pytest.approx(7.3 / 12, rel=1e-5)
    assert t["latency_ms"] == 60.0
    assert t["calls"] == {"cheap": 10, "mid": 5, "big": 4}
    two = entry(hand, "threshold-2tier")
    assert two["baseline"] is True
    assert two["parity"]["params"]["chain"] == ["mid", "big"]
    assert two["parity"]["train_cost"] == pytest.approx(6.6)
    assert (two["parity"]["accuracy"], two["parity"]["cost"]) == (0.8, 7.8)
    assert two["parity"]["accuracy_delta"] == pytest.approx(0.0)
    # >2 tiers only: the same 3-tier chain is the cheapest
    assert entry(hand, "threshold-3plus")["parity"]["params"]["chain"] == ["cheap", "mid", "big"]


def test_single_policy_frontier_and_aiq(hand):
    e = entry(hand, "single")
    assert e["parity"]["params"] == {"tier": "big"}
    assert e["parity"]["accuracy_delta"] == 0.0 and e["parity"]["cost_ratio"] == 1.0
    # budgets 1..12 pick cheap below 3, mid below 12, big at 12: test points (1,.4), (3,.6), (12,.8)
    pts = {(p["cost"], p["accuracy"]) for p in e["frontier"]}
    assert pts == {(1.0, 0.4), (3.0, 0.6), (12.0, 0.8)}
    # normalised x = 0, 2/11, 1: area = 2/11 * .5 + 9/11 * .7 = 7.3/11
    assert e["aiq"] == pytest.approx(7.3 / 11, abs=1e-6)
    assert len(e["frontier"]) == 20


# policies this 10-row file, with logprob and no p_true, cannot run, and why
LIVE = ("automix-threshold", "automix-pomdp", "semantic-entropy", "self-ref")
CANNOT_RUN_HERE = {
    "automix": "p_true",  # reads a self-verification probability
    "lm-cascade": "no token log-probs",  # the format records a completion's mean log-prob only
    **{p: "too few" for p in ("frugalgpt", "routellm", "hybrid-llm", "optllm", "cargo", "cascade-routing",
                              "routed-threshold")},
    # learned: >= 20 rows
}


def test_every_policy_has_its_baselines_beside_it(hand):
    names = [e["name"] for e in hand["policies"]]
    assert {"threshold", "threshold-3plus", "threshold-2tier", "random", "single"} <= set(names)
    for e in hand["policies"]:
        if e["name"] in LIVE:  # need a live recording's extra calls (data/local-bench)
            assert not e["applicable"] and "live signal" in e["reason"]
            continue
        if e["policy"] in CANNOT_RUN_HERE:
            assert not e["applicable"] and CANNOT_RUN_HERE[e["policy"]] in e["reason"]
            continue
        assert e["applicable"]
        # agreement always pays its first two tiers: budgets below that are out of its reach
        assert len(e["frontier"]) >= (1 if e["policy"] == "agreement" else 20)
        if e["policy"] == "agreement" and not e["parity"]["reachable"]:
            assert "not reachable on the train rows" in e["parity"]["reason"]
        elif e["name"] != "random":
            r = e["parity"]["random_at_matched_cost"]
            assert 0.0 <= r["accuracy"] <= 1.0 and r["cost"] > 0


# -- pure metric functions ------------------------------------------------------
def test_hull_is_non_decreasing_and_concave():
    pts = [(0, 0.5), (0.2, 0.4), (0.5, 0.8), (0.6, 0.7), (1.0, 0.85), (0.5, 0.6)]
    assert metrics.hull(pts) == [(0.0, 0.5), (0.5, 0.8), (1.0, 0.85)]
    # a point under the chord is dropped
    assert metrics.hull([(0, 0), (0.5, 0.4), (1, 1)]) == [(0.0, 0.0), (1.0, 1.0)]


def test_aiq_known_values():
    assert metrics.aiq([(1.0, 0.5), (3.0, 0.9)], 1.0, 3.0) == pytest.approx(0.7)
    # flat on both sides of the frontier's vertices
    assert metrics.aiq([(2.0, 0.6)], 1.0, 3.0) == pytest.approx(0.6)
    # a point dearer than the dearest model still shapes the curve: normalised (0,.5)-(2,.9), mean over [0,1] = .6
    assert metrics.aiq([(1.0, 0.5), (5.0, 0.9)], 1.0, 3.0) == pytest.approx(0.5 + 0.4 * 0.25)
    with pytest.raises(ValueError):
        metrics.aiq([(1.0, 0.5)], 2.0, 2.0)


def test_routellm_metrics_known_values():
    # random routing: the straight line from weak to strong
    m = metrics.routellm([(0.0, 0.6), (1.0, 0.8)], 0.6, 0.8)
    assert m["apgr"] == pytest.approx(0.5)
    assert m["cpt50"] == pytest.approx(0.5) and m["cpt80"] == pytest.approx(0.8)
    # a router reaching the strong model's accuracy at 40% strong calls
    m = metrics.routellm([(0.0, 0.6), (0.4, 0.8), (1.0, 0.8)], 0.6, 0.8)
    assert m["apgr"] == pytest.approx(0.4 * 0.5 + 0.6 * 1.0)
    assert m["cpt50"] == pytest.approx(0.2) and m["cpt80"] == pytest.approx(0.32)
    # never reaching 80% of the gap
    m = metrics.routellm([(0.0, 0.6), (1.0, 0.7)], 0.6, 0.8)
    assert m["cpt50"] == pytest.approx(1.0) and m["cpt80"] is None
    assert metrics.routellm([(0, 0.5)], 0.7, 0.7)["apgr"] is None


def test_oracle_cheapest_of_the_best():
    correct = np.array([[1, 0, 0.5], [1, 1, 0.5], [0, 1, 1.0]])
    cost = np.array([[1, 1, 1], [2, 2, 2], [9, 0.5, 9]])
    o = metrics.oracle(correct, cost)
    assert o["accuracy"] == pytest.approx((1 + 1 + 1) / 3)
    assert o["cost"] == pytest.approx((1 + 0.5 + 9) / 3)


def test_budgets_span_cheapest_to_dearest():
    b = budgets(1e-5, 1e-3, 24)
    assert len(b) == 24 and b[0] == 1e-5 and b[-1] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(b, b[1:]))
    assert budgets(0.0, 1.0, 21) == pytest.approx(list(np.linspace(0, 1, 21)))


# -- files without costs (RouteLLM style), single split: cross-fitting ----------
def test_no_costs_single_split_crossfit(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(200):
        weak, strong = rng.random() < 0.6, rng.random() < 0.8
        rows.append({"id": str(i), "prompt": f"q{i}", "split": "test", "responses": {
            "weak": {"correct": float(weak)}, "strong": {"correct": float(strong)}}})
    p = write(tmp_path / "nocost.jsonl.gz", rows)
    res = evaluate(p, "single", points=20)
    assert res["split"]["mode"] == "5-fold cross-fitting" and res["split"]["rows"] == 200
    assert "not both 'train' and 'test'" in res["split"]["note"]
    assert res["cost_unit"] == "strong_calls"
    assert res["routellm"]["strong"] == "strong" and res["routellm"]["weak"] == "weak"
    s = {x["name"]: x for x in res["singles"]}
    assert s["weak"]["cost"] == 0.0 and s["strong"]["cost"] == 1.0
    assert s["weak"]["rows"] == 200  # every row scored exactly once
    e = entry(res, "single")
    # single models only: the line from weak to strong
    assert e["apgr"] == pytest.approx(0.5) and e["cpt50"] == pytest.approx(0.5) and e["cpt80"] == pytest.approx(0.8)
    for name in ("threshold-2tier",):
        t = entry(res, name)
        assert t["applicable"] is False and "no confidence" in t["reason"]
        assert t["parity"] is None and t["aiq"] is None and t["apgr"] is None
    r = entry(res, "random")
    assert 0.3 < r["apgr"] < 0.7 and math.isfinite(r["aiq"])
