"""Offline replay of a policy over recorded rows, step for step as a worker would.

Each call is answered from the record (exactly what the replay backend serves),
and the policy is driven through `router.cascade` like in the stage task.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from router.core import cascade
from router.core.attempt import Attempt
from router.core.errors import PortfolioError
from router.core.policy import Policy
from router.core.portfolio import Portfolio, Price
from router.core.records import Record, attempt_from_response


@dataclass(frozen=True)
class TierModel:
    name: str
    model: str
    price: Price = Price()


@dataclass
class Outcome:
    id: str
    status: str  # succeeded | failed
    final_tier: str | None
    final_model: str | None
    answer: str | None
    correct: float | None
    cost_usd: float
    latency_ms: float | None
    calls: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    error: str | None = None


def tiers_of(portfolio: Portfolio) -> list[TierModel]:
    """The (tier, recorded model) ladder of a replay portfolio."""
    out = []
    for t in portfolio.tiers:
        model = t.backend.options.get("model")
        if t.backend.kind != "replay" or not model:
            raise PortfolioError(f"tier {t.name!r}: offline simulation needs a replay backend with a model")
        out.append(TierModel(t.name, str(model), t.price))
    return out


def simulate_record(policy: Policy, tiers: Sequence[TierModel], record: Record) -> Outcome:
    query = record.query()
    begin = cascade.start(policy, query)
    attempts: list[Attempt] = []
    reasons: list[str] = []
    tier = begin.tier
    while True:
        tm = tiers[tier]
        attempts.append(
            attempt_from_response(tm.name, tier, tm.model, record.responses.get(tm.model), price=tm.price,
                                  signals=policy.needs(tier).signals)
        )
        d = cascade.step(policy, query, begin.plan, attempts)
        reasons.append(f"{tm.name}: {d.action} ({d.reason})")
        if d.action == "escalate":
            tier = d.next_tier
            continue
        cost = sum(a.cost_usd for a in attempts)
        lats = [a.latency_ms for a in attempts]
        latency = None if any(x is None for x in lats) else sum(lats)
        calls = [a.tier for a in attempts]
        if d.action == "reject":
            return Outcome(record.id, "failed", None, None, None, None, cost, latency, calls, reasons, d.reason)
        final = cascade.final_attempt(attempts, d)
        resp = record.responses.get(final.model)
        return Outcome(
            record.id, "succeeded", final.tier, final.model, final.text,
            None if resp is None else resp.correct, cost, latency, calls, reasons,
        )


def simulate(policy: Policy, tiers: Sequence[TierModel], records: Sequence[Record]) -> list[Outcome]:
    warm = getattr(policy, "warm", None)
    if warm is not None:  # a policy that embeds texts does so in one batch, not one call per decision
        warm([r.prompt for r in records] + [x.text for r in records for t in tiers
                                             if (x := r.responses.get(t.model)) is not None and x.text])
    return [simulate_record(policy, tiers, r) for r in records]
