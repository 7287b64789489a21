"""Fitting the post-hoc scorers, calibrations and deferral rules: bad input named
with its count, planted parameters recovered, and tuners whose train figures
`router.lab.simulate` reproduces (fit() confirms every one)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.env import BENCH

from router.core import embeddings
from router.core.attempt import Attempt, Query
from router.core.policies import make_policy
from router.core.policies.lm_cascade import DEFERRAL_FEATURES
from router.core.policy import tier_infos
from router.core.portfolio import Price
from router.core.records import Record, Response
from router.core.scorers import FORM_FEATURES, AnswerScorer
from router.lab.labelled import build_table, prepare
from router.lab.scoring import MIN_ROWS, ScorerError, fit_logistic_scorer, fit_platt, oof_scores
from router.lab.simulate import TierModel, simulate
from router.lab.tuners import fit, make_tuner
from router.lab.tuning import NotApplicable, Target

TIERS = [TierModel("cheap", "m-cheap", Price(per_call=1.0)), TierModel("mid", "m-mid", Price(per_call=2.0)),
         TierModel("strong", "m-strong", Price(per_call=10.0))]
Q = Query("q", "?")


def _att(t: int, cells: dict[str, float]) -> Attempt:
    return Attempt(TIERS[t].name, t, TIERS[t].model, "x", cells)


ACC = {"m-cheap": 0.75, "m-mid": 0.8, "m-strong": 0.9}


def mc_records(n: int, seed: int = 0) -> list[Record]:
    """Multiple-choice rows: each model right with its accuracy, a wrong answer is a
    random other letter (so two wrong cheap models rarely agree)."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        gold = "ABCDEFGH"[rng.integers(8)]
        resp = {}
        for m, acc in ACC.items():
            right = rng.random() < acc
            letter = gold if right else rng.choice([x for x in "ABCDEFGH" if x != gold])
            text = letter if rng.random() < 0.8 else f"The answer is {letter}."
            resp[m] = Response(text, float(right), None, None, 10, 1, None, None)
        out.append(Record(f"q{j}", f"question {j}?", "train", None, gold, resp, j + 1))
    return out


def test_a_scorer_on_one_class_or_too_few_rows_is_refused_with_the_count():
    X = np.ones((30, 2))
    with pytest.raises(ScorerError, match=r"30 of 30 rows are right and 0 wrong.*all right"):
        fit_logistic_scorer(X, np.ones(30), what="scorer of tier 'a'")
    with pytest.raises(ScorerError, match=rf"scorer of tier 'a': 12 labelled rows are too few .*at least {MIN_ROWS}"):
        fit_logistic_scorer(X[:12], np.array([0, 1] * 6), what="scorer of tier 'a'")
    with pytest.raises(ScorerError, match="1 of 30 rows are right and 29 wrong"):
        fit_platt(np.arange(30.0), np.eye(30)[0])


def test_logistic_scorer_recovers_a_planted_direction_on_raw_features():
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.normal(5, 3, 4000), rng.normal(0, 0.01, 4000)])  # very different scales
    z = 0.8 * (X[:, 0] - 5) + 150 * X[:, 1]
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(float)
    b, w = fit_logistic_scorer(X, y, C=100.0)
    assert w[0] == pytest.approx(0.8, rel=0.15) and w[1] == pytest.approx(150, rel=0.15)
    assert b == pytest.approx(-4.0, abs=0.6)
    oof = oof_scores(X, y, np.arange(4000) % 5, 100.0, "s")
    assert ((oof > 0.5) == (z > 0)).mean() > 0.85


def test_platt_recovers_a_planted_calibration_and_refuses_a_falling_one():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 2, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-(0.5 * x - 1.0)))).astype(float)
    a, b = fit_platt(x, y)
    assert a == pytest.approx(0.5, abs=0.06) and b == pytest.approx(-1.0, abs=0.1)
    a, b = fit_platt(-x, y)  # a confidence that falls as accuracy rises: no usable order
    assert a == 0.0 and b == pytest.approx(math.log(y.mean() / (1 - y.mean())))


