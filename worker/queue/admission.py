"""Admission: an accepted request becomes a queued job row with its plan. The
pre-call decision runs here, in the submitter, and a request a tier of the plan
cannot honour is refused before anything is written."""
from __future__ import annotations

from typing import Any

from router.core import cascade
from router.core.portfolio import Portfolio
from worker.job.codec import QUEUED, failed_job_row, plan_to_row, query_of
from worker.job.request import RequestError
from worker.models.backends import backend_class


def new_job_row(job_id: str, item_key: str | None, seq: int, portfolio: Portfolio, data: dict[str, Any],
                start: cascade.Start | None = None) -> dict[str, Any]:
    """A queued job with its plan: the pre-call decision runs here, in the submitter,
    before the first stage is sent (or was made for the whole batch: `start`). Raises
    RequestError when a tier the plan may use cannot honour the request (a parameter, a chat)."""
    query = query_of(job_id, data)
    if start is None:
        start = cascade.start(portfolio.built_policy, query)
    allowed = range(len(portfolio.tiers)) if start.plan.allowed is None else start.plan.allowed
    for i in allowed:
        tier = portfolio.tiers[i]
        refused = backend_class(tier.backend.kind).refuses(tier, query)
        if refused is not None:
            raise RequestError(refused, f"tier {tier.name!r} ({tier.backend.kind} backend) cannot honour it")
    return {"id": job_id, "item_key": item_key, "seq": seq, "portfolio": portfolio.digest, "input": data,
            "plan": plan_to_row(start.plan), "status": QUEUED, "current_tier": portfolio.tiers[start.tier].name}


def job_row(job_id: str, item_key: str | None, seq: int, portfolio: Portfolio, data: dict[str, Any] | None,
            error: str | None, where: str = "", start: cascade.Start | None = None) -> dict[str, Any]:
    """A batch item's row: queued, or failed naming the problem (a bad line, a
    parameter no tier of its plan can honour)."""
    if error is None:
        try:
            return new_job_row(job_id, item_key, seq, portfolio, data, start)
        except RequestError as e:
            error = f"{where}{e}"
    return failed_job_row(job_id, item_key, seq, portfolio, error)
