"""Gatekeeper-style calibrated deferral (after Rabanser et al. 2025).

Gatekeeper fine-tunes the small model so that its confidence separates right
from wrong answers, then defers when confidence < tau. Fine-tuning the models is
not possible here (they are remote APIs or fixed local weights); what can be
trained is the calibration of each tier's confidence. Each tier's signal is
mapped to P(right) by an affine (Platt) calibration of its log-odds,
    P = sigmoid(a * logit(confidence) + b),
fitted on train rows (`cascade tune --policy gatekeeper`). Platt rather than
temperature scaling: temperature is the special case b = 0, and a tier whose
raw confidence is systematically over- or under-confident needs the shift b.
With every tier on one probability scale a single threshold `tau` serves the
whole chain: a tier accepts when its calibrated P(right) >= tau, the last tier
always. One knob instead of one per tier is what should hold on new traffic.

The log-odds of a confidence: p_true and first_token_prob are probabilities;
the log-prob signals are log-probabilities (p = exp(value)); other signals
(neg_entropy, n_tokens) are used as they are.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import ChainPolicy, Decision, Knob, TierInfo, finite_number
from ..signals import confidence_logit, get


def calibrated(signal: str, value: float, a: float, b: float) -> float:
    z = a * confidence_logit(signal, value) + b
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


class Gatekeeper(ChainPolicy):
    name = "gatekeeper"
    summary = "calibrated deferral: accept when the tier's Platt-calibrated P(right) >= one threshold tau"
    knobs = (
        Knob("tau", "float", "accept when the calibrated P(right) >= tau (one threshold for the chain)",
             low=0.0, high=1.0),
        Knob("chain", "tier_list", "the tiers climbed, cheapest first"),
        Knob("signal", "choice", "the confidence signal that is calibrated"),
        Knob("calibration", "choice", "per tier: [a, b] of sigmoid(a * logit(confidence) + b) (fitted on train)"),
    )

    def __init__(self, tiers: Sequence[TierInfo], tau: float = 0.5, chain: Sequence[str] | None = None,
                 signal: str = "p_true", calibration: Mapping[str, Sequence[float]] | None = None):
        super().__init__(tiers)
        self.signal = self.signal_name(signal)
        self.tau = finite_number(tau, "tau")
        self.chain = self.tier_list(list(chain) if chain is not None else [t.name for t in self.tiers])
        cal = dict(calibration or {})
        self.calibration: dict[int, tuple[float, float]] = {}
        for name, ab in cal.items():
            i = self.tier_index(name, "calibration for tier")
            if isinstance(ab, (str, Mapping)) or not isinstance(ab, Sequence) or len(ab) != 2:
                raise PolicyError(f"calibration for tier {name!r} must be [a, b], got {ab!r}")
            self.calibration[i] = (finite_number(ab[0], f"calibration a of tier {name!r}"),
                                   finite_number(ab[1], f"calibration b of tier {name!r}"))
        self.require_fitted(self.calibration, "calibration", "run `cascade tune --policy gatekeeper`")

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        cur = attempts[-1]
        later = self.rest_of_chain(cur)
        if not later:
            return Decision("accept", "last tier of the chain")
        value = get(cur.signals, self.signal)
        if value is None:
            return Decision("escalate", f"{self.signal} missing", next_tier=later[0])
        p = calibrated(self.signal, value, *self.calibration[cur.tier_index])
        if p >= self.tau:
            return Decision("accept", f"calibrated P(right)={p:.4g} >= tau={self.tau:.4g}", score=p)
        return Decision("escalate", f"calibrated P(right)={p:.4g} < tau={self.tau:.4g}", next_tier=later[0], score=p)

    def params(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "tau": self.tau,
            "chain": [self.tiers[i].name for i in self.chain],
            "calibration": {self.tiers[i].name: list(self.calibration[i]) for i in self.chain[:-1]},
        }

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        return f"tau={float(params['tau']):.4g} ({params['signal']}): " + " > ".join(params["chain"])
