"""A job as every layer sees it: its status, and the codecs between its database row
and the decision core's types (Query, Plan, Attempt), in one place. The queue, the
store, the backends and the metrics share these; this module imports none of them.

    submit:  item -> worker.queue.admission.new_job_row (plan by router.core.cascade.start)
    stage:   row -> query_of / plan_of / attempt_from_row ... -> StageOutcome -> row
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from router.core.attempt import Attempt, Query
from router.core.policy import Plan
from router.core.portfolio import Portfolio
from worker.job.request import RESERVED
from worker.job.storable import clean_json, clean_text


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# Plain strings for SQL: a driver binds an enum member by its name, not its value.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (s.value for s in JobStatus)
OPEN = (QUEUED, RUNNING)
FINAL = (SUCCEEDED, FAILED, CANCELLED)
# the error of a job that expired: failed, because it was still open at its deadline
EXPIRED = "expired: still unfinished at its deadline"


def query_of(job_id: str, inp: dict[str, Any]) -> Query:
    """The query a policy sees, from a job's stored input."""
    return Query(id=str(inp.get("id", job_id)), prompt=inp["prompt"], category=inp.get("category"),
                 meta={k: v for k, v in inp.items() if k not in RESERVED},
                 messages=tuple(inp.get("messages") or ()), params=inp.get("params") or {})


def plan_to_row(plan: Plan) -> dict[str, Any]:
    return {"first": plan.first, "allowed": None if plan.allowed is None else list(plan.allowed), "note": plan.note}


def plan_of(row: dict[str, Any] | None) -> Plan:
    p = row or {}
    allowed = p.get("allowed")
    return Plan(first=p["first"], allowed=None if allowed is None else tuple(allowed), note=p.get("note", ""))


def failed_job_row(job_id: str, item_key: str | None, seq: int, portfolio: Portfolio, error: str) -> dict[str, Any]:
    """An input line that cannot be a job, kept as a failed job naming the problem."""
    return {"id": job_id, "item_key": item_key, "seq": seq, "portfolio": portfolio.digest, "input": {"line": seq},
            "status": FAILED, "error": error}


def attempt_from_row(r: dict[str, Any]) -> Attempt:
    return Attempt(
        tier=r["tier"], tier_index=r["tier_index"], model=r["model"], text=r["answer"],
        signals=r["signals"] or {}, cost_usd=r["cost_usd"], latency_ms=r["latency_ms"],
        tokens_in=r["tokens_in"], tokens_out=r["tokens_out"], error=r["error"],
    )


@dataclass
class StageOutcome:
    """One job's result at one tier: its attempt, and what the policy decided."""

    job_id: str
    batch_id: str | None
    step: int
    attempt: Attempt
    decision: str  # accept | escalate | reject
    reason: str
    meta: dict[str, Any]
    next_tier: str | None = None
    final_answer: str | None = None
    final_tier: str | None = None
    total_cost: float = 0.0
    error: str | None = None
    top_tier_cost: float = 0.0  # a final outcome: what calling only the top tier would have cost (metrics)
    call_id: int | None = None  # its model call's row (model_calls), finished with the record

    def unstorable(self, why: str) -> StageOutcome:
        """This outcome with what the database refused taken out: the job fails, and its
        attempt (tokens, cost, latency) is still recorded."""
        a = self.attempt
        error = f"the answer could not be stored: {why.splitlines()[0][:500]}"
        bare = Attempt(a.tier, a.tier_index, a.model[:200], None, {}, a.cost_usd, a.latency_ms, None, None, error=error)
        return StageOutcome(self.job_id, self.batch_id, self.step, bare, "reject", error,
                            {"unstorable": True},
                            total_cost=self.total_cost, error=error, call_id=self.call_id)

    def attempt_row(self, t: datetime) -> dict[str, Any]:
        """The attempt as a row the database accepts whatever the model sent back
        (a NUL in the answer, a NaN signal): cleaned, never refused with its cost."""
        a = self.attempt
        signals = {k: v for k, v in clean_json(dict(a.signals)).items() if v is not None}
        return {
            "job_id": self.job_id, "tier": a.tier, "tier_index": a.tier_index, "step": self.step,
            "model": clean_text(a.model), "answer": clean_text(a.text), "signals": signals,
            "tokens_in": a.tokens_in, "tokens_out": a.tokens_out, "cost_usd": a.cost_usd,
            "latency_ms": clean_json(a.latency_ms), "decision": self.decision, "reason": clean_text(self.reason),
            "error": clean_text(a.error), "meta": clean_json(self.meta), "created_at": t,
        }
