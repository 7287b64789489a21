"""Token-level confidence signals (router/signals.py): pure, named, finite."""
from __future__ import annotations

import math

import pytest

from router.core import signals as sig
from router.core.attempt import TokenLogprob as T


def toks(*pairs, top=None):
    return [T(t, lp, (top or {}).get(i, {})) for i, (t, lp) in enumerate(pairs)]


def test_every_signal_is_named_and_documented():
    for name, doc in sig.SIGNALS.items():
        assert sig.check_signal_name(name) == name
        assert doc


def test_unknown_signal_name_suggests_the_near_one():
    with pytest.raises(sig.SignalError, match="did you mean 'mean_logprob'"):
        sig.check_signal_name("mean_logrob")


def test_answer_span_excludes_stop_and_leading_space_tokens():
    # a few-shot completion: " " "4" "2" then the stop token "\n"
    t = toks((" ", -0.01), ("4", -0.2), ("2", -0.4), ("\n", -0.05))
    ans = sig.answer_tokens(t, stop=["\n"])
    assert [a.token for a in ans] == ["4", "2"]
    s = sig.from_tokens(t, stop=["\n"])
    assert s["sum_logprob"] == pytest.approx(-0.6)
    assert s["answer_logprob"] == pytest.approx(-0.6)
    assert s["mean_logprob"] == pytest.approx(-0.3)
    assert s["min_logprob"] == pytest.approx(-0.4)
    assert s["first_token_prob"] == pytest.approx(math.exp(-0.2))
    assert s["n_tokens"] == 2
    # `logprob` is the mean over the whole completion, stop token included
    assert s["logprob"] == pytest.approx((-0.01 - 0.2 - 0.4 - 0.05) / 4)


def test_end_of_turn_tokens_are_not_answer_tokens():
    t = toks(("Paris", -0.1), ("<|im_end|>", -0.01))
    assert [a.token for a in sig.answer_tokens(t)] == ["Paris"]
    t = toks(("Paris", -0.1), ("<|endoftext|>", -2.0))
    assert sig.from_tokens(t)["min_logprob"] == pytest.approx(-0.1)


def test_quantiles_interpolate_like_numpy():
    values = [-4.0, -3.0, -2.0, -1.0, 0.0]
    assert sig.quantile(values, 0.5) == -2.0
    assert sig.quantile(values, 0.10) == pytest.approx(-3.6)
    assert sig.quantile(values, 0.25) == pytest.approx(-3.0)
    t = toks(*[(str(i), v) for i, v in enumerate(values)])
    s = sig.from_tokens(t)
    assert s["q10_logprob"] == pytest.approx(-3.6)
    assert s["q25_logprob"] == pytest.approx(-3.0)
    assert s["q50_logprob"] == pytest.approx(-2.0)
    with pytest.raises(sig.SignalError):
        sig.quantile([], 0.5)


def test_entropy_over_top_k_alternatives():
    sure = {0: {"A": math.log(0.98), "B": math.log(0.01), "C": math.log(0.01)}}
    unsure = {0: {"A": math.log(1 / 3), "B": math.log(1 / 3), "C": math.log(1 / 3)}}
    s_sure = sig.from_tokens(toks(("A", math.log(0.98)), top=sure))
    s_unsure = sig.from_tokens(toks(("A", math.log(1 / 3)), top=unsure))
    assert s_unsure["neg_entropy"] == pytest.approx(-math.log(3))
    assert s_sure["neg_entropy"] > s_unsure["neg_entropy"]
    # no alternatives: no entropy signal (absent, not zero)
    assert "neg_entropy" not in sig.from_tokens(toks(("A", -0.1)))


def test_non_finite_logprobs_never_become_numbers():
    t = toks(("4", float("-inf")), ("2", -0.5), ("x", float("nan")))
    s = sig.from_tokens(t)
    assert s["n_tokens"] == 1 and s["mean_logprob"] == pytest.approx(-0.5)
    assert all(math.isfinite(v) for v in s.values())
    assert sig.from_tokens(toks(("4", float("nan")))) == {}
    assert sig.from_tokens([]) == {}
    assert sig.get({"x": float("inf")}, "x") is None
    assert sig.from_record(float("nan"), 0.7) == {"p_true": 0.7}


def test_only_whitespace_answer_has_no_answer_signals():
    s = sig.from_tokens(toks((" ", -0.1), ("\n", -0.2)), stop=["\n"])
    assert "mean_logprob" not in s and "first_token_prob" not in s
    assert s["logprob"] == pytest.approx(-0.15)


def test_higher_is_surer_for_every_confidence_signal():
    sure = sig.from_tokens(toks((" ", -0.01), ("4", -0.01), ("2", -0.02), ("\n", -0.1)), stop=["\n"])
    unsure = sig.from_tokens(toks((" ", -0.01), ("4", -1.5), ("2", -0.9), ("\n", -0.1)), stop=["\n"])
    for name in ("logprob", "sum_logprob", "mean_logprob", "min_logprob", "q10_logprob", "q25_logprob",
                 "q50_logprob", "first_token_prob", "answer_logprob"):
        assert sure[name] > unsure[name], name


def test_token_signals_are_what_from_tokens_computes():
    from router.core.attempt import TokenLogprob
    from router.core.signals import TOKEN_SIGNALS, from_tokens

    toks = [TokenLogprob("4", -0.2, {"4": -0.2, "5": -1.9}), TokenLogprob("2", -0.4, {"2": -0.4})]
    assert set(from_tokens(toks)) == TOKEN_SIGNALS
