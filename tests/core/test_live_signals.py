"""The maths of the live-signal methods: semantic entropy, AutoMix's verifier
probability and POMDP step, Self-REF's confidence token."""
from __future__ import annotations

import math

import pytest

from router.core import pomdp
from router.core.attempt import Attempt, Query
from router.core.comparators import CanonicalComparator
from router.core.live_signals import (
    calls_needed,
    clusters,
    from_calls,
    p_true_from_top,
    parse_yes_no,
    self_ref_confidence,
    semantic_entropy,
    verifier_probability,
)
from router.core.policies.automix import AutoMix, Step
from router.core.policy import TierInfo


def test_semantic_entropy_of_identical_samples_is_zero():
    comp = CanonicalComparator("auto")
    assert semantic_entropy(["42", "42", "42", "42"], comp) == 0.0
    # the same meaning written differently is one cluster too
    assert semantic_entropy(["1,000", "1000", "1000.0", "The answer is 1000"], CanonicalComparator("number")) == 0.0
    assert semantic_entropy(["B", "(B)", "B) Paris", "**B**"], CanonicalComparator("choice")) == 0.0


def test_semantic_entropy_counts_meaning_clusters():
    comp = CanonicalComparator("number")
    # two clusters of two: ln 2; four different answers: ln 4
    assert semantic_entropy(["3", "3", "5", "5"], comp) == pytest.approx(math.log(2))
    assert semantic_entropy(["1", "2", "3", "4"], comp) == pytest.approx(math.log(4))
    # 3 of 4 agree: -(3/4 ln 3/4 + 1/4 ln 1/4)
    assert semantic_entropy(["7", "7", "7", "8"], comp) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # an unreadable sample is a cluster of its own, even beside another unreadable one
    assert clusters([None, None, "a"], lambda a, b: a == b) == [[0], [1], [2]]
    assert semantic_entropy([], comp) is None


def test_verifier_probability_is_the_share_of_yes_among_readable_verdicts():
    assert verifier_probability(["Yes", " yes.", "No", "maybe"]) == pytest.approx(2 / 3)
    assert verifier_probability(["No", "Incorrect"]) == 0.0
    assert verifier_probability(["hmm", ""]) is None
    assert parse_yes_no(" Yes, it is") is True and parse_yes_no("No.") is False and parse_yes_no("42") is None


def test_self_ref_confidence_reads_the_confidence_token():
    assert self_ref_confidence(" certain", math.log(0.8)) == pytest.approx(0.8)
    assert self_ref_confidence(" uncertain", math.log(0.9)) == pytest.approx(0.1)
    assert self_ref_confidence("Certain.") == 1.0 and self_ref_confidence("uncertain") == 0.0
    assert self_ref_confidence("B") is None


def test_from_calls_names_the_signals_and_the_calls_they_need():
    calls = {"samples": [{"text": "12"}, {"text": "12"}, {"text": "13"}],
             "verify": [{"text": "Yes"}, {"text": "No"}, {"text": "Yes"}, {"text": "Yes"}],
             "self_ref": [{"text": " certain", "token_logprobs": [[" ", 0.0], [" certain", math.log(0.6)]]}]}
    s = from_calls("12", calls)
    assert s["neg_semantic_entropy"] == pytest.approx((0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert s["p_verify"] == 0.75
    assert s["self_ref"] == pytest.approx(0.6)
    assert calls_needed(["self_ref", "min_logprob", "p_verify"]) == ("verify", "self_ref")


def test_p_true_is_the_yes_mass_of_the_verdict_tokens_alternatives():
    top = {"Yes": math.log(0.6), " yes": math.log(0.1), "No": math.log(0.2), "Maybe": math.log(0.05)}
    assert p_true_from_top(top) == pytest.approx(0.7 / 0.9)
    assert p_true_from_top({"Maybe": -0.1, "4": -2.0}) is None and p_true_from_top(None) is None
    assert p_true_from_top({"No": 0.0, "Yes": None}) == 0.0
    # from the recorded call, as the workers store it (worker.models.extra_calls)
    s = from_calls("4", {"p_true": [{"text": "Yes", "top_logprobs": {"Yes": math.log(0.8), "No": math.log(0.2)}}]})
    assert s == {"p_true": pytest.approx(0.8)}


def test_pomdp_belief_is_bayes_rule():
    prior = {"good": 0.5, "bad": 0.5}
    lik = {"good": [0.2, 0.8], "bad": [0.6, 0.4]}
    b = pomdp.belief(prior, lik, 1)
    assert b["good"] == pytest.approx(0.4 / 0.6) and b["bad"] == pytest.approx(0.2 / 0.6)
    assert pomdp.belief(prior, lik, None) == prior


def test_pomdp_picks_the_known_best_action_on_a_fixture():
    # Fixture: the verifier says "yes" (obs 1) mostly when the cheap answer is right.
    # Worked by hand: after obs 0 the belief is good 0.1/0.4, needy 0.15/0.4, hopeless 0.15/0.4;
    # escalating gains (-1)(0.25) + (1)(0.375) + 0 = 0.125 > its cost 0.1 x lam 1: escalate.
    # After obs 1: good 0.4/0.6 = 2/3, needy 0.15/0.6, hopeless 0.05/0.6; gain -2/3 + 1/4 < 0: stop.
    prior = {"good": 0.5, "needy": 0.3, "hopeless": 0.2}
    lik = {"good": [0.2, 0.8], "needy": [0.5, 0.5], "hopeless": [0.75, 0.25]}
    rewards = {"accept": {"good": 0.0, "needy": 0.0, "hopeless": 0.0},
               "escalate": {"good": -1.0, "needy": 1.0, "hopeless": 0.0}}
    act, values = pomdp.best_action(pomdp.belief(prior, lik, 0), rewards, {"escalate": 0.1}, lam=1.0)
    assert act == "escalate" and values["escalate"] == pytest.approx(0.125 - 0.1)
    act, values = pomdp.best_action(pomdp.belief(prior, lik, 1), rewards, {"escalate": 0.1}, lam=1.0)
    assert act == "accept" and values["escalate"] == pytest.approx(-2 / 3 + 0.25 - 0.1)
    # a high enough price of quality makes stopping best even after a "no"
    assert pomdp.best_action(pomdp.belief(prior, lik, 0), rewards, {"escalate": 0.1}, lam=2.0)[0] == "accept"


def test_automix_policy_takes_the_pomdp_action_on_the_live_verifier():
    tiers = [TierInfo("small", 0), TierInfo("large", 1)]
    step = {"edges": [0.5], "prior": {"good": 0.5, "needy": 0.3, "hopeless": 0.2},
            "likelihood": {"good": [0.2, 0.8], "needy": [0.5, 0.5], "hopeless": [0.75, 0.25]},
            "gain": {"good": -1.0, "needy": 1.0, "hopeless": 0.0}, "cost": 0.1}
    p = AutoMix(tiers, steps={"small": step}, lam=1.0, signal="p_verify")
    q = Query("q", "?")
    low = Attempt("small", 0, "m", "4", {"p_verify": 1 / 3})
    high = Attempt("small", 0, "m", "4", {"p_verify": 2 / 3})
    assert p.decide(q, [low]).action == "escalate"
    assert p.decide(q, [high]).action == "accept"
    assert Step("small", step).action(1 / 3, 1.0)[0] == "escalate"
    # the last tier of the chain makes no extra calls for a live signal
    assert p.needs(0).signals == ("p_verify",) and p.needs(1).signals == ()
