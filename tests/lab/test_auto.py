"""`--policy auto` (router/lab/tuners/auto.py): chosen from the train rows alone, its policy file
loads in router.core unchanged; both references in `cascade evaluate`'s JSON; and the
prequential replay of `cascade evaluate --online` (router/lab/online.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.labelled import scramble

from router.core.policies import POLICIES, make_policy
from router.core.policy import tier_infos
from router.core.policyfile import read_policy_file
from router.core.portfolio import load_portfolio
from router.core.records import Dataset, load_dataset
from router.lab.evaluate import evaluate
from router.lab.labelled import build_table, prepare
from router.lab.metrics import summarize
from router.lab.online import prequential
from router.lab.simulate import simulate, tiers_of
from router.lab.tuners import auto, make_tuner
from router.lab.tuning import Target

# candidates that fit in milliseconds, so the nested cross-validation stays quick here
FAST = ("single", "threshold-2tier", "threshold", "agreement")


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(auto, "CANDIDATES", tuple(c for c in auto.CANDIDATES if c.name in FAST))


def rows(n_train: int = 150, n_test: int = 150, seed: int = 0) -> list[dict]:
    """s (cheap) is right 70% of the time and its logprob says when; l (dear) 90%; m between.
    Answers are letters, the right one "A", so agreement can read them too."""
    rng = random.Random(seed)
    spec = {"s": (0.7, 1.0), "m": (0.8, 3.0), "l": (0.9, 12.0)}
    out = []
    for i in range(n_train + n_test):
        resp = {}
        for m, (p, cost) in spec.items():
            right = rng.random() < p
            resp[m] = {"text": "A" if right else rng.choice("BCD"), "correct": float(right), "cost_usd": cost,
                       "latency_ms": 10.0, "logprob": -rng.random() * (0.2 if right else 2.0)}
        out.append({"id": f"q{i}", "prompt": f"question {i}", "split": "train" if i < n_train else "test",
                    "responses": resp})
    return out


def write(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


@pytest.fixture
def small(tmp_path) -> Path:
    return write(tmp_path / "small.jsonl", rows())


def _auto_entry(res: dict) -> dict:
    return next(e for e in res["policies"] if e["name"] == "auto")


def _choice(res: dict) -> dict:
    e = _auto_entry(res)
    a = e["auto"][0]
    untimed = [{k: v for k, v in c.items() if k != "fit_seconds"} for c in a["candidates"]]
    return {"family": e["parity"]["policy_chosen"], "params": e["parity"]["params"], "chosen": a["chosen"],
            "point": a["operating_point"], "candidates": untimed, "estimate": a["estimate"],
            "frontier": [p["params"] for p in e["frontier"]]}


# -- chosen from train only ------------------------------------------------------------
def test_altering_or_permuting_test_rows_cannot_change_autos_choice(fast, small, tmp_path):
    ds = load_dataset(small)
    a = evaluate(ds, "auto")
    b = evaluate(scramble(ds), "auto")  # every test label and confidence redrawn
    train = [r for r in ds.records if r.split == "train"]
    test = [r for r in ds.records if r.split == "test"]
    random.Random(3).shuffle(test)
    c = evaluate(Dataset(ds.path, train + test, list(ds.models), ds.models_meta), "auto")  # test rows reordered
    assert _choice(a) == _choice(b) == _choice(c)
    assert a["best_single"] != b["best_single"] or a["singles"] != b["singles"]  # the scramble took effect
    info = _auto_entry(a)["auto"][0]
    assert info["cross_validation"]["rows"] == 150 and info["cross_validation"]["fits_per_candidate"] == 10
    assert {c["name"] for c in info["candidates"]} == set(FAST)
    assert info["why"] and info["seconds"]["cross_validation"] >= 0


def test_the_test_rows_never_reach_the_tuner(fast, small):
    L = prepare(small)
    train, test = L.train_test()
    tiers = L.tiers(train)
    got = make_tuner("auto", build_table(train, tiers), tier_infos(tiers), signal="logprob").select(Target.match_best())
    res = evaluate(small, "auto")
    assert got.policy == _auto_entry(res)["parity"]["policy_chosen"] and got.params == _auto_entry(res)["parity"]["params"]


def test_where_nothing_saves_auto_deploys_the_reference(fast, tmp_path):
    """The cheap models' confidences say nothing and they are much worse: the reference alone."""
    rng = random.Random(1)
    data = []
    for i in range(200):
        resp = {m: {"text": "A", "correct": float(rng.random() < p), "cost_usd": c, "logprob": -rng.random()}
                for m, (p, c) in {"s": (0.5, 1.0), "l": (0.95, 10.0)}.items()}
        data.append({"id": f"q{i}", "prompt": "q", "split": "train", "responses": resp})
    L = prepare(write(tmp_path / "flat.jsonl", data))
    tiers = L.tiers(L.records)
    f = make_tuner("auto", build_table(L.records, tiers), tier_infos(tiers), signal="logprob").select(Target.match_best())
    assert (f.policy, f.params) == ("single", {"tier": "l"})
    assert "reference" in f.search["auto"]["why"]


