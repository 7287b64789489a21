"""Driving a policy through one query: the rules every policy runs under.

The workers call `start` before the first call and `step` after each one; the
offline evaluator calls the very same two functions on recorded attempts. The
rules that do not belong to any one method live here, once:
- a failed call (backend error past its retries) falls back to the next allowed
  tier not tried yet, with the error as the reason; with none left the job fails;
- a policy may not send a query back to a tier it already tried, nor outside its
  plan: that is reported as a rejection naming the policy's mistake.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .attempt import Attempt, Query
from .errors import InternalError
from .policy import Decision, Plan, Policy


@dataclass(frozen=True)
class Start:
    tier: int
    plan: Plan


def _order(policy: Policy, plan: Plan) -> tuple[int, ...]:
    return plan.allowed if plan.allowed is not None else tuple(range(len(policy.tiers)))


def _checked(policy: Policy, plan: Plan) -> Start:
    order = _order(policy, plan)
    if plan.first not in order:
        raise InternalError(f"policy {policy.name}: first tier {plan.first} is outside its own plan {order}")
    return Start(plan.first, plan)


def start(policy: Policy, query: Query) -> Start:
    return _checked(policy, policy.plan(query))


def start_batch(policy: Policy, queries: Sequence[Query]) -> list[Start]:
    """`start` for every query of a batch, decided together where the policy can."""
    plans = policy.plan_batch(queries)
    if len(plans) != len(queries):
        raise InternalError(f"policy {policy.name}: {len(plans)} plans for {len(queries)} queries")
    return [_checked(policy, p) for p in plans]


def _untried_after(order: Sequence[int], tried: set[int], current: int) -> int | None:
    # the next allowed tier after the current one in the plan's order, else any untried one
    pos = order.index(current) if current in order else -1
    for t in list(order[pos + 1 :]) + list(order[: max(pos, 0)]):
        if t not in tried:
            return t
    return None


def step(policy: Policy, query: Query, plan: Plan, attempts: Sequence[Attempt]) -> Decision:
    """What to do after the last of `attempts` (in call order)."""
    if not attempts:
        raise InternalError("step() needs at least one attempt")
    order = _order(policy, plan)
    tried = {a.tier_index for a in attempts}
    last = attempts[-1]
    if not last.ok:
        nxt = _untried_after(order, tried, last.tier_index)
        if nxt is None:
            errors = "; ".join(f"{a.tier}: {a.error}" for a in attempts if not a.ok)
            return Decision("reject", f"every tier tried failed ({errors})")
        return Decision("escalate", f"fallback: {last.tier} failed: {last.error}", next_tier=nxt)
    ok_attempts = [a for a in attempts if a.ok]
    d = policy.decide(query, ok_attempts)
    if d.action == "escalate":
        if d.next_tier is None or d.next_tier in tried or d.next_tier not in order:
            return Decision("reject", f"policy {policy.name} asked to escalate to tier {d.next_tier}, "
                                      f"which is tried already or outside its plan {list(order)}")
    if d.action == "accept" and d.answer_from is not None:
        # answer_from indexes the successful attempts the policy saw; map it back
        chosen = ok_attempts[d.answer_from]
        d = Decision(d.action, d.reason, None, attempts.index(chosen), d.score, d.extra)
    return d


def final_attempt(attempts: Sequence[Attempt], decision: Decision) -> Attempt:
    return attempts[decision.answer_from if decision.answer_from is not None else -1]
