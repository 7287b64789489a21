"""Speculative cascades' deferral rules and block verdicts (router/core/speculative.py), on fixture distributions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from router.core.speculative import RULES, DeferralRule, SpeculativeError, decide_block, log_softmax, tv_distance


def dist(*probs):
    p = np.array(probs, dtype=np.float64)
    assert p.sum() == pytest.approx(1.0)
    return p


# drafter unsure (top 0.5), verifier sure (top 0.9), on different tokens: TV = 0.5 + 0.0 ... computed below
Q_UNSURE = dist(0.5, 0.3, 0.2)
P_SURE_OTHER = dist(0.05, 0.9, 0.05)
# both sure of the same token
Q_SURE = dist(0.9, 0.05, 0.05)
P_SURE_SAME = dist(0.95, 0.03, 0.02)


def test_tv_distance_and_log_softmax():
    assert tv_distance(Q_UNSURE, P_SURE_OTHER) == pytest.approx(0.45 + 0.15)
    assert tv_distance(Q_SURE, Q_SURE) == 0.0
    assert tv_distance(Q_UNSURE, P_SURE_OTHER) == pytest.approx(0.5 * np.abs(Q_UNSURE - P_SURE_OTHER).sum())
    lp = log_softmax(np.log(Q_UNSURE) + 7.0)  # shift invariant
    assert np.exp(lp) == pytest.approx(Q_UNSURE)
    assert log_softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))[1] == pytest.approx([math.log(0.5)] * 2)


def test_chow_defers_when_the_drafter_is_unsure():
    assert DeferralRule("chow", 0.4).defers(Q_UNSURE, P_SURE_OTHER)  # 0.5 < 0.6
    assert not DeferralRule("chow", 0.6).defers(Q_UNSURE, P_SURE_OTHER)  # 0.5 >= 0.4
    assert not DeferralRule("chow", 0.4).defers(Q_SURE, P_SURE_OTHER)  # the verifier is not looked at


def test_diff_defers_when_the_verifier_is_surer_by_more_than_alpha():
    # gain = 0.9 - 0.5 = 0.4
    assert DeferralRule("diff", 0.3).defers(Q_UNSURE, P_SURE_OTHER)
    assert not DeferralRule("diff", 0.5).defers(Q_UNSURE, P_SURE_OTHER)
    # a verifier less sure than the drafter never takes over at alpha >= 0
    assert not DeferralRule("diff", 0.0).defers(P_SURE_SAME, Q_SURE)


def test_opt_weighs_the_gain_against_alpha_times_the_tv_distance():
    # gain 0.4, TV 0.6: defer iff 0.4 > 0.6 alpha, i.e. alpha < 2/3
    assert DeferralRule("opt", 0.6).defers(Q_UNSURE, P_SURE_OTHER)
    assert not DeferralRule("opt", 0.7).defers(Q_UNSURE, P_SURE_OTHER)
    # same gain, but nearly identical distributions make deferring cheap: opt defers where diff does not
    q, p = dist(0.5, 0.5, 0.0), dist(0.55, 0.45, 0.0)  # gain 0.05, TV 0.05
    assert DeferralRule("opt", 0.9).defers(q, p)
    assert not DeferralRule("diff", 0.9 * 0.6).defers(q, p)
    # alpha = 0: any gain at all defers
    assert DeferralRule("opt", 0.0).defers(Q_SURE, P_SURE_SAME)


def test_always_and_never():
    for q, p in ((Q_SURE, P_SURE_SAME), (Q_UNSURE, P_SURE_OTHER), (dist(1.0, 0.0, 0.0), dist(1.0, 0.0, 0.0))):
        assert DeferralRule("always").defers(q, p)
        assert not DeferralRule("never").defers(q, p)


def test_bad_rules_are_user_errors_naming_the_fix():
    with pytest.raises(SpeculativeError, match="did you mean 'chow'"):
        DeferralRule("chwo", 0.1)
    with pytest.raises(SpeculativeError, match=r"\[0, 1\]"):
        DeferralRule("chow", 1.5)
    with pytest.raises(SpeculativeError, match=">= 0"):
        DeferralRule("opt", -0.1)
    with pytest.raises(SpeculativeError, match="finite"):
        DeferralRule("diff", float("nan"))
    assert set(RULES) == {"chow", "diff", "opt", "always", "never"}


def block(*rows):
    return log_softmax(np.log(np.array(rows, dtype=np.float64) + 1e-300))


def test_a_block_keeps_drafts_until_the_first_correction_and_stops_there():
    # positions: both agree on 0; drafter unsure of 1 and the verifier prefers 2; then a position that must not be read
    q = block([0.9, 0.05, 0.05], [0.1, 0.5, 0.4], [0.0, 0.0, 1.0])
    p = block([0.95, 0.03, 0.02], [0.05, 0.15, 0.8], [1.0, 0.0, 0.0])
    got = decide_block(q, p, DeferralRule("chow", 0.2))  # defer where top q < 0.8
    assert [(x.token, x.draft, x.deferred, x.corrected) for x in got] == [(0, 0, False, False), (2, 1, True, True)]
    assert got[0].logprob == pytest.approx(math.log(0.9))  # kept: the drafter's probability
    assert got[1].logprob == pytest.approx(math.log(0.8))  # deferred: the verifier's
    # a rule that never defers emits every draft
    assert [x.token for x in decide_block(q, p, DeferralRule("never"))] == [0, 1, 2]


def test_a_deferral_where_the_verifier_agrees_keeps_the_block_going():
    q = block([0.4, 0.35, 0.25], [0.2, 0.7, 0.1])
    p = block([0.6, 0.3, 0.1], [0.1, 0.8, 0.1])
    got = decide_block(q, p, DeferralRule("always"))
    assert [(x.token, x.deferred, x.corrected) for x in got] == [(0, True, False), (1, True, False)]
    assert [x.logprob for x in got] == pytest.approx([math.log(0.6), math.log(0.8)])


def test_always_defer_on_a_toy_pair_reproduces_the_verifiers_greedy_output():
    """Speculative decoding with the always-defer rule, run to the end on two toy
    next-token tables, emits exactly the verifier's greedy sequence."""
    rng = np.random.default_rng(3)
    vocab, length, gamma = 6, 14, 4
    # next-token distributions given the last token; the verifier is the drafter plus noise, so they mostly agree
    base = rng.normal(size=(vocab, vocab)) * 2
    q_table = log_softmax(base)
    p_table = log_softmax(base + rng.normal(size=(vocab, vocab)))
    assert (q_table.argmax(axis=1) != p_table.argmax(axis=1)).any()  # and sometimes not
    greedy_p = [0]
    while len(greedy_p) <= length:
        greedy_p.append(int(p_table[greedy_p[-1]].argmax()))
    for rule in (DeferralRule("always"), DeferralRule("chow", 0.0)):
        seq, blocks = [0], 0
        while len(seq) <= length:
            drafts, q_rows = [], []
            last = seq[-1]
            for _ in range(gamma):
                q_rows.append(q_table[last])
                last = int(q_table[last].argmax())
                drafts.append(last)
            p_rows = [p_table[t] for t in [seq[-1]] + drafts[:-1]]
            got = decide_block(np.array(q_rows), np.array(p_rows), rule, drafts)
            seq += [x.token for x in got]
            blocks += 1
        assert seq[: length + 1] == greedy_p[: length + 1]
        assert blocks < length  # some blocks emitted more than one token
    never = DeferralRule("never")
    assert [x.token for x in decide_block(q_table[[0, 1]], p_table[[0, 1]], never, [5, 5])] == [5, 5]


def test_shapes_must_match():
    with pytest.raises(SpeculativeError, match="share one vocabulary"):
        decide_block(np.zeros((2, 3)), np.zeros((2, 4)), DeferralRule("always"))