@pytest.mark.parametrize("policy,options", [("agreement", {}), ("frugalgpt", {"text": ()}), ("gatekeeper", {})])
def test_tuners_meet_budgets_and_simulate_agrees(policy, options):
    recs = mc_records(300)
    if policy == "gatekeeper":  # a p_true that tracks correctness, noisily
        rng = np.random.default_rng(3)
        recs = [Record(r.id, r.prompt, r.split, r.category, r.gold,
                       {m: Response(x.text, x.correct, None, None, 10, 1, None,
                                    float(np.clip(0.5 * x.correct + 0.5 * rng.random(), 0, 1)))
                        for m, x in r.responses.items()}, r.line) for r in recs]
    for budget in ((9.0, 13.0) if policy == "agreement" else (3.5, 6.0, 12.0)):  # agreement pays two tiers
        f = fit(policy, recs, TIERS, Target.budget(budget), **options)  # fit() replays and compares
        if policy != "frugalgpt":  # frugalgpt meets the budget on out-of-fold scores, reports in-sample
            assert f.train_cost <= budget + 1e-9
    best = fit(policy, recs, TIERS, Target.budget(13.0), **options)
    assert best.train_accuracy >= np.mean([r.responses["m-strong"].correct for r in recs]) - 1e-9


def test_agreement_tuner_finds_that_two_cheap_models_agreeing_are_usually_right():
    recs = mc_records(400)
    f = fit("agreement", recs, TIERS, Target.match_best())
    assert f.params["chain"] == ["cheap", "mid", "strong"] and f.params["answer_kind"] == "choice"
    strong = np.mean([r.responses["m-strong"].correct for r in recs])
    assert f.train_accuracy >= strong and f.train_cost < 10.0
    # held-out rows drawn the same way: the same chain keeps the strong model's accuracy for less
    test = mc_records(2000, seed=7)
    outs = simulate(make_policy("agreement", tier_infos(TIERS), f.params), TIERS, test)
    acc = np.mean([o.correct for o in outs])
    assert acc >= np.mean([r.responses["m-strong"].correct for r in test]) - 0.02
    assert np.mean([o.cost_usd for o in outs]) < 8.0  # the strong model alone costs 10


def test_frugalgpt_scorer_learns_agreement_and_carries_it_into_the_policy():
    recs = mc_records(400)
    tuner = make_tuner("frugalgpt", build_table(recs, TIERS), tier_infos(TIERS), text=())
    assert tuner.search["answer_kind"] == "choice" and tuner.search["text"] == []
    f = tuner.select(Target.match_best())
    sc = f.params["scorers"]
    assert "mid" in sc and sc["mid"]["agree"] == 1 and sc["mid"]["w"][5] > 1.0  # agreeing with 'cheap' counts


@pytest.mark.skipif(not embeddings.available(), reason="sentence embeddings not installed")
def test_frugalgpt_with_embeddings_maps_the_projected_weights_back_exactly():
    recs = mc_records(120)
    recs = [Record(r.id, f"{'Hard' if j % 3 else 'Easy'} question about topic {j % 7}?", r.split, r.category, r.gold,
                   r.responses, r.line) for j, r in enumerate(recs)]
    table = build_table(recs, TIERS)
    assert make_tuner("frugalgpt", table, tier_infos(TIERS), components=8).search["text"] == ["query"]  # letters
    tuner = make_tuner("frugalgpt", table, tier_infos(TIERS), components=8, text=("query", "answer"))
    assert tuner.search["text"] == ["query", "answer"] and "note" not in tuner.search
    X = tuner._features((0,))
    assert X.shape[1] == len(FORM_FEATURES) + 2 * 8
    b, w = fit_logistic_scorer(X, table.correct[0], C=1.0)
    fb, fw = tuner._full_weights(b, w)
    sc = AnswerScorer({"kind": tuner.kind, "agree": 0, "signals": [], "text": ["query", "answer"], "bias": fb,
                       "w": list(fw)})
    want = 1 / (1 + np.exp(-(X @ w + b)))
    got = [sc.score(recs[j].prompt, recs[j].responses["m-cheap"].text, []) for j in range(len(recs))]
    assert np.allclose(got, want, atol=1e-9)
    fit("frugalgpt", recs, TIERS, Target.budget(6.0), components=8, text=("query", "answer"))  # replayed by simulate


