"""Single model: every query goes to one tier, which always accepts.

The baseline every router is compared with, run through the same decision code.
Should that tier's call fail, the job falls back to the other tiers in portfolio
order (the rule of `router.cascade` for failed calls), like any other policy.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..attempt import Attempt, Query
from ..errors import PolicyError
from ..policy import Decision, Knob, Plan, Policy, TierInfo


class SingleModel(Policy):
    name = "single"
    summary = "send every query to one tier and accept its answer"
    knobs = (Knob("tier", "choice", "the tier that answers every query"),)

    def __init__(self, tiers: Sequence[TierInfo], tier: str | None = None):
        super().__init__(tiers)
        if tier is None:
            raise PolicyError("policy 'single' needs `tier`: the tier that answers every query")
        self.tier = self.tier_index(str(tier), "tier")
        self._order = (self.tier,) + tuple(t.index for t in self.tiers if t.index != self.tier)

    def plan(self, query: Query) -> Plan:
        return Plan(first=self.tier, allowed=self._order)

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        return Decision("accept", "single model" if attempts[-1].tier_index == self.tier else "fallback tier")

    def params(self) -> dict[str, Any]:
        return {"tier": self.tiers[self.tier].name}
