"""The closed loop's pieces on hand-made recorded jobs: labels (grades first, then
agreement with the top tier), the rows a retune fits on, the shadow replay of a
policy on recorded attempts (and what it cannot replay), and the hold-out rule."""
from __future__ import annotations

import pytest

from router.core.comparators import make_comparator
from router.core.portfolio import parse_portfolio
from worker.labwork.retune import bench_rows, build_policy, held_out, label_jobs, replay

TIERS = ["t0", "t1", "t2"]


def portfolio(thresholds=(-0.3, -0.2)):
    return parse_portfolio({"tiers": [{"name": t, "backend": {"kind": "replay", "file": "x.jsonl", "model": t}}
                                      for t in TIERS],
                            "policy": {"name": "threshold", "params": {"signal": "logprob",
                                                                       "thresholds": dict(zip(TIERS, thresholds))}}},
                           where="test")


def att(tier, answer, logprob=None, cost=1.0, error=None):
    return {"tier": tier, "tier_index": TIERS.index(tier), "model": tier, "answer": answer,
            "signals": {} if logprob is None else {"logprob": logprob}, "tokens_in": 1, "tokens_out": 1,
            "cost_usd": cost, "latency_ms": 1.0, "error": error, "decision": "x"}


def job(jid, attempts, final_tier=None, feedback=None):
    return {"id": jid, "input": {"prompt": "q?"}, "attempts": attempts, "feedback": feedback,
            "final_tier": final_tier or attempts[-1]["tier"]}


COMP = make_comparator("canonical", kind="choice")


def test_labels_grades_first_then_agreement_with_the_top():
    full = job("a", [att("t0", "A"), att("t1", "B"), att("t2", "A")])
    early = job("b", [att("t0", "C")])
    graded = job("c", [att("t0", "A"), att("t1", "B"), att("t2", "B")],
                 feedback={"correct": 0.0, "tiers": {"t0": 1.0}})  # the top was wrong, t0 right
    top_right = job("d", [att("t0", "A"), att("t1", "B"), att("t2", "B")], feedback={"correct": 1.0, "tiers": {}})
    got = {lj.job["id"]: lj for lj in label_jobs([full, early, graded, top_right], TIERS, COMP)}
    assert got["a"].labels == {"t0": 1.0, "t1": 0.0, "t2": 1.0} and got["a"].graded == 0
    assert got["b"].labels == {}  # never reached the top, never graded: no label
    # grades stand; t1 agrees with a wrong top answer: wrong too
    assert got["c"].labels == {"t2": 0.0, "t0": 1.0, "t1": 0.0} and got["c"].graded == 2
    # the top graded right: agreeing is right, disagreeing wrong
    assert got["d"].labels == {"t2": 1.0, "t0": 0.0, "t1": 1.0}


def test_disagreeing_with_a_wrong_top_answer_says_nothing():
    j = job("e", [att("t0", "A"), att("t1", "C"), att("t2", "B")], feedback={"correct": 0.0, "tiers": {}})
    (lj,) = label_jobs([j], TIERS, COMP)
    assert lj.labels == {"t2": 0.0}  # t0, t1 differ from a wrong answer: unknown, not guessed


def test_rows_only_from_jobs_every_tier_answered_and_labelled():
    full = job("a", [att("t0", "A", -0.1, 0.1), att("t1", "B", -0.2, 0.2), att("t2", "A", -0.05, 1.0)])
    failed = job("f", [att("t0", None, error="boom"), att("t1", "A"), att("t2", "A")])
    rows = bench_rows(label_jobs([full, failed], TIERS, COMP), TIERS)
    assert [r["id"] for r in rows] == ["a"]
    assert {t: r["correct"] for t, r in rows[0]["responses"].items()} == {"t0": 1.0, "t1": 0.0, "t2": 1.0}
    assert rows[0]["responses"]["t0"]["logprob"] == -0.1 and rows[0]["responses"]["t1"]["cost_usd"] == 0.2


def test_replay_follows_the_policy_on_recorded_attempts():
    pf = portfolio()
    j = job("a", [att("t0", "A", -0.5, 0.1), att("t1", "B", -0.1, 0.2)])
    got = replay(pf.built_policy, pf, j)
    assert (got.tier, got.calls, got.cost, got.missing) == ("t1", ["t0", "t1"], pytest.approx(0.3), None)
    # a stricter version would go on to t2, which this job never called
    strict = build_policy(pf, {"name": "threshold", "params": {"signal": "logprob",
                                                               "thresholds": {"t0": -0.3, "t1": -0.01}}})
    assert replay(strict, pf, j).missing == "tier t2 never called"
    # a version skipping t1 goes from t0 to t2: not recorded either
    skip = build_policy(pf, {"name": "threshold", "params": {"signal": "logprob", "chain": ["t0", "t2"],
                                                             "thresholds": {"t0": -0.3}}})
    assert replay(skip, pf, j).missing == "tier t2 never called"
    lenient = build_policy(pf, {"name": "threshold", "params": {"signal": "logprob",
                                                                "thresholds": {"t0": -0.9, "t1": -0.2}}})
    assert (replay(lenient, pf, j).tier, replay(lenient, pf, j).cost) == ("t0", pytest.approx(0.1))


def test_replay_says_when_a_signal_was_never_recorded():
    pf = portfolio()
    j = job("a", [att("t0", "A", None, 0.1), att("t1", "B", -0.1, 0.2)])
    p_true = build_policy(pf, {"name": "threshold", "params": {"signal": "p_true",
                                                               "thresholds": {"t0": 0.5, "t1": 0.5}}})
    assert replay(p_true, pf, j).missing == "p_true not recorded at t0"


def test_hold_out_is_a_stable_share():
    ids = [f"job-{i}" for i in range(4000)]
    out = [held_out(i, 0.3, 0) for i in ids]
    assert 0.27 < sum(out) / len(ids) < 0.33
    assert out == [held_out(i, 0.3, 0) for i in ids]  # the same rule in the shadow, later
    assert out != [held_out(i, 0.3, 1) for i in ids]


def test_a_graded_final_answer_labels_the_answers_that_agree_with_it():
    right = job("r", [att("t0", "A"), att("t1", "A")], final_tier="t0", feedback={"correct": 1.0, "tiers": {}})
    right_other = job("o", [att("t0", "A"), att("t1", "B")], final_tier="t0", feedback={"correct": 1.0, "tiers": {}})
    wrong = job("w", [att("t0", "A"), att("t1", "B")], final_tier="t0", feedback={"correct": 0.0, "tiers": {}})
    got = {lj.job["id"]: lj.labels for lj in label_jobs([right, right_other, wrong], TIERS, COMP)}
    assert got == {"r": {"t0": 1.0, "t1": 1.0}, "o": {"t0": 1.0, "t1": 0.0}, "w": {"t0": 0.0}}


def test_a_worker_started_after_a_promotion_probes_what_both_versions_read():
    from router.core.policy import Needs
    from worker.models.preflight import both_needs

    got = both_needs(Needs(signals=("logprob",), logprobs=True), Needs(signals=("p_true", "logprob"), top_logprobs=5,
                                                                  samples=3, verify=True))
    assert got == Needs(signals=("logprob", "p_true"), logprobs=True, top_logprobs=5, samples=3, verify=True)
