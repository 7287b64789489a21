"""agreement, frugalgpt, gatekeeper and lm-cascade decisions on hand-made answers,
confidences and token log-probs whose right decision is known."""
from __future__ import annotations

import math

import pytest

from router.core import cascade
from router.core.attempt import Attempt, Query, TokenLogprob
from router.core.errors import PolicyError
from router.core.policies import make_policy
from router.core.policies.gatekeeper import calibrated
from router.core.policies.lm_cascade import DEFERRAL_FEATURES
from router.core.policy import TierInfo
from router.core.scorers import AnswerScorer
from router.core.signals import confidence_logit, from_tokens

TIERS = [TierInfo(n, i) for i, n in enumerate("abcd")]
Q = Query("q1", "Which is it?\nA) x\nB) y")


def att(tier: int, text: str | None = None, **signals: float) -> Attempt:
    return Attempt("abcd"[tier], tier, "m" + "abcd"[tier], text, signals)


# -- agreement --------------------------------------------------------------------
def test_agreement_first_tier_escalates_and_a_matching_answer_is_accepted():
    p = make_policy("agreement", TIERS, {"chain": ["a", "b", "c"], "answer_kind": "choice"})
    assert p.needs(0).signals == ()
    assert p.decide(Q, [att(0, "B")]).action == "escalate"
    d = p.decide(Q, [att(0, "B"), att(1, "(b)")])
    assert (d.action, d.score) == ("accept", 1.0)
    assert p.decide(Q, [att(0, "B"), att(1, "A")]).next_tier == 2
    assert p.decide(Q, [att(0, "B"), att(1, "A"), att(2, "C")]).action == "accept"  # last tier


def test_agreement_min_agree_two_needs_two_earlier_matches_and_missing_answers_never_match():
    p = make_policy("agreement", TIERS, {"chain": ["a", "b", "c", "d"], "min_agree": 2})
    assert p.decide(Q, [att(0, "7"), att(1, "7")]).action == "escalate"  # one earlier answer only
    assert p.decide(Q, [att(0, "7"), att(1, "8"), att(2, "7")]).action == "escalate"
    assert p.decide(Q, [att(0, "7"), att(1, "7.0"), att(2, "#### 7")]).action == "accept"
    q = make_policy("agreement", TIERS, {"chain": ["a", "b", "c"]})
    assert q.decide(Q, [att(0, None), att(1, None)]).action == "escalate"


def test_agreement_bad_params_are_named():
    with pytest.raises(PolicyError, match="min_agree=2 can never be met on a chain of 3"):
        make_policy("agreement", TIERS, {"chain": ["a", "b", "c"], "min_agree": 2})
    with pytest.raises(PolicyError, match="answer_kind must be one of"):
        make_policy("agreement", TIERS, {"chain": ["a", "b", "c"], "answer_kind": "letters"})


# -- frugalgpt ----------------------------------------------------------------------
def scorer(agree: int, w_form=(0, 0, 0, 0, 0), w_agree=(), bias=0.0) -> dict:  # text and signals off
    return {"kind": "choice", "agree": agree, "text": [], "bias": bias, "w": list(w_form) + list(w_agree)}


def test_frugalgpt_scores_form_and_agreement_with_earlier_tiers():
    # tier a: a parsable letter has P = sigmoid(2) (else sigmoid(-1)); tier b: +4 when it agrees with a
    params = {"chain": ["a", "b", "c"], "thresholds": {"a": 0.9, "b": 0.9},
              "scorers": {"a": scorer(0, (0, 0, 0, 0, 3), bias=-1.0), "b": scorer(1, w_agree=(4.0,), bias=-1.0)}}
    p = make_policy("frugalgpt", TIERS, params)
    assert p.needs(0).signals == () and not p.needs(0).logprobs
    d = p.decide(Q, [att(0, "B")])
    assert d.action == "escalate" and d.score == pytest.approx(1 / (1 + math.exp(-2)))
    d = p.decide(Q, [att(0, "B"), att(1, "B")])
    assert d.action == "accept" and d.score == pytest.approx(1 / (1 + math.exp(-3)))
    assert p.decide(Q, [att(0, "B"), att(1, "C")]).action == "escalate"
    p2 = make_policy("frugalgpt", TIERS, {**params, "thresholds": {"a": 0.8, "b": 0.9}})
    assert p2.decide(Q, [att(0, "B")]).action == "accept"
    assert p2.decide(Q, [att(0, "I do not know")]).action == "escalate"
    assert make_policy("frugalgpt", TIERS, p.params()).params() == p.params()


