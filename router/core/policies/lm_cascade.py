"""LM Cascades (Gupta et al., "Language Model Cascades: Token-level uncertainty
and beyond", ICLR 2024): defer from a tier by a score of its answer's token
log-probs.

Rules (`rule`), each compared with a per-tier threshold (accept when >=):
- "chow-sum": sum of the answer-token log-probs (signal sum_logprob), the
  sequence log-likelihood; longer answers score lower whatever their quality;
- "chow-average": their mean (mean_logprob), the length-normalised version;
- "chow-quantile": their `quantile`-quantile (0 = the least likely token,
  min_logprob; 0.1, 0.25, 0.5 = q10/q25/q50_logprob), which one doubtful
  token can pull down where a mean would hide it;
- "learned": the post-hoc deferral rule, a logistic regression per tier over
  the vector (min, q10, q25, q50, mean, sum of the token log-probs, number of
  tokens) giving P(this tier is right), fitted in the lab.
The signals come from `router.core.signals.from_tokens`, so the backend must
return token log-probs (declared in `needs`). A missing signal escalates.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import ChainPolicy, Decision, Knob, Needs, TierInfo, finite_number
from ..signals import get

QUANTILE_SIGNALS = {0.0: "min_logprob", 0.1: "q10_logprob", 0.25: "q25_logprob", 0.5: "q50_logprob"}
DEFERRAL_FEATURES = ("min_logprob", "q10_logprob", "q25_logprob", "q50_logprob", "mean_logprob", "sum_logprob",
                     "n_tokens")
RULES = ("chow-sum", "chow-average", "chow-quantile", "learned")


def rule_signal(rule: str, quantile: float | None = None) -> str | None:
    """The one signal a Chow rule compares (None for the learned rule)."""
    if rule == "chow-sum":
        return "sum_logprob"
    if rule == "chow-average":
        return "mean_logprob"
    if rule == "chow-quantile":
        if quantile not in QUANTILE_SIGNALS:
            raise PolicyError(f"chow-quantile: quantile must be one of {sorted(QUANTILE_SIGNALS)}, got {quantile!r}")
        return QUANTILE_SIGNALS[quantile]
    if rule == "learned":
        return None
    raise PolicyError(f"unknown deferral rule {rule!r}; known: {', '.join(RULES)}")


def deferral_score(model: Mapping[str, Any], signals: Mapping[str, float]) -> float | None:
    """P(right) of the learned rule, or None when a feature is missing."""
    xs = [get(signals, f) for f in DEFERRAL_FEATURES]
    if any(x is None for x in xs):
        return None
    z = model["bias"] + sum(w * x for w, x in zip(model["w"], xs))
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


class LMCascade(ChainPolicy):
    name = "lm-cascade"
    summary = "LM Cascades: defer on Chow-Sum / Chow-Average / Chow-Quantile of token log-probs, or a learned rule"
    knobs = (
        Knob("rule", "choice", "chow-sum, chow-average, chow-quantile or learned", choices=RULES),
        Knob("quantile", "choice", "for chow-quantile: 0 (min), 0.1, 0.25 or 0.5", choices=("0", "0.1", "0.25", "0.5")),
        Knob("thresholds", "per_tier_float", "per tier: accept when the rule's score >= threshold"),
        Knob("chain", "tier_list", "the tiers climbed, cheapest first"),
        Knob("models", "choice", "learned rule: per tier {bias, w} over the quantile vector (fitted by the tuner)"),
    )

    def __init__(self, tiers: Sequence[TierInfo], rule: str = "chow-average", quantile: float | None = None,
                 thresholds: Mapping[str, float] | None = None, chain: Sequence[str] | None = None,
                 models: Mapping[str, Mapping[str, Any]] | None = None):
        super().__init__(tiers)
        if quantile is not None:
            quantile = finite_number(quantile, "quantile")
        self.rule, self.quantile = rule, quantile if rule == "chow-quantile" else None
        self.signal_used = rule_signal(rule, quantile)
        self.chain = self.tier_list(list(chain) if chain is not None else [t.name for t in self.tiers])
        self.thresholds: dict[int, float] = {}
        for name, v in (thresholds or {}).items():
            self.thresholds[self.tier_index(name, "threshold for tier")] = finite_number(v, f"threshold for tier {name!r}")
        self.models: dict[int, dict[str, Any]] = {}
        for name, m in (models or {}).items():
            w = m.get("w") if isinstance(m, Mapping) else None
            if not isinstance(w, Sequence) or isinstance(w, str) or len(w) != len(DEFERRAL_FEATURES):
                raise PolicyError(f"models[{name!r}] must be {{bias, w}} with {len(DEFERRAL_FEATURES)} weights "
                                  f"({', '.join(DEFERRAL_FEATURES)})")
            self.models[self.tier_index(name, "model for tier")] = {
                "bias": finite_number(m.get("bias", 0.0), f"models[{name!r}].bias"),
                "w": [finite_number(x, f"models[{name!r}].w") for x in w]}
        need = [self.tiers[i].name for i in self.chain[:-1]
                if i not in self.thresholds or (rule == "learned" and i not in self.models)]
        if need:
            what = "a threshold and a fitted model" if rule == "learned" else "a threshold"
            raise PolicyError(f"policy 'lm-cascade': tier(s) {need} of the chain need {what} "
                              f"(run `cascade tune --policy lm-cascade`)")

    def needs(self, tier: int) -> Needs:
        names = DEFERRAL_FEATURES if self.signal_used is None else (self.signal_used,)
        return Needs(signals=names, logprobs=True)

    def score(self, tier: int, signals: Mapping[str, float]) -> float | None:
        if self.signal_used is None:
            return deferral_score(self.models[tier], signals)
        return get(signals, self.signal_used)

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        cur = attempts[-1]
        later = self.rest_of_chain(cur)
        if not later:
            return Decision("accept", "last tier of the chain")
        s = self.score(cur.tier_index, cur.signals)
        if s is None:
            return Decision("escalate", f"{self.rule}: token log-probs missing", next_tier=later[0])
        th = self.thresholds[cur.tier_index]
        if s >= th:
            return Decision("accept", f"{self.rule}={s:.4g} >= {th:.4g}", score=s)
        return Decision("escalate", f"{self.rule}={s:.4g} < {th:.4g}", next_tier=later[0], score=s)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "chain": [self.tiers[i].name for i in self.chain],
                               "thresholds": {self.tiers[i].name: self.thresholds[i] for i in self.chain[:-1]}}
        if self.quantile is not None:
            out["quantile"] = self.quantile
        if self.rule == "learned":
            out["models"] = {self.tiers[i].name: self.models[i] for i in self.chain[:-1]}
        return out

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        th = params["thresholds"]
        return f"{params['rule']}: " + " > ".join(f"{t}@{th[t]:.3g}" if t in th else t for t in params["chain"])
