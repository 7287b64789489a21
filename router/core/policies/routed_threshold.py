"""A pre-call router in front of a threshold cascade.

Before any call, the logistic router of `logistic_router.py` (per chain tier a
regression on the query's text predicting P(that tier answers correctly)) picks
where the query starts: the cheapest chain tier whose prediction reaches `alpha`,
else the tier with the highest prediction. From there the query climbs the rest
of the chain as in the threshold cascade: accepted at the first tier whose signal
reaches its threshold, the chain's last tier always accepts. So a question the
router expects the cheap tiers to miss goes straight to a dearer one and does not
pay for the calls it would have escalated from; one it expects them to answer
still has its answer checked. Tiers before the start are only a fallback should
the calls from the start on fail.

Params (JSON): signal, chain, thresholds (those of `threshold`), and router: the
logistic router's params (alpha, order = the chain, features, models), fitted by
`router.lab.tuners.routed_threshold` on train rows.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import Decision, Knob, Needs, Plan, Policy, TierInfo
from .logistic_router import LogisticRouter
from .threshold import ThresholdCascade


class RoutedThreshold(Policy):
    name = "routed-threshold"
    summary = "pre-call router picks the first tier of a threshold cascade (predictably hard queries skip cheap tiers)"
    knobs = ThresholdCascade.knobs + (
        Knob("router", "choice", "the logistic router's params (alpha, order = chain, features, models), fitted"),
    )

    def __init__(self, tiers: Sequence[TierInfo], router: Mapping[str, Any] | None = None, signal: str = "logprob",
                 thresholds: dict[str, float] | None = None, chain: Sequence[str] | None = None):
        super().__init__(tiers)
        self.cascade = ThresholdCascade(tiers, signal=signal, thresholds=thresholds, chain=chain)
        if not isinstance(router, Mapping):
            raise PolicyError("policy 'routed-threshold' needs `router`: the fitted logistic router's params "
                              "(fit them with `cascade tune --policy routed-threshold`)")
        self.router = LogisticRouter(tiers, **router)
        if self.router.order != self.cascade.chain:
            raise PolicyError(f"router.order {[self.tiers[i].name for i in self.router.order]} must be the chain "
                              f"{[self.tiers[i].name for i in self.cascade.chain]}")
        self.chain = self.cascade.chain

    def needs(self, tier: int) -> Needs:
        return self.cascade.needs(tier)

    def start_position(self, query: Query) -> tuple[int, float]:
        """Position in the chain where the query starts, and the router's prediction there."""
        return self.router.route(query)

    def plan(self, query: Query) -> Plan:
        pos, p = self.start_position(query)
        climb = self.chain[pos:]
        return Plan(first=climb[0], allowed=climb + self.chain[:pos], note=f"start {self.tiers[climb[0]].name} p={p:.3f}")

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        pos, _ = self.start_position(query)
        if attempts[-1].tier_index not in self.chain[pos:]:
            return Decision("accept", "fallback tier")
        return self.cascade.decide(query, attempts)

    def params(self) -> dict[str, Any]:
        return {**self.cascade.params(), "router": self.router.params()}

    @staticmethod
    def brief(params: Mapping[str, Any]) -> str:
        th = ", ".join(f"{t}>={v:.3g}" for t, v in params["thresholds"].items())
        return f"route alpha={float(params['router']['alpha']):.3g}; {params['signal']} {th}"
