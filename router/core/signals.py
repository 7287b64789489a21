"""Confidence signals: pure functions from a model's output to named numbers.

Policies ask for a signal by name; the portfolio file names it too, so the set of
names below is the public vocabulary. Every value is a finite float or absent:
a NaN or infinite input never becomes a silent number.
"""
from __future__ import annotations

import difflib
import math
from typing import Mapping, Sequence

from .attempt import TokenLogprob
from .errors import UserError

# name -> what it means (shown by `cascade` errors and docs)
SIGNALS: dict[str, str] = {
    "logprob": "mean token log-prob of the whole completion (recorded, or computed from tokens)",
    "p_true": "probability the model gives its own answer of being correct (self-verification)",
    "sum_logprob": "sum of answer-token log-probs (Chow-Sum; length-biased)",
    "mean_logprob": "mean of answer-token log-probs, stop tokens excluded (Chow-Average)",
    "min_logprob": "smallest answer-token log-prob",
    "q10_logprob": "10% quantile of answer-token log-probs (Chow-Quantile)",
    "q25_logprob": "25% quantile of answer-token log-probs",
    "q50_logprob": "median answer-token log-prob",
    "first_token_prob": "probability of the first answer token",
    "answer_logprob": "log-prob of the answer span, stop tokens excluded (= sum_logprob)",
    "neg_entropy": "minus the mean entropy over the top-k alternatives (higher = surer)",
    "n_tokens": "number of answer tokens",
    # live signals: extra calls through the tier's backend (worker.models.extra_calls, router.core.live_signals)
    "p_verify": "AutoMix: share of k sampled few-shot self-verifications that say the answer is correct",
    "neg_semantic_entropy": "minus the semantic entropy of k sampled answers clustered by meaning (0 = all agree)",
    "self_ref": "Self-REF (prompt-based): P(certain) of the confidence token asked for after the answer",
}


# the signals computed from an answer's token log-probs (from_tokens): a backend returns them
# only with token log-probs, which some servers send only when asked in a particular way
TOKEN_SIGNALS = frozenset({"logprob", "sum_logprob", "answer_logprob", "mean_logprob", "min_logprob", "q10_logprob",
                           "q25_logprob", "q50_logprob", "first_token_prob", "n_tokens", "neg_entropy"})


class SignalError(UserError):
    pass


def check_signal_name(name: str) -> str:
    if name not in SIGNALS:
        near = difflib.get_close_matches(name, SIGNALS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SignalError(f"unknown confidence signal {name!r}{hint}; known: {', '.join(SIGNALS)}")
    return name


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy."""
    s = sorted(values)
    if not s:
        raise SignalError("quantile of no values")
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _entropy(top: Mapping[str, float]) -> float | None:
    if not top:
        return None
    ps = [math.exp(lp) for lp in top.values() if math.isfinite(lp)]
    z = sum(ps)
    if z <= 0:
        return None
    return -sum((p / z) * math.log(p / z) for p in ps if p > 0)


END_TOKENS = frozenset({"", "</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"})


def answer_tokens(tokens: Sequence[TokenLogprob], stop: Sequence[str] = ()) -> list[TokenLogprob]:
    """Tokens of the answer proper: trailing stop/end tokens and whitespace-only tokens
    dropped, and leading whitespace-only tokens too (after "A:" Qwen and SmolLM write
    the space before a number as its own, near-certain token, which would otherwise
    be the "first token" of every answer)."""
    stops = set(stop) | END_TOKENS
    out = list(tokens)
    while out and (out[-1].token in stops or out[-1].token.strip() == ""):
        out.pop()
    start = 0
    while start < len(out) and out[start].token.strip() == "":
        start += 1
    return out[start:]


def from_tokens(tokens: Sequence[TokenLogprob], stop: Sequence[str] = ()) -> dict[str, float]:
    """All token-level signals. Non-finite log-probs are dropped, never averaged in."""
    result: dict[str, float] = {}
    all_lp = [lp for t in tokens if (lp := _finite(t.logprob)) is not None]
    if all_lp:
        result["logprob"] = sum(all_lp) / len(all_lp)
    ans = answer_tokens(tokens, stop)
    lps = [lp for t in ans if (lp := _finite(t.logprob)) is not None]
    if not lps:
        return result
    result["sum_logprob"] = sum(lps)
    result["answer_logprob"] = result["sum_logprob"]
    result["mean_logprob"] = sum(lps) / len(lps)
    result["min_logprob"] = min(lps)
    result["q10_logprob"] = quantile(lps, 0.10)
    result["q25_logprob"] = quantile(lps, 0.25)
    result["q50_logprob"] = quantile(lps, 0.50)
    result["first_token_prob"] = math.exp(lps[0])
    result["n_tokens"] = float(len(lps))
    ents = [e for t in ans if (e := _entropy(t.top)) is not None]
    if ents:
        result["neg_entropy"] = -sum(ents) / len(ents)
    return result


def from_record(logprob: float | None, p_true: float | None) -> dict[str, float]:
    """Signals a recorded response carries (benchmarks format). Non-finite -> absent."""
    out: dict[str, float] = {}
    if (lp := _finite(logprob)) is not None:
        out["logprob"] = lp
    if (pt := _finite(p_true)) is not None:
        out["p_true"] = pt
    return out


def get(signals: Mapping[str, float], name: str) -> float | None:
    v = signals.get(name)
    return _finite(v)


# how each signal reads as a probability of being right, for calibrations and scorers
PROBABILITY_SIGNALS = frozenset({"p_true", "first_token_prob", "p_verify", "self_ref"})
RAW_SIGNALS = frozenset({"neg_entropy", "n_tokens", "neg_semantic_entropy"})
_EPS = 1e-6


def confidence_logit(signal: str, value: float) -> float:
    """The log-odds of a confidence: p_true and first_token_prob are probabilities,
    the log-prob signals log-probabilities (p = exp(value), clipped to [1e-6, 1 - 1e-6]);
    neg_entropy and n_tokens are used as they are."""
    if signal in RAW_SIGNALS:
        return float(value)
    p = float(value) if signal in PROBABILITY_SIGNALS else math.exp(min(float(value), 0.0))
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))
