"""/v1/batches: a JSONL body streamed in (our lines, or OpenAI Batch input lines
{custom_id, method, url, body}), never held whole in memory: parsed and committed a
chunk at a time; a bad line is a failed item naming its line and field. Read back:
counts by status, cost so far, share answered per tier; results and errors streamed
as JSONL in the OpenAI Batch output shape; cancel; an optional completion window and
webhook (worker.service.webhooks)."""
from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any, Iterator

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from worker.job.request import RequestError
from worker.queue.items import Item, read_line, too_long
from worker.service.api.common import ApiError, caller, not_found, submitter
from worker.service.client import Client, JobNotFound
from worker.service.openai_format import batch_line, batch_output, is_openai_line
from worker.store.schema import now

router = APIRouter(prefix="/v1/batches", tags=["batches"])
CHUNK = 1000
MAX_LINE = 1 << 20
_WINDOW = re.compile(r"^(\d{1,6})([smhd])$")


def window(text: str | None) -> timedelta | None:
    if text is None:
        return None
    m = _WINDOW.match(text)
    if not m or int(m.group(1)) == 0:
        raise ApiError(400, "completion_window must look like 30s, 15m, 24h or 7d", param="completion_window")
    return timedelta(seconds=int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


def parse_line(n: int, line: bytes, model: str) -> tuple[int, Any]:
    """(line number, parsed record or an Item naming why the line cannot be one): read
    as `cascade run` reads a line (worker.queue.items.read_line), never raising."""
    raw = read_line(n, line, f"line {n}", MAX_LINE)
    if isinstance(raw, Item) or not is_openai_line(raw):
        return n, raw
    try:
        return n, batch_line(raw, model)
    except RequestError as e:
        return n, Item(f"line-{n}", n, error=f"line {n}: {e}")


def _view(c: Client, batch_id: str) -> dict:
    try:
        v = c.batch(batch_id)
    except JobNotFound:
        raise not_found("batch", batch_id) from None
    b = c.batches.batch(batch_id)
    v.update(expires_at=b["expires_at"].isoformat() if b["expires_at"] else None, webhook=b["webhook_state"])
    return v


@router.post("", status_code=202)
async def create_batch(request: Request, response: Response, c: Client = Depends(submitter),
                       model: str = Query("cascade/default", description="the portfolio every line runs through"),
                       completion_window: str | None = Query(None, description="e.g. 24h: unfinished jobs expire then"),
                       webhook_url: str | None = Query(None, pattern=r"^https?://", max_length=2000)) -> dict:
    """The body is JSONL (one request per line), read as it arrives."""
    c.catalog.get(model)
    expires = window(completion_window)
    writer = await run_in_threadpool(c.submitter.open_batch, portfolio=model, tenant=c.tenant)
    if expires is not None or webhook_url:
        await run_in_threadpool(request.app.state.webhooks.set_batch_options, writer.batch_id,
                                expires_at=None if expires is None else now() + expires, webhook_url=webhook_url)
    try:
        await _read_body(request, writer, model)
    except BaseException:
        # an upload cut short (the client gone): its jobs are not left half-run, and a
        # batch that got no line is not left behind at all
        await run_in_threadpool(writer.abandon, "cancelled: the upload did not complete")
        raise
    await run_in_threadpool(writer.close)
    response.headers["Location"] = f"/v1/batches/{writer.batch_id}"
    return await run_in_threadpool(_view, c, writer.batch_id)


async def _read_body(request: Request, writer, model: str) -> None:
    """Lines as they arrive, committed CHUNK lines at a time (whatever the network's
    framing, so the same upload is always cut at the same lines). A line longer than
    MAX_LINE fails alone: its bytes are dropped as they come, never held."""
    buf: list[tuple[int, Any]] = []
    pending = b""
    n = 0
    skipping = False  # inside a line longer than MAX_LINE, until its end
    async for part in request.stream():
        pending += part
        *lines, pending = pending.split(b"\n")
        for line in lines:
            n += 1
            if skipping:
                buf.append((n, too_long(n, None, f"line {n}", MAX_LINE)))
                skipping = False
            elif line.strip():
                buf.append(parse_line(n, line, model))
            if len(buf) >= CHUNK:
                await run_in_threadpool(writer.add, buf)
                buf = []
        if len(pending) > MAX_LINE:
            skipping, pending = True, b""
    if skipping:
        n += 1
        buf.append((n, too_long(n, None, f"line {n}", MAX_LINE)))
    elif pending.strip():
        n += 1
        buf.append(parse_line(n, pending, model))
    await run_in_threadpool(writer.add, buf)


@router.get("/{batch_id}")
def get_batch(batch_id: str, c: Client = Depends(caller)) -> dict:
    return _view(c, batch_id)


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: str, c: Client = Depends(caller)) -> dict:
    _view(c, batch_id)
    c.cancel_batch(batch_id)
    return _view(c, batch_id)


def _lines(c: Client, batch_id: str, model: str, errors: bool) -> Iterator[bytes]:
    for job in c.results(batch_id):
        if job["status"] in ("queued", "running") or (job["status"] != "succeeded") != errors:
            continue
        yield (json.dumps(batch_output(job, model), ensure_ascii=False) + "\n").encode()


def _stream(c: Client, batch_id: str, errors: bool) -> StreamingResponse:
    _view(c, batch_id)
    digest = c.batches.batch(batch_id)["portfolio"]
    model = next((n for n in c.catalog.names() if c.catalog.get(n).digest == digest), digest)
    return StreamingResponse(_lines(c, batch_id, model, errors), media_type="application/x-ndjson")


@router.get("/{batch_id}/results", response_class=StreamingResponse)
def batch_results(batch_id: str, c: Client = Depends(caller)):
    """The finished jobs that succeeded, as OpenAI Batch output lines (JSONL)."""
    return _stream(c, batch_id, errors=False)


@router.get("/{batch_id}/errors", response_class=StreamingResponse)
def batch_errors(batch_id: str, c: Client = Depends(caller)):
    """The finished jobs that failed, were cancelled or expired, as OpenAI Batch error lines."""
    return _stream(c, batch_id, errors=True)
