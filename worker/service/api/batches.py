"""/v1/batches, OpenAI's Batch API and a streamed upload:

- `POST /v1/batches` with a JSON body ({input_file_id, endpoint, completion_window,
  metadata}, Content-Type application/json): a batch of the lines of a file uploaded
  to /v1/files, read from the store a chunk at a time;
- `POST /v1/batches` with any other body (JSONL: application/jsonl, application/x-ndjson,
  text/plain or none): the lines streamed in (ours, or OpenAI Batch input lines),
  never held whole in memory, query parameters model, completion_window, webhook_url.

Both cut lines and commit them CHUNK at a time through the same code (LineCutter,
BatchWriter); a bad line is a failed job naming its line and field, in the error file,
never a failed batch. Read back as OpenAI's batch object (list, retrieve, cancel), with
the project's counts, cost, per-tier figures and decisions taken without their signal
under `cascade`; results and errors as JSONL in the OpenAI Batch output shape (the
batch's output and error files, worker.service.api.files)."""
from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any, Iterable, Iterator

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from worker.job.request import RequestError
from worker.job.storable import storable
from worker.queue.items import Item, read_line, too_long
from worker.service.api.common import ApiError, caller, not_found, submitter
from worker.service.client import Client, JobNotFound
from worker.service.openai_format import CHAT_URL, batch_line, batch_object, batch_output, is_openai_line
from worker.service.views import batch_view
from worker.store.files import FileStore
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
        # the error file names the line by its custom_id, as the caller matches results by it
        cid = raw.get("custom_id")
        key = cid if isinstance(cid, str) and cid and len(cid) <= 200 and not storable(cid) else f"line-{n}"
        return n, Item(key, n, error=f"line {n}: {e}")


class BatchCreate(BaseModel):
    """OpenAI's batch request: a file uploaded to /v1/files with purpose `batch`."""
    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(..., max_length=200)
    endpoint: str = Field(..., max_length=200)
    completion_window: str = Field("24h", max_length=20)
    metadata: dict[str, str] | None = None
    webhook_url: str | None = Field(None, pattern=r"^https?://", max_length=2000)


MAX_CREATE_BODY = 1 << 20


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


@router.post("", status_code=202)
async def create_batch(request: Request, response: Response, c: Client = Depends(submitter),
                       model: str = Query("cascade/default", description="streamed upload: the portfolio every "
                                          "line runs through"),
                       completion_window: str | None = Query(None, description="streamed upload, e.g. 24h: "
                                                             "unfinished jobs expire then"),
                       webhook_url: str | None = Query(None, pattern=r"^https?://", max_length=2000)) -> dict:
    """Content-Type application/json: OpenAI's batch request ({input_file_id, endpoint,
    completion_window, metadata}). Any other: the body is JSONL (one request per line),
    read as it arrives."""
    if _is_json(request):
        body = await _create_body(request)
        batch_id = await run_in_threadpool(_from_file, request, c, body)
    else:
        batch_id = await _from_stream(request, c, model, completion_window, webhook_url)
    response.headers["Location"] = f"/v1/batches/{batch_id}"
    return await run_in_threadpool(_object, c, batch_id)


async def _create_body(request: Request) -> BatchCreate:
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_CREATE_BODY:
            raise ApiError(413, "a batch request body is at most 1 MiB: the lines go in a file (POST /v1/files)",
                           param="body")
    try:
        return BatchCreate.model_validate_json(raw or b"{}")
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _first_model(c: Client, file_id: str) -> str:
    """The portfolio the batch runs: the body.model of the file's first OpenAI line that
    names one (a later line naming another fails alone); else cascade/default."""
    head = next(iter(FileStore(c.settings.db_url).chunks(file_id)), b"")
    for line in head.split(b"\n")[:-1] or head.split(b"\n"):
        try:
            raw = json.loads(line)
        except ValueError:
            continue
        if is_openai_line(raw) and isinstance(raw["body"], dict) and isinstance(raw["body"].get("model"), str):
            return raw["body"]["model"]
    return "cascade/default"


def _from_file(request: Request, c: Client, body: BatchCreate) -> str:
    if body.endpoint != CHAT_URL:
        raise ApiError(400, f"endpoint must be {CHAT_URL} (the one this service runs), got {body.endpoint!r}",
                       param="endpoint")
    expires = window(body.completion_window)
    files = FileStore(c.settings.db_url)
    f = files.file(body.input_file_id, c.tenant)
    if f is None:
        raise not_found("file", body.input_file_id) from None
    if f["purpose"] != "batch":
        raise ApiError(400, f"file {body.input_file_id!r} has purpose {f['purpose']!r}, not 'batch'",
                       param="input_file_id")
    model = _first_model(c, f["id"])
    c.catalog.get(model)
    writer = c.submitter.open_batch(portfolio=model, tenant=c.tenant, source=f"file:{f['id']}")
    c.batches.set_request(writer.batch_id, {"input_file_id": f["id"], "endpoint": body.endpoint,
                                            "completion_window": body.completion_window,
                                            "metadata": body.metadata, "model": model})
    request.app.state.webhooks.set_batch_options(writer.batch_id, expires_at=now() + expires,
                                                 webhook_url=body.webhook_url)
    try:
        _submit_lines(writer, files.chunks(f["id"]), model)
    except BaseException:
        writer.abandon("cancelled: the batch could not be submitted")
        raise
    writer.close()
    return writer.batch_id