def test_few_rows_are_said_and_too_few_give_a_single_model(fast, tmp_path):
    L = prepare(write(tmp_path / "tiny.jsonl", rows(30, 0)))
    tiers = L.tiers(L.records)
    f = make_tuner("auto", build_table(L.records, tiers), tier_infos(tiers)).select(Target.match_best())
    assert f.policy == "single" and "too few" in f.search["auto"]["why"]
    L = prepare(write(tmp_path / "few.jsonl", rows(150, 0)))
    f = make_tuner("auto", build_table(L.records, tiers), tier_infos(tiers), signal="logprob").select(Target.match_best())
    assert "simpler families are preferred" in f.search["auto"]["few_rows"]


# -- the policy file: the winner family, loaded by router.core unchanged -----------------------
def test_tune_auto_writes_a_policy_file_the_runtime_loads(fast, small, tmp_path):
    from worker.cli.tune_cmd import tune

    out = tmp_path / "auto.json"
    r = CliRunner().invoke(tune, ["--data", str(small), "--policy", "auto", "--match-best", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "auto:" in r.output and "nested cross-validation" in r.output
    tuned = read_policy_file(out)
    assert tuned.name in POLICIES and tuned.name != "auto"  # the winning family, as any tuned policy
    info = tuned.fitted["search"]["auto"]
    assert info["family"] == tuned.name and info["why"]
    scored = [c for c in info["candidates"] if "cv_cost" in c]
    assert scored and all({"cv_accuracy", "cv_cost", "cv_cost_ratio", "status"} <= set(c) for c in scored)
    # a portfolio over replay backends loads it and replays the train figures
    models = ["s", "m", "l"]
    lines = []
    for m in models:
        lines += ["[[tiers]]", f'name = "{m}"', f'backend = {{ kind = "replay", file = "{small}", model = "{m}" }}', ""]
    lines += ["[policy]", f'file = "{out.name}"']
    (tmp_path / "portfolio.toml").write_text("\n".join(lines) + "\n")
    portfolio = load_portfolio(tmp_path / "portfolio.toml")
    assert portfolio.policy.name == tuned.name
    tiers = tiers_of(portfolio)
    train = [r for r in load_dataset(small).records if r.split == "train"]
    s = summarize(simulate(portfolio.built_policy, tiers, train), tiers)
    assert s["accuracy"] == pytest.approx(tuned.fitted["train_accuracy"])
    assert s["cost"] == pytest.approx(tuned.fitted["train_cost"])
    make_policy(tuned.name, tier_infos(tiers), tuned.params)  # and the core builds it from the params alone


def test_auto_meets_a_budget_and_an_accuracy_target(fast, small):
    L = prepare(small)
    train, _ = L.train_test()
    tiers = L.tiers(train)
    t = make_tuner("auto", build_table(train, tiers), tier_infos(tiers), signal="logprob")
    f = t.select(Target.budget(4.0))
    assert f.train_cost <= 4.0 + 1e-9
    g = t.select(Target.accuracy(0.85))
    assert g.search["auto"]["cv"]["accuracy"] >= 0.85 - 1e-9  # met on the held-out folds, not in-sample
    assert g.search["auto"]["target"]["kind"] == "accuracy"


# -- both references in evaluate's JSON -----------------------------------------------------
def test_evaluate_json_has_both_references(small):
    res = evaluate(small, "threshold")
    refs = res["references"]
    assert {"deployable", "hindsight", "tolerance"} <= set(refs)
    assert refs["hindsight"]["name"] == res["best_single"]["name"]
    assert refs["deployable"]["name"] == res["best_single_train"][0]["name"]
    singles = {s["name"]: s for s in res["singles"]}
    assert refs["deployable"]["accuracy"] == singles[refs["deployable"]["name"]]["accuracy"]
    for e in res["policies"]:
        if e["applicable"] and e["parity"]["reachable"]:
            p = e["parity"]
            for key, ref in (("vs_deployable", refs["deployable"]), ("vs_hindsight", refs["hindsight"])):
                assert p[key]["accuracy_delta"] == pytest.approx(p["accuracy"] - ref["accuracy"], abs=2e-6)
                assert p[key]["cost_ratio"] == pytest.approx(p["cost"] / ref["cost"], rel=1e-4)
                assert p[key]["at_parity"] == (p[key]["accuracy_delta"] >= -refs["tolerance"] - 1e-9)
    assert set(res["at_parity"]) == {"deployable", "hindsight"}


# -- evaluate --online ------------------------------------------------------------------------
def test_online_replay_shape(small):
    res = prequential(small, "threshold", every=50, start=20, seed=4)
    assert res["stream_rows"] == 280
    assert [p["rows"] for p in res["points"]] == [50, 100, 150, 200, 250, 280]
    assert [b["labelled_before"] for b in res["blocks"]] == [20, 70, 120, 170, 220, 270]
    assert res["blocks"][0]["policy"] == "single"  # 20 labels < min_rows: the reference alone
    assert all(b["policy"] == "threshold" for b in res["blocks"][1:])
    first = res["points"][0]
    assert first["accuracy"] == first["reference_accuracy"] and first["cost_ratio"] == 1.0
    # the same seed gives the same stream; another seed another order
    assert prequential(small, "threshold", every=50, start=20, seed=4)["points"] == res["points"]
    assert prequential(small, "threshold", every=50, start=20, seed=5)["points"] != res["points"]


def test_online_starts_on_the_dearest_model_without_labels(small):
    res = prequential(small, "threshold", every=100)
    assert res["blocks"][0]["reference"] == "l" and res["blocks"][0]["labelled_before"] == 0
    assert "no labels" in res["blocks"][0]["why"]


def test_online_cli_table_and_plot(fast, small, tmp_path):
    pytest.importorskip("matplotlib")
    from worker.cli.evaluate_cmd import evaluate as evaluate_cmd

    r = CliRunner().invoke(evaluate_cmd, ["--data", str(small), "--online", "--policy", "auto", "--retune-every",
                                          "100", "--report", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["mode"] == "online" and len(res["points"]) == 3
    assert "cum acc" in r.output
    assert (tmp_path / "rep" / "small-online.png").stat().st_size > 1000


def test_auto_with_a_risk_bound_keeps_its_guarantee(fast, small):
    from router.lab.tuners import RiskSpec

    L = prepare(small)
    train, _ = L.train_test()
    tiers = L.tiers(train)
    f = make_tuner("auto", build_table(train, tiers), tier_infos(tiers), signal="logprob",
                   risk=RiskSpec(0.1, 0.1)).select(Target.match_best())
    a = f.search["auto"]
    assert a["target"]["delta_per_family"] == pytest.approx(0.1 / len([c for c in a["candidates"]]))
    assert "union bound" in f.note and f.policy in POLICIES


def test_auto_reaches_parity_with_a_named_reference(fast, small, tmp_path):
    from worker.cli.tune_cmd import tune

    out = tmp_path / "m.json"
    r = CliRunner().invoke(tune, ["--data", str(small), "--policy", "auto", "--match-best", "--reference", "m",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    tuned = read_policy_file(out)
    info = tuned.fitted["search"]["auto"]
    # against m (0.8 accurate, cost 3), not l (0.9, cost 12): the reference's cost is m's
    assert info["cv"]["reference_cost"] == pytest.approx(3.0)
    assert tuned.fitted["target"]["resolved_accuracy"] < 0.88


# -- the lower confidence bound -----------------------------------------------------------
def _scored(delta_rows: int, n: int, cost: float) -> "auto._Scored":
    """n held-out rows where the reference is right on all and the candidate misses `delta_rows` of them."""
    import numpy as np

    correct = np.ones(n)
    correct[:delta_rows] = 0.0
    return auto._Scored(correct, np.full(n, cost), np.ones(n), np.full(n, 10.0))


def _bare(tmp_path, **kw) -> "auto.AutoTuner":
    """An AutoTuner with too few rows to fit anything: only its choosing rule is exercised."""
    L = prepare(write(tmp_path / "tiny.jsonl", rows(30, 0)))
    tiers = L.tiers(L.records)
    return auto.AutoTuner(build_table(L.records, tiers), tier_infos(tiers), **kw)


def test_a_lucky_cheap_point_on_few_rows_needs_its_lower_bound_to_meet_the_tolerance(tmp_path):
    """0.4 point under the reference on 250 rows (one miss) is inside the half-point tolerance
    by its mean but not by its lower bound; the same 0.4 point on 25,000 rows is."""
    cheap = next(c for c in auto.CANDIDATES if c.name == "rational")
    dear = next(c for c in auto.CANDIDATES if c.name == "single")
    few = [(cheap, 0, _scored(1, 250, 2.0)), (dear, 2, _scored(0, 250, 10.0))]
    many = [(cheap, 0, _scored(100, 25000, 2.0)), (dear, 2, _scored(0, 25000, 10.0))]
    t = Target.match_best()
    plain, bound = _bare(tmp_path, confidence=0.0), _bare(tmp_path)  # the default bounds
    assert bound.z > 0
    assert plain._choose(few, t)[0][0] is cheap
    got, why = bound._choose(few, t)
    assert got[0] is dear and "standard error" in why
    assert bound._choose(many, t)[0][0] is cheap
    # an accuracy target the same way: 0.996 on 250 rows is not surely >= 0.995, on 25,000 it is
    a = Target.accuracy(0.995)
    assert bound._choose(few, a)[0][0] is dear and plain._choose(few, a)[0][0] is cheap
    assert bound._choose(many, a)[0][0] is cheap


def test_the_confidence_is_recorded_and_checked(fast, small, tmp_path):
    L = prepare(small)
    train, _ = L.train_test()
    tiers = L.tiers(train)
    table = build_table(train, tiers)
    f = make_tuner("auto", table, tier_infos(tiers), signal="logprob", confidence=1.0).select(Target.match_best())
    assert f.search["auto"]["target"]["confidence"] == 1.0
    with pytest.raises(Exception, match="confidence"):
        make_tuner("auto", table, tier_infos(tiers), confidence=-1)
