"""Speculative cascades: the token-level deferral rules and the verdict on a drafted block.

Narasimhan et al., "Faster Cascades via Speculative Decoding" (ICLR 2025). A small
drafter proposes a block of tokens; a larger verifier scores the whole block in one
forward pass; at each position a deferral rule looks at the two next-token
distributions (q: drafter, p: verifier) and decides whether the token comes from the
drafter (keep its draft) or from the verifier (defer). The target distribution at a
position is q when the rule keeps and p when it defers; the draft is accepted where
the target's choice equals it, and the block ends at the first position where it
does not: the verifier's token replaces the draft there and the drafter starts
again from it.

The rules, with alpha the tier's knob (larger alpha: fewer deferrals for diff and
opt, more for chow):
- chow:   defer when max_v q(v) < 1 - alpha                        (drafter unsure)
- diff:   defer when max_v p(v) - max_v q(v) > alpha                (verifier surer)
- opt:    defer when max_v p(v) - max_v q(v) > alpha * TV(p, q)     (the paper's
          plug-in optimal rule: the gain in confidence must beat the cost of
          deferring, the chance TV(p, q) that the verifier's token differs from a
          draft of q, weighted by alpha)
- always: defer at every position: plain speculative decoding, whose greedy output
          is the verifier's greedy output token for token
- never:  defer nowhere: the drafter's greedy output

Greedy decoding only: a kept position emits the drafter's argmax (the draft itself),
a deferred one the verifier's argmax. Each emitted token carries its log-probability
under the distribution it was taken from (q when kept, p when deferred).

Pure numpy; the backend (worker/models/backends/speculative.py) runs the models.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from router.core.errors import UserError

RULES: dict[str, str] = {
    "chow": "defer when the drafter's top probability < 1 - alpha",
    "diff": "defer when the verifier's top probability exceeds the drafter's by more than alpha",
    "opt": "defer when the verifier's top probability exceeds the drafter's by more than alpha * TV(p, q)",
    "always": "defer at every token (plain speculative decoding: the verifier's greedy output)",
    "never": "defer at no token (the drafter's greedy output)",
}


class SpeculativeError(UserError):
    """A deferral rule or its parameter that cannot be used."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities (float64) of logits shaped (vocab,) or (n, vocab)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def tv_distance(q: np.ndarray, p: np.ndarray) -> float:
    """Total variation distance of two distributions: sum_v max(0, q(v) - p(v))."""
    return float(np.maximum(0.0, np.asarray(q) - np.asarray(p)).sum())


@dataclass(frozen=True)
class DeferralRule:
    name: str
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in RULES:
            near = difflib.get_close_matches(self.name, list(RULES), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(RULES)}"
            raise SpeculativeError(f"unknown deferral rule {self.name!r}{hint}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise SpeculativeError(f"deferral rule {self.name!r}: alpha must be a finite number, got {self.alpha!r}")
        if self.name == "chow" and not 0.0 <= self.alpha <= 1.0:
            raise SpeculativeError(f"deferral rule 'chow': alpha must be in [0, 1] (defer when the drafter's top "
                                   f"probability < 1 - alpha), got {self.alpha}")
        if self.name == "opt" and self.alpha < 0:
            raise SpeculativeError(f"deferral rule 'opt': alpha is the weight of the deferral cost and must be "
                                   f">= 0, got {self.alpha}")

    def defers(self, q: np.ndarray, p: np.ndarray) -> bool:
        """Whether to take this position's token from the verifier; q, p are probabilities."""
        if self.name == "always":
            return True
        if self.name == "never":
            return False
        q_top = float(np.max(q))
        if self.name == "chow":
            return q_top < 1.0 - self.alpha
        gain = float(np.max(p)) - q_top
        if self.name == "diff":
            return gain > self.alpha
        return gain > self.alpha * tv_distance(q, p)


@dataclass(frozen=True)
class Position:
    """One emitted token of a block."""

    token: int
    draft: int  # the drafter's token at this position
    deferred: bool  # the rule took this position's token from the verifier
    logprob: float  # of `token` under the distribution it was taken from
    logprobs: np.ndarray  # that whole distribution (log-probabilities), for top-k alternatives

    @property
    def corrected(self) -> bool:
        """The verifier's token replaced the draft: the block ends here."""
        return self.token != self.draft


def decide_block(q_logprobs: np.ndarray, p_logprobs: np.ndarray, rule: DeferralRule,
                 drafts: Sequence[int] | None = None) -> list[Position]:
    """The tokens a drafted block yields, in order, up to and including the first correction.

    Row i of q_logprobs / p_logprobs is the drafter's / verifier's next-token
    distribution after the prompt and the block's first i drafted tokens; drafts[i]
    is the drafter's token there (default: the argmax of q, i.e. greedy drafting).
    """
    q_all = np.atleast_2d(np.asarray(q_logprobs, dtype=np.float64))
    p_all = np.atleast_2d(np.asarray(p_logprobs, dtype=np.float64))
    if q_all.shape != p_all.shape:
        raise SpeculativeError(f"drafter and verifier distributions differ in shape: {q_all.shape} vs {p_all.shape} "
                               f"(the two models must share one vocabulary)")
    if drafts is None:
        drafts = [int(i) for i in q_all.argmax(axis=1)]
    if len(drafts) != len(q_all):
        raise SpeculativeError(f"{len(drafts)} drafted tokens for {len(q_all)} positions")
    out: list[Position] = []
    for q_lp, p_lp, draft in zip(q_all, p_all, drafts):
        draft = int(draft)
        if rule.defers(np.exp(q_lp), np.exp(p_lp)):
            token = int(np.argmax(p_lp))
            out.append(Position(token, draft, True, float(p_lp[token]), p_lp))
        else:
            out.append(Position(draft, draft, False, float(q_lp[draft]), q_lp))
        if out[-1].corrected:
            break
    return out