def test_frugalgpt_scorer_shape_and_position_are_checked():
    with pytest.raises(PolicyError, match=r"w must be a list of 6 weights"):
        AnswerScorer(scorer(1), "s")
    with pytest.raises(PolicyError, match="compares with 0 earlier answer"):
        make_policy("frugalgpt", TIERS, {"chain": ["a", "b", "c"], "thresholds": {"a": 0.5, "b": 0.5},
                                         "scorers": {"a": scorer(0), "b": scorer(0)}})
    with pytest.raises(PolicyError, match="needs a threshold and a scorer"):
        make_policy("frugalgpt", TIERS, {"chain": ["a", "b"]})


def test_frugalgpt_scorer_reads_the_tiers_own_signal_as_log_odds_with_an_absent_flag():
    sc = {"kind": "auto", "agree": 0, "signals": ["p_true"], "text": [], "bias": 0.0,
          "w": [0, 0, 0, 0, 0, 1.0, -5.0]}  # form, then (log-odds of p_true, p_true absent)
    p = make_policy("frugalgpt", TIERS, {"chain": ["a", "b"], "thresholds": {"a": 0.75}, "scorers": {"a": sc}})
    d = p.decide(Q, [att(0, "x", p_true=0.8)])
    assert d.action == "accept" and d.score == pytest.approx(0.8)
    assert p.decide(Q, [att(0, "x", p_true=0.6)]).action == "escalate"
    assert p.decide(Q, [att(0, "x")]).score == pytest.approx(1 / (1 + math.exp(5)))
    with pytest.raises(PolicyError, match="signals must be a list of signal names"):
        AnswerScorer({**sc, "signals": ["confidence"]}, "s")


# -- gatekeeper ---------------------------------------------------------------------
def test_gatekeeper_calibration_arithmetic():
    assert confidence_logit("p_true", 0.5) == 0.0
    assert confidence_logit("logprob", math.log(0.8)) == pytest.approx(math.log(4))
    assert confidence_logit("p_true", 1.0) == pytest.approx(math.log((1 - 1e-6) / 1e-6))
    assert calibrated("p_true", 0.8, 1.0, 0.0) == pytest.approx(0.8)  # identity calibration
    assert calibrated("p_true", 0.8, 0.5, 0.0) == pytest.approx(2 / 3)  # temperature 2: 4**0.5 odds
    assert calibrated("logprob", math.log(0.5), 1.0, math.log(3)) == pytest.approx(0.75)


def test_gatekeeper_one_tau_over_calibrated_tiers():
    # tier a is over-confident (its 0.9 means 0.5), tier b is calibrated
    p = make_policy("gatekeeper", TIERS, {"chain": ["a", "b", "c"], "signal": "p_true", "tau": 0.7,
                                          "calibration": {"a": [1.0, -math.log(9)], "b": [1.0, 0.0]}})
    assert p.needs(0).signals == ("p_true",)
    assert p.decide(Q, [att(0, "x", p_true=0.9)]).action == "escalate"
    assert p.decide(Q, [att(0, "x", p_true=0.9), att(1, "y", p_true=0.9)]).action == "accept"
    assert p.decide(Q, [att(0, "x")]).reason == "p_true missing"
    with pytest.raises(PolicyError, match=r"no calibration for tier\(s\) \['b'\]"):
        make_policy("gatekeeper", TIERS, {"chain": ["a", "b", "c"], "calibration": {"a": [1, 0]}})
    with pytest.raises(PolicyError, match="must be \\[a, b\\]"):
        make_policy("gatekeeper", TIERS, {"chain": ["a", "b"], "calibration": {"a": [1]}})


# -- lm-cascade: Chow rules on token log-probs ----------------------------------------
def toks(*lps: float) -> dict[str, float]:
    return from_tokens([TokenLogprob(f"t{i}", lp) for i, lp in enumerate(lps)] + [TokenLogprob("<|eot_id|>", -0.01)])


LONG_SURE = toks(*([-0.05] * 20))  # sum -1.0, mean -0.05, min -0.05
SHORT_ONE_DOUBT = toks(-0.01, -1.5, -0.01)  # sum -1.52, mean -0.507, min -1.5
MEDIUM = toks(-0.3, -0.3)  # sum -0.6, mean -0.3, min -0.3


