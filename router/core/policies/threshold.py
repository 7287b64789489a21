"""Threshold cascade: climb the chain, accept at the first tier whose confidence
signal reaches that tier's threshold; the last tier of the chain always accepts."""
from __future__ import annotations

import math
from typing import Any, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import ChainPolicy, Decision, Knob, TierInfo
from ..signals import get


class ThresholdCascade(ChainPolicy):
    name = "threshold"
    summary = "sequential cascade: accept when the tier's confidence signal >= its threshold"
    knobs = (
        Knob("thresholds", "per_tier_float", "per tier: accept when signal >= threshold"),
        Knob("chain", "tier_list", "the tiers climbed, cheapest first (default: all, in portfolio order)"),
        Knob("signal", "choice", "the confidence signal compared with the thresholds"),
    )

    def __init__(
        self,
        tiers: Sequence[TierInfo],
        signal: str = "logprob",
        thresholds: dict[str, float] | None = None,
        chain: Sequence[str] | None = None,
    ):
        super().__init__(tiers)
        self.signal = self.signal_name(signal)
        self.chain = self.tier_list(list(chain) if chain is not None else [t.name for t in self.tiers])
        self.thresholds: dict[int, float] = {}
        for name, value in (thresholds or {}).items():
            idx = self.tier_index(name, "threshold for tier")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise PolicyError(f"threshold for tier {name!r} must be a number, got {value!r}") from None
            if math.isnan(v):
                raise PolicyError(f"threshold for tier {name!r} is NaN")
            self.thresholds[idx] = v
        self.require_fitted(self.thresholds, "threshold", "set `threshold = ...` on the tier or policy.thresholds")

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        cur = attempts[-1]
        later = self.rest_of_chain(cur)
        if not later:
            return Decision("accept", "last tier of the chain")
        nxt = later[0]
        value = get(cur.signals, self.signal)
        th = self.thresholds[cur.tier_index]
        if value is None:
            return Decision("escalate", f"{self.signal} missing", next_tier=nxt)
        if value >= th:
            return Decision("accept", f"{self.signal}={value:.4g} >= {th:.4g}", score=value)
        return Decision("escalate", f"{self.signal}={value:.4g} < {th:.4g}", next_tier=nxt, score=value)

    def params(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "thresholds": {self.tiers[i].name: v for i, v in sorted(self.thresholds.items()) if i in self.chain[:-1]},
            "chain": [self.tiers[i].name for i in self.chain],
        }
