"""/v1/jobs: submit one request (202 + Location; an Idempotency-Key returns the same
job), read it (status, answer, tier, cost, attempts with signals, decision, reason;
`?wait=S` long-polls until it finishes), cancel it."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from worker.service.api.common import admits_in_handler, admitted, caller, not_found
from worker.service.client import Client, JobNotFound
from worker.store.notify import JOB_CHANNEL


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    system: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stop: str | list[str] | None = None


class JobCreate(BaseModel):
    """A prompt or chat messages, run through a portfolio (default `cascade/default`)."""
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[Message] | None = None
    params: Params | None = None
    portfolio: str | None = Field(None, description="a portfolio name from GET /v1/models")
    metadata: dict[str, Any] | None = None
    priority: Literal["interactive", "batch"] = "interactive"


class Attempt(BaseModel):
    tier: str
    model: str
    answer: str | None
    signals: dict[str, float]
    decision: str
    reason: str
    error: str | None
    cost_usd: float
    latency_ms: float | None
    tokens_in: int | None
    tokens_out: int | None


class Job(BaseModel):
    id: str
    status: str
    answer: str | None
    tier: str | None
    cost_usd: float
    error: str | None
    batch_id: str | None
    custom_id: str | None
    priority: str | None
    metadata: dict[str, Any]
    current_tier: str | None
    created_at: str | None
    finished_at: str | None
    attempts: list[Attempt]


router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _get(c: Client, job_id: str) -> dict:
    try:
        return c.get(job_id)
    except JobNotFound:
        raise not_found("job", job_id) from None


@router.post("", status_code=202, response_model=Job)
@admits_in_handler
def create_job(request: Request, body: JobCreate, response: Response,
               idempotency_key: str | None = Header(None, max_length=200)) -> dict:
    c = admitted(request)  # on the handler's own trip to the thread pool
    d = body.model_dump(exclude_none=True)
    job_request = {k: d[k] for k in ("prompt", "messages", "params") if k in d}
    sub = c.submitter.submit(job_request, portfolio=body.portfolio, tenant=c.tenant, idempotency_key=idempotency_key,
                             priority=body.priority, metadata=body.metadata, budgeted=c.budgeted)
    response.headers["Location"] = f"/v1/jobs/{sub.job_id}"
    if not sub.created:
        response.status_code = 200
    return _get(c, sub.job_id)


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, c: Client = Depends(caller),
                  wait: float = Query(0, ge=0, le=60, description="seconds to wait for the job to finish")) -> dict:
    if wait > 0:
        try:
            await c.waiter.wait_async(JOB_CHANNEL, job_id, lambda: c._final(job_id), wait)
        except JobNotFound:
            raise not_found("job", job_id) from None
    return await run_in_threadpool(_get, c, job_id)


@router.post("/{job_id}/cancel", response_model=Job)
def cancel_job(job_id: str, c: Client = Depends(caller)) -> dict:
    try:
        c.cancel(job_id)
    except JobNotFound:
        raise not_found("job", job_id) from None
    return _get(c, job_id)