def test_frugalgpt_and_agreement_need_answer_text():
    recs = [Record(r.id, r.prompt, r.split, r.category, r.gold,
                   {m: Response(None, x.correct, None, None, 10, 1, None, None) for m, x in r.responses.items()},
                   r.line) for r in mc_records(50)]
    table = build_table(recs, TIERS)
    for policy in ("frugalgpt", "agreement"):
        with pytest.raises(NotApplicable, match="no answer text is recorded"):
            make_tuner(policy, table, tier_infos(TIERS))


def test_lm_cascade_is_not_applicable_on_recorded_files_and_says_why():
    L = prepare(BENCH / "rc-mmlu.jsonl.gz")
    train, _ = L.train_test()
    tiers = L.tiers(train)
    with pytest.raises(NotApplicable, match="no token log-probs are recorded"):
        make_tuner("lm-cascade", build_table(train, tiers), tier_infos(tiers))


def test_lm_cascade_tuner_on_token_signals_fits_rules_whose_figures_the_policy_reproduces():
    rng = np.random.default_rng(4)
    n = 300
    recs = mc_records(n)
    table = build_table(recs, TIERS)
    # token log-probs per (tier, row): right answers have higher minimum log-prob
    sig = {}
    lp = [[rng.normal(-0.2 if table.correct[i, j] else -1.0, 0.3, rng.integers(1, 8)).clip(max=0)
           for j in range(n)] for i in range(3)]
    for name, fn in (("min_logprob", np.min), ("q10_logprob", lambda v: np.quantile(v, 0.1)),
                     ("q25_logprob", lambda v: np.quantile(v, 0.25)), ("q50_logprob", np.median),
                     ("mean_logprob", np.mean), ("sum_logprob", np.sum), ("n_tokens", len)):
        sig[name] = np.array([[float(fn(v)) for v in row] for row in lp])
    table.conf.update(sig)
    tuner = make_tuner("lm-cascade", table, tier_infos(TIERS))
    assert set(tuner.search["rules"]) == {"chow-sum", "chow-average", "chow-quantile", "learned"}
    for target in (Target.budget(4.0), Target.match_best()):
        f = tuner.select(target)
        pol = make_policy("lm-cascade", tier_infos(TIERS), f.params)
        acc = cost = 0.0
        for j in range(n):  # replay the decisions on the same signals
            for pos, t in enumerate(pol.chain):
                cost += TIERS[t].price.per_call
                cells = {s: float(sig[s][t, j]) for s in DEFERRAL_FEATURES}
                if pos == len(pol.chain) - 1 or pol.decide(Q, [_att(t, cells)]).action == "accept":
                    acc += table.correct[t, j]
                    break
        assert (acc / n, cost / n) == pytest.approx((f.train_accuracy, f.train_cost))


def test_replay_hands_a_text_reading_policy_every_prompt_and_answer_in_one_batch():
    from router.core.policies.agreement import AgreementCascade

    seen: list[list[str]] = []

    class Warmed(AgreementCascade):
        def warm(self, texts):
            seen.append(list(texts))

    recs = mc_records(3)
    simulate(Warmed(tier_infos(TIERS), ["cheap", "mid", "strong"]), TIERS, recs)
    assert len(seen) == 1
    assert set(seen[0]) == {r.prompt for r in recs} | {x.text for r in recs for x in r.responses.values()}