def _submit_lines(writer, parts: Iterable[bytes], model: str) -> None:
    cut, buf = LineCutter(model), []
    for part in parts:
        buf += cut.feed(part)
        while len(buf) >= CHUNK:  # CHUNK lines at a time, whatever the parts' sizes
            writer.add(buf[:CHUNK])
            buf = buf[CHUNK:]
    writer.add(buf + cut.end())


async def _from_stream(request: Request, c: Client, model: str, completion_window: str | None,
                       webhook_url: str | None) -> str:
    c.catalog.get(model)
    expires = window(completion_window)
    writer = await run_in_threadpool(c.submitter.open_batch, portfolio=model, tenant=c.tenant)
    if expires is not None or webhook_url:
        await run_in_threadpool(request.app.state.webhooks.set_batch_options, writer.batch_id,
                                expires_at=None if expires is None else now() + expires, webhook_url=webhook_url)
    try:
        cut, buf = LineCutter(model), []
        async for part in request.stream():
            buf += cut.feed(part)
            while len(buf) >= CHUNK:  # CHUNK lines at a time, whatever the network's framing
                await run_in_threadpool(writer.add, buf[:CHUNK])
                buf = buf[CHUNK:]
        await run_in_threadpool(writer.add, buf + cut.end())
    except BaseException:
        # an upload cut short (the client gone): its jobs are not left half-run, and a
        # batch that got no line is not left behind at all
        await run_in_threadpool(writer.abandon, "cancelled: the upload did not complete")
        raise
    await run_in_threadpool(writer.close)
    return writer.batch_id


class LineCutter:
    """Bytes in as they come (the network's framing or the store's chunks), parsed lines
    out: the same input is always cut at the same lines. A line longer than MAX_LINE
    fails alone: its bytes are dropped as they come, never held."""

    def __init__(self, model: str):
        self.model, self.pending, self.n, self.skipping = model, b"", 0, False

    def feed(self, part: bytes) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        self.pending += part
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self.n += 1
            if self.skipping:
                out.append((self.n, too_long(self.n, None, f"line {self.n}", MAX_LINE)))
                self.skipping = False
            elif line.strip():
                out.append(parse_line(self.n, line, self.model))
        if len(self.pending) > MAX_LINE:
            self.skipping, self.pending = True, b""
        return out

    def end(self) -> list[tuple[int, Any]]:
        if self.skipping:
            self.n += 1
            return [(self.n, too_long(self.n, None, f"line {self.n}", MAX_LINE))]
        if self.pending.strip():
            self.n += 1
            return [parse_line(self.n, self.pending, self.model)]
        return []


def _object(c: Client, batch_id: str) -> dict:
    # one read of the row for the status and the counts alike (two could straddle the last job)
    b = c.batches.batch(batch_id)
    if b is None or b["tenant"] != c.tenant:
        raise not_found("batch", batch_id)
    v = batch_view(b, c.batches.batch_tiers(batch_id), c.batches.signal_gaps(batch_id))
    return batch_object(b, v, {"expires_at": b["expires_at"].isoformat() if b["expires_at"] else None,
                               "webhook": b["webhook_state"]})


@router.get("")
def list_batches(c: Client = Depends(caller), after: str | None = Query(None, max_length=200),
                 limit: int = Query(20, ge=1, le=100)) -> dict:
    """The caller's batches, newest first (a page: `after` is the last id of the previous one)."""
    rows = c.batches.tenant_page(c.tenant, after=after, limit=limit + 1)
    data = [_object(c, r["id"]) for r in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


@router.get("/{batch_id}")
def get_batch(batch_id: str, c: Client = Depends(caller)) -> dict:
    return _object(c, batch_id)


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: str, c: Client = Depends(caller)) -> dict:
    """Cancel the open jobs (the finished ones keep their results); the batch reads cancelled."""
    _object(c, batch_id)
    c.batches.mark_cancelled(batch_id)
    c.cancel_batch(batch_id)
    return _object(c, batch_id)


def _lines(c: Client, batch_id: str, model: str, errors: bool) -> Iterator[bytes]:
    for job in c.results(batch_id):
        if job["status"] in ("queued", "running") or (job["status"] != "succeeded") != errors:
            continue
        yield (json.dumps(batch_output(job, model), ensure_ascii=False) + "\n").encode()


def output_lines(c: Client, batch_id: str, errors: bool) -> Iterator[bytes]:
    """The batch's output (errors=False) or error file, line by line; JobNotFound if the
    caller's tenant has no such batch."""
    c.batch(batch_id)
    digest = c.batches.batch(batch_id)["portfolio"]
    model = next((n for n in c.catalog.names() if c.catalog.get(n).digest == digest), digest)
    return _lines(c, batch_id, model, errors)


def _stream(c: Client, batch_id: str, errors: bool) -> StreamingResponse:
    try:
        lines = output_lines(c, batch_id, errors)
    except JobNotFound:
        raise not_found("batch", batch_id) from None
    return StreamingResponse(lines, media_type="application/x-ndjson")


@router.get("/{batch_id}/results", response_class=StreamingResponse)
def batch_results(batch_id: str, c: Client = Depends(caller)):
    """The finished jobs that succeeded, as OpenAI Batch output lines (JSONL)."""
    return _stream(c, batch_id, errors=False)


@router.get("/{batch_id}/errors", response_class=StreamingResponse)
def batch_errors(batch_id: str, c: Client = Depends(caller)):
    """The finished jobs that failed, were cancelled or expired, as OpenAI Batch error lines."""
    return _stream(c, batch_id, errors=True)