@pytest.mark.parametrize("rule,quantile,accepted", [
    ("chow-sum", None, {"MEDIUM"}),  # sum > -0.8: length bias rejects the long sure answer
    ("chow-average", None, {"LONG_SURE", "MEDIUM"}),  # mean > -0.4
    ("chow-quantile", 0.0, {"LONG_SURE", "MEDIUM"}),  # min > -0.4
])
def test_chow_rules_rank_answers_as_their_definitions_say(rule, quantile, accepted):
    th = {"chow-sum": -0.8, "chow-average": -0.4, "chow-quantile": -0.4}[rule]
    p = make_policy("lm-cascade", TIERS, {"rule": rule, "quantile": quantile, "chain": ["a", "b"],
                                          "thresholds": {"a": th}})
    assert p.needs(0).logprobs
    got = {name for name, sig in (("LONG_SURE", LONG_SURE), ("SHORT_ONE_DOUBT", SHORT_ONE_DOUBT), ("MEDIUM", MEDIUM))
           if p.decide(Q, [att(0, "x", **sig)]).action == "accept"}
    assert got == accepted


def test_chow_signals_exclude_the_end_token():
    assert LONG_SURE["sum_logprob"] == pytest.approx(-1.0)
    assert SHORT_ONE_DOUBT["mean_logprob"] == pytest.approx(-1.52 / 3)
    assert SHORT_ONE_DOUBT["min_logprob"] == pytest.approx(-1.5)


def test_chow_quantile_catches_one_doubtful_token_that_the_mean_hides():
    # 9 sure tokens and one at -3: mean -0.3 passes -0.5, the 0-quantile (min) does not
    sig = toks(*([-0.0] * 9 + [-3.0]))
    avg = make_policy("lm-cascade", TIERS, {"rule": "chow-average", "chain": ["a", "b"], "thresholds": {"a": -0.5}})
    qmin = make_policy("lm-cascade", TIERS, {"rule": "chow-quantile", "quantile": 0, "chain": ["a", "b"],
                                             "thresholds": {"a": -0.5}})
    assert avg.decide(Q, [att(0, "x", **sig)]).action == "accept"
    assert qmin.decide(Q, [att(0, "x", **sig)]).action == "escalate"


def test_learned_deferral_reads_the_quantile_vector():
    w = [0.0] * len(DEFERRAL_FEATURES)
    w[DEFERRAL_FEATURES.index("min_logprob")] = 4.0  # P = sigmoid(4 * min + 2)
    p = make_policy("lm-cascade", TIERS, {"rule": "learned", "chain": ["a", "b"], "thresholds": {"a": 0.5},
                                          "models": {"a": {"bias": 2.0, "w": w}}})
    assert set(p.needs(0).signals) == set(DEFERRAL_FEATURES)
    d = p.decide(Q, [att(0, "x", **MEDIUM)])
    assert d.action == "accept" and d.score == pytest.approx(1 / (1 + math.exp(-(4 * -0.3 + 2))))
    assert p.decide(Q, [att(0, "x", **SHORT_ONE_DOUBT)]).action == "escalate"
    assert p.decide(Q, [att(0, "x", logprob=-0.1)]).reason == "learned: token log-probs missing"


def test_lm_cascade_bad_params():
    with pytest.raises(PolicyError, match="unknown deferral rule 'chow-max'"):
        make_policy("lm-cascade", TIERS, {"rule": "chow-max", "chain": ["a", "b"], "thresholds": {"a": 0}})
    with pytest.raises(PolicyError, match="quantile must be one of"):
        make_policy("lm-cascade", TIERS, {"rule": "chow-quantile", "quantile": 0.3, "chain": ["a", "b"],
                                          "thresholds": {"a": 0}})
    with pytest.raises(PolicyError, match="need a threshold and a fitted model"):
        make_policy("lm-cascade", TIERS, {"rule": "learned", "chain": ["a", "b"], "thresholds": {"a": 0}})


def test_the_engine_runs_them_like_any_policy():
    p = make_policy("agreement", TIERS, {"chain": ["a", "b", "c"]})
    s = cascade.start(p, Q)
    assert s.tier == 0 and s.plan.allowed == (0, 1, 2)
    assert cascade.step(p, Q, s.plan, [att(0, "Paris"), att(1, "paris")]).action == "accept"
