"""Confidence from extra model calls: the maths of the live-signal methods, pure.

The workers' `worker.models.extra_calls` makes the calls (through the tier's own backend)
and hands the texts here; the replay backend serves recorded texts, so the lab and
the workers compute the same numbers.

- AutoMix (Aggarwal, Madaan et al. 2024): the model is shown its own answer in a
  few-shot verification prompt and asked, k times at temperature > 0, whether it is
  correct. `verifier_probability` = the share of the k verdicts that say yes (the
  paper's verifier confidence); the threshold and POMDP meta-verifiers read it
  (`router.core.pomdp`, `policies/automix.py`).
- Semantic entropy (Farquhar et al., Nature 2024; discrete variant): k answers,
  clustered by meaning (a comparator: canonical-answer equality, or MiniLM embedding
  similarity), entropy of the cluster shares. 0 when every sample says the same.
  The signal is its negation (higher = surer), like every signal here.
- Self-REF (Chuang et al. 2024), the prompt-based variant (no fine-tuning): after
  the answer the model is asked for a confidence token, "certain" or "uncertain";
  the confidence is P(certain) read from the token's log-prob when the backend
  returns one (P of the chosen token, or 1 minus it when the token says uncertain),
  else 1 or 0 from the text.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

from .comparators import CanonicalComparator, Comparator

_YES = re.compile(r"^\W*(yes|y|true|correct|right)\b", re.IGNORECASE)
_NO = re.compile(r"^\W*(no|n|false|incorrect|wrong)\b", re.IGNORECASE)
_UNCERTAIN = re.compile(r"^\W*(uncertain|unsure|not\s+(?:certain|sure)|no)\b", re.IGNORECASE)
_CERTAIN = re.compile(r"^\W*(certain|sure|confident|yes)\b", re.IGNORECASE)


def parse_yes_no(text: str | None) -> bool | None:
    """A verdict: True for yes, False for no, None when the text says neither."""
    if not text:
        return None
    if _YES.search(text):
        return True
    if _NO.search(text):
        return False
    return None


def verifier_probability(verdicts: Sequence[str | None]) -> float | None:
    """AutoMix's verifier confidence: the share of readable verdicts that say yes;
    None (the signal is absent) when none of them can be read."""
    read = [v for v in (parse_yes_no(t) for t in verdicts) if v is not None]
    if not read:
        return None
    return sum(read) / len(read)


def clusters(samples: Sequence[Any | None], same: Callable[[Any, Any], bool]) -> list[list[int]]:
    """Sample indices grouped by meaning: each sample joins the first cluster whose
    first member it agrees with, else starts its own. A sample without an answer
    (None) agrees with nothing, so it is a cluster of its own."""
    out: list[list[int]] = []
    for i, s in enumerate(samples):
        if s is not None:
            for c in out:
                rep = samples[c[0]]
                if rep is not None and same(rep, s):
                    c.append(i)
                    break
            else:
                out.append([i])
        else:
            out.append([i])
    return out


def entropy_of(sizes: Sequence[int]) -> float:
    n = sum(sizes)
    if n <= 0:
        raise ValueError("entropy of no samples")
    return max(0.0, -sum((k / n) * math.log(k / n) for k in sizes if k > 0))


def semantic_entropy(texts: Sequence[str | None], comparator: Comparator) -> float | None:
    """Discrete semantic entropy (nats) of k sampled answers under a comparator;
    None for no samples."""
    if not texts:
        return None
    canon = comparator.canonical(list(texts))
    return entropy_of([len(c) for c in clusters(canon, comparator.same)])


def self_ref_confidence(text: str | None, token_logprob: float | None = None) -> float | None:
    """Self-REF's confidence from the reply to "certain or uncertain?": P(certain).
    With the reply's first token log-prob: exp(lp) if the reply says certain, 1 - exp(lp)
    if it says uncertain; without one: 1.0 or 0.0. None when the reply says neither."""
    if not text:
        return None
    if _UNCERTAIN.search(text):
        certain = False
    elif _CERTAIN.search(text):
        certain = True
    else:
        return None
    if token_logprob is None or not math.isfinite(token_logprob):
        return 1.0 if certain else 0.0
    p = math.exp(min(token_logprob, 0.0))
    return p if certain else 1.0 - p


def p_true_from_top(top: Mapping[str, float] | None) -> float | None:
    """P(True) (Kadavath et al. 2022) from the alternatives of the verdict's first token
    (the model was asked whether its answer is correct, yes or no): the probability mass
    of the alternatives that say yes over that of those that say yes or no. None (the
    signal is absent) when no alternative says either."""
    yes = no = 0.0
    for tok, lp in (top or {}).items():
        if lp is None or not math.isfinite(lp):
            continue
        verdict = parse_yes_no(str(tok))
        if verdict is True:
            yes += math.exp(min(lp, 0.0))
        elif verdict is False:
            no += math.exp(min(lp, 0.0))
    if yes + no <= 0:
        return None
    return yes / (yes + no)


# Which extra calls each live signal needs (kinds of derived query, see worker.models.extra_calls).
CALLS_FOR: dict[str, str] = {"p_verify": "verify", "neg_semantic_entropy": "samples", "self_ref": "self_ref"}
# "p_true" is the call a backend with the "verify" capability makes for the p_true signal (a
# replay reads p_true from its records instead, so it is no live signal of CALLS_FOR)
CALL_KINDS = ("samples", "verify", "self_ref", "p_true")


def calls_needed(signals: Sequence[str]) -> tuple[str, ...]:
    """The kinds of extra call the named signals need, in a fixed order."""
    kinds = {CALLS_FOR[s] for s in signals if s in CALLS_FOR}
    return tuple(k for k in CALL_KINDS if k in kinds)


def first_answer_logprob(token_logprobs: Sequence[Sequence[Any]] | None) -> float | None:
    """The log-prob of the first token that is not whitespace, from [[token, logprob], ...]."""
    for tok, lp in token_logprobs or ():
        if str(tok).strip():
            return None if lp is None else float(lp)
    return None


def from_calls(answer: str | None, calls: dict[str, Sequence[dict[str, Any]]],
               comparator: Comparator | None = None) -> dict[str, float]:
    """The live signals from the extra calls' outputs ({"text", "token_logprobs"} each):
    samples -> neg_semantic_entropy (the answer itself is the first sample), verify ->
    p_verify, self_ref -> self_ref, p_true (its verdict token's alternatives, `top_logprobs`)
    -> p_true. A signal that cannot be read is absent."""
    out: dict[str, float] = {}
    if calls.get("samples"):
        comp = comparator if comparator is not None else _default_comparator()
        se = semantic_entropy([answer] + [c.get("text") for c in calls["samples"]], comp)
        if se is not None:
            out["neg_semantic_entropy"] = -se
    if calls.get("verify"):
        p = verifier_probability([c.get("text") for c in calls["verify"]])
        if p is not None:
            out["p_verify"] = p
    if calls.get("self_ref"):
        c = calls["self_ref"][0]
        conf = self_ref_confidence(c.get("text"), first_answer_logprob(c.get("token_logprobs")))
        if conf is not None:
            out["self_ref"] = conf
    if calls.get("p_true"):
        p = p_true_from_top(calls["p_true"][0].get("top_logprobs"))
        if p is not None:
            out["p_true"] = p
    return out


def _default_comparator() -> Comparator:
    return CanonicalComparator("auto")
