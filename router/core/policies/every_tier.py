"""Every tier: call each tier in turn and accept the last one's answer.

Not a router: it is the job plan of calibration (`cascade calibrate`), which needs
every tier's answer to the same request, recorded like any other job's attempts
(costed, resumable, signals kept). A portfolio's own tiers and backends run it
unchanged; only the policy differs. `tiers` narrows the calls (e.g. every tier but
the top one, whose answer is already stored); `signals` declares the confidence
signals the backends must return so they are recorded for tuning.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..attempt import Attempt, Query
from ..policy import Decision, Needs, Plan, Policy, TierInfo


class EveryTier(Policy):
    name = "every-tier"
    summary = "calibration: call every tier in order and accept the last answer (not a router)"

    def __init__(self, tiers: Sequence[TierInfo], tiers_called: Sequence[str] | None = None,
                 signals: Sequence[str] = ()):
        super().__init__(tiers)
        self.order = (self.tier_list(tiers_called, "tiers_called") if tiers_called is not None
                      else tuple(t.index for t in self.tiers))
        self.signals = tuple(self.signal_name(s) for s in signals)

    def needs(self, tier: int) -> Needs:
        return Needs(signals=self.signals)

    def plan(self, query: Query) -> Plan:
        return Plan(first=self.order[0], allowed=self.order)

    def decide(self, query: Query, attempts: Sequence[Attempt]) -> Decision:
        pos = self.order.index(attempts[-1].tier_index)
        if pos + 1 < len(self.order):
            return Decision("escalate", "calibration: every tier answers", next_tier=self.order[pos + 1])
        return Decision("accept", "calibration: last tier")

    def params(self) -> dict[str, Any]:
        return {"tiers_called": [self.tiers[i].name for i in self.order], "signals": list(self.signals)}
