"""OpenAI-compatible: POST /v1/chat/completions (`stream=true` included) and GET
/v1/models. `model` names a portfolio (`cascade/default`, ...); the answer is the
cascade's, and the `cascade` extension field says which tier answered, its attempts
and the cost (worker.service.openai_format)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from worker.job.codec import FINAL
from worker.queue.dispatch import INTERACTIVE
from worker.queue.submit import Submission
from worker.service.api.common import admits_in_handler, admitted, caller, error_response, service
from worker.service.api.jobs import Message
from worker.service.api.reads import JobReads
from worker.service.client import Client
from worker.service.openai_format import chat_request, chunks, completion

# how long a chat completion waits for its job before answering 504 (the job goes on)
WAIT_S = 300.0


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a portfolio name, e.g. cascade/default (GET /v1/models)")
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    n: Literal[1] | None = None


router = APIRouter(tags=["openai"])


@router.get("/v1/models")
def models(c: Client = Depends(caller)) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "cascade"}
                                       for name in c.catalog.names()]}


@router.post("/v1/chat/completions")
@admits_in_handler
async def chat_completions(request: Request, body: ChatCompletionRequest,
                           idempotency_key: str | None = Header(None, max_length=200)):
    loop = asyncio.get_running_loop()
    waiter = service(request).waiter
    # subscribed to the job's completion before its row is written: no read before the notice comes;
    # made here, on the loop, so that it is closed below even if this request is cancelled mid-way
    reads = JobReads(waiter.listener() if waiter.listens else None, loop, request.app.state.reads)
    try:
        # the caller admitted, then its job written and sent, on one trip to the thread pool
        c, model, sub = await run_in_threadpool(_submit, request, body, idempotency_key, reads)
        deadline = loop.time() + WAIT_S
        job = await reads.now() if not sub.created or sub.status in FINAL else None
        while job is None or job["status"] not in FINAL:
            left = deadline - loop.time()
            if left <= 0:
                # the answer names the job: it must outlive a crash from now on
                await run_in_threadpool(c.jobs.make_durable, sub.job_id)
                return error_response(504, f"job {sub.job_id} is not finished after {WAIT_S:.0f}s; "
                                           f"GET /v1/jobs/{sub.job_id} for its result", type_="timeout",
                                      code="timeout")
            job = await reads.next(left)  # read after its notice, or once out of time
    finally:
        reads.close()
    if job["status"] != "succeeded":
        return error_response(502, f"job {job['id']} {job['status']}: {job['error']}", type_="cascade_error",
                              code=f"job_{job['status']}")
    if body.stream:
        lines = [f"data: {json.dumps(ch)}\n\n" for ch in chunks(job, model)] + ["data: [DONE]\n\n"]
        return StreamingResponse(iter(lines), media_type="text/event-stream")
    return JSONResponse(completion(job, model))


def _submit(request: Request, body: ChatCompletionRequest, idempotency_key: str | None,
            reads: JobReads) -> tuple[Client, str, Submission]:
    """In the thread pool: the caller admitted (401, 402, 429 before anything is written
    or said about the request), the model known (a 404 naming it), then the job committed
    and its first stage sent. The job's id reaches the caller only with its result (or a
    504 that makes it durable first): `awaited` (Submitter.submit: without an
    Idempotency-Key its insert does not wait for the disk)."""
    c = admitted(request)
    model, job_request = chat_request(body.model_dump(exclude_none=True))
    c.catalog.get(model)
    return c, model, c.submitter.submit(job_request, portfolio=model, tenant=c.tenant,
                                        idempotency_key=idempotency_key, priority=INTERACTIVE,
                                        metadata=body.metadata, budgeted=c.budgeted,
                                        before_insert=lambda job_id: reads.subscribe(
                                            job_id, lambda: c.get(job_id), lambda n: c.from_notice(job_id, n)),
                                        awaited=True)
