"""Admission: an accepted request becomes a queued job row with its plan. The
pre-call decision runs here, in the submitter, and a request a tier of the plan
cannot honour is refused before anything is written.

Budgets: a job reserves its maximum cost (`max_cost`: every tier its plan may call,
at the tier's price and token limits, extra calls included) when it is admitted;
`Admission` decides, with the tenant's admission lock held in the insert's
transaction (worker.store.jobs.JobStore.insert_jobs), which jobs fit in what the
tenant's budget leaves (budget - spent - reserved, reserved: the sum over its open
jobs). When a job finishes it stops counting as reserved, and a trigger moves its real
cost into the spend (migration 0003). So several submitters at once cannot overshoot:
spend stays within the budget, as far as the bound of a job's cost holds (exact for
the replay backend; for a priced backend a bound on the answer call, a token being at
least a byte; an estimate for the extra calls of live-signal policies)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import structlog

from router.core import cascade
from router.core.attempt import Query
from router.core.errors import UserError
from router.core.policy import Plan, Policy
from router.core.portfolio import Portfolio, Tier
from worker.job.codec import FAILED, QUEUED, failed_job_row, plan_to_row, query_of
from worker.job.request import RequestError
from worker.models.backends import backend_class
from worker.models.backends.base import Backend, answer_limit
from worker.models.extra_calls import extra_queries_bound

log = structlog.get_logger("cascade.admission")


class BudgetExhausted(UserError):
    """The tenant's budget cannot take this job's reservation (HTTP 402)."""


def new_job_row(job_id: str, item_key: str | None, seq: int, portfolio: Portfolio, data: dict[str, Any],
                start: cascade.Start | None = None, policy: Policy | None = None, version: int = 1) -> dict[str, Any]:
    """A queued job with its plan: the pre-call decision runs here, in the submitter,
    before the first stage is sent (or was made for the whole batch: `start`), by the
    portfolio's policy at `version` (the promoted one: Runtime.current_policy; 1, the
    file's, by default), whose number the plan keeps: every stage of the job asks that
    version. Raises RequestError when a tier the plan may use cannot honour the request
    (a parameter, a chat)."""
    query = query_of(job_id, data)
    policy = policy or portfolio.built_policy
    if start is None:
        start = cascade.start(policy, query)
    allowed = range(len(portfolio.tiers)) if start.plan.allowed is None else start.plan.allowed
    for i in allowed:
        tier = portfolio.tiers[i]
        refused = backend_class(tier.backend.kind).refuses(tier, query)
        if refused is not None:
            raise RequestError(refused, f"tier {tier.name!r} ({tier.backend.kind} backend) cannot honour it")
    # each tier's bound on the call a stage makes there: the stage's start writes its call record with
    # it in the same statement (worker.store.stages), so the stage needs no round trip of its own for it
    bounds = {portfolio.tiers[i].name: call_bound(portfolio.tiers[i], query) for i in allowed}
    return {"id": job_id, "item_key": item_key, "seq": seq, "portfolio": portfolio.digest, "input": data,
            "plan": {**plan_to_row(start.plan), "policy_version": version, "call_bounds": bounds}, "status": QUEUED,
            "current_tier": portfolio.tiers[start.tier].name,
            "reserved_usd": max_cost(portfolio, query, start.plan, policy, bounds)}


def call_bound(tier: Tier, query: Query) -> float:
    """The most one answer call of `tier` can cost for this query (the backend's bound,
    else the price's); 0.0 where no finite bound exists."""
    try:
        est = backend_class(tier.backend.kind).max_cost(tier, query)
    except Exception:  # noqa: BLE001 - a backend's own bound failed: the price's bound holds
        log.exception("admission.max_cost_failed", tier=tier.name)
        est = Backend.max_cost(tier, query)
    return float(est) if math.isfinite(est) else 0.0


def max_cost(portfolio: Portfolio, query: Query, plan: Plan, policy: Policy | None = None,
             bounds: dict[str, float] | None = None) -> float:
    """The most the job can cost: every tier its plan may call (a policy never calls a
    tier twice), each call at its backend's bound (`call_bound`; `bounds`: the answer
    calls' bounds by tier, already computed), and the extra calls the policy's live
    signals need at that tier."""
    allowed = range(len(portfolio.tiers)) if plan.allowed is None else plan.allowed
    policy = policy or portfolio.built_policy
    total = 0.0
    for i in allowed:
        tier = portfolio.tiers[i]
        total += bounds[tier.name] if bounds is not None else call_bound(tier, query)
        for q in extra_queries_bound(query, policy.needs(i), answer_limit(tier, query)):
            total += call_bound(tier, q)
    return total


def job_row(job_id: str, item_key: str | None, seq: int, portfolio: Portfolio, data: dict[str, Any] | None,
            error: str | None, where: str = "", start: cascade.Start | None = None, policy: Policy | None = None,
            version: int = 1) -> dict[str, Any]:
    """A batch item's row: queued, or failed naming the problem (a bad line, a
    parameter no tier of its plan can honour)."""
    if error is None:
        try:
            return new_job_row(job_id, item_key, seq, portfolio, data, start, policy, version)
        except RequestError as e:
            error = f"{where}{e}"
    return failed_job_row(job_id, item_key, seq, portfolio, error)


class Admission:
    """Which of one insert's jobs the tenant's budget admits, decided in the insert's
    transaction with the tenant's admission lock held (JobStore.insert_jobs calls it): each
    queued job in line order, while its reservation fits in what the budget leaves.

    `strict` (a single job): a job that does not fit raises BudgetExhausted, and nothing
    is written. Otherwise (a batch) it stops admitting: that job and every later one
    (`stopped`, carried from chunk to chunk) fail with the budget error. A tenant with no
    row has no budget, and nothing to reserve against."""

    def __init__(self, tenant: str, *, strict: bool = False, stopped: bool = False):
        self.tenant, self.strict, self.stopped_before = tenant, strict, stopped
        self.stopped = stopped
        self.rows: list[dict[str, Any]] = []  # the rows as the last call decided them

    def __call__(self, tenant: dict[str, Any] | None, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        self.stopped = self.stopped_before  # a transaction tried again decides again
        if tenant is None:
            self.rows = [{**r, "reserved_usd": 0.0} for r in rows]
            return self.rows
        budget = tenant["budget_usd"]
        left = math.inf if budget is None else budget - tenant["spent_usd"] - tenant["reserved_usd"]
        out = []
        for r in rows:
            need = float(r.get("reserved_usd") or 0.0)
            if r["status"] != QUEUED:
                out.append({**r, "reserved_usd": 0.0})
                continue
            if self.stopped or need > left + 1e-15:
                why = (f"tenant {self.tenant!r} has ${max(left, 0.0):.6g} of its ${budget:.6g} budget left "
                       f"(${tenant['spent_usd']:.6g} spent, ${tenant['reserved_usd']:.6g} reserved by open jobs); "
                       f"this job could cost up to ${need:.6g}")
                if self.strict:
                    raise BudgetExhausted(why)
                self.stopped = True
                out.append({**r, "status": FAILED, "plan": None, "current_tier": None, "reserved_usd": 0.0,
                            "error": f"line {r['seq']}: over budget: {why}"})
                continue
            left -= need
            out.append(r)
        self.rows = out
        return out
