"""/v1/files, OpenAI's Files API for the Batch API: upload (multipart `file` and
`purpose`; only purpose `batch`), retrieve, list, content, delete; tenant-scoped.

An upload is read as it arrives (worker.service.multipart) and written to the database
every API process shares (worker.store.files: PostgreSQL, or SQLite in the embedded
mode) CHUNK bytes at a time: no process holds a whole file, and any process serves it
afterwards. A file expires CASCADE_FILE_TTL after its upload (default 30 days) and
`cascade purge` removes it then.

A batch's output and error files (`output_file_id`, `error_file_id` of the batch
object) are not copies: `file-output-<batch>` and `file-errors-<batch>` are read from
the batch's jobs when asked for, in OpenAI's output line shapes, for as long as the
batch is kept (`cascade purge --older-than`)."""
from __future__ import annotations

import uuid
from datetime import timedelta, timezone
from typing import Iterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from worker.service.api.batches import output_lines
from worker.service.api.common import ApiError, caller, not_found
from worker.service.client import Client, JobNotFound
from worker.service.multipart import MultipartError, MultipartReader, Part, boundary_of
from worker.service.openai_format import ERROR_FILE, OUTPUT_FILE
from worker.store.files import CHUNK, FileStore
from worker.store.schema import now

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("batch",)
MAX_FILE = 200 << 20  # bytes of one upload (OpenAI's limit for a batch input file)
MAX_FIELD = 1 << 10  # bytes of a form field that is not the file


def _unix(t) -> int | None:
    """Unix seconds; SQLite gives back naive datetimes, stored in UTC."""
    if t is None:
        return None
    return int((t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp())


def file_object(f: dict) -> dict:
    return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": _unix(f["created_at"]),
            "expires_at": _unix(f["expires_at"]), "filename": f["filename"], "purpose": f["purpose"],
            "status": "processed", "status_details": None}


def _store(c: Client) -> FileStore:
    return FileStore(c.settings.db_url)


_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}},
}}}}}


@router.post("", openapi_extra=_UPLOAD_BODY)
async def upload(request: Request, c: Client = Depends(caller)) -> dict:
    """multipart/form-data: `file` (the JSONL of the batch's requests) and `purpose`
    (`batch`), in either order."""
    try:
        reader = MultipartReader(boundary_of(request.headers.get("content-type")))
    except MultipartError as e:
        raise ApiError(400, str(e), param="file") from None
    store = _store(c)
    file_id = f"file-{uuid.uuid4().hex}"
    fields: dict[str, bytes] = {}
    part: Part | None = None
    pending, seq, size, created = b"", 0, 0, False
    try:
        async for data in request.stream():
            for ev in reader.feed(data):
                if isinstance(ev, Part):
                    part = ev
                    if part.name == "file":
                        if created:
                            raise ApiError(400, "only one `file` part per upload", param="file")
                        await run_in_threadpool(store.create, file_id, c.tenant, "batch",
                                                (part.filename or "upload.jsonl")[:255],
                                                now() + timedelta(seconds=c.settings.file_ttl))
                        created = True
                    else:
                        fields[part.name] = b""
                elif ev is None:
                    part = None
                elif part is not None and part.name == "file":
                    size += len(ev)
                    if size > MAX_FILE:
                        raise ApiError(413, f"file: larger than {MAX_FILE >> 20} MiB", param="file")
                    pending += ev
                    while len(pending) >= CHUNK:
                        await run_in_threadpool(store.append, file_id, seq, pending[:CHUNK])
                        pending, seq = pending[CHUNK:], seq + 1
                elif part is not None:
                    fields[part.name] += ev
                    if len(fields[part.name]) > MAX_FIELD:
                        raise ApiError(400, f"{part.name}: longer than {MAX_FIELD} bytes", param=part.name)
        reader.close()
        purpose = fields.get("purpose", b"").decode("utf-8", "replace")
        if "purpose" not in fields:
            raise ApiError(400, "purpose: missing (purpose=batch)", param="purpose")
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose must be 'batch' (the only purpose this service stores files for), "
                                f"got {purpose[:100]!r}", param="purpose")
        if not created:
            raise ApiError(400, "file: missing (a multipart part named `file`)", param="file")
        if pending:
            await run_in_threadpool(store.append, file_id, seq, pending)
        return file_object(await run_in_threadpool(store.finish, file_id))
    except MultipartError as e:
        await run_in_threadpool(store.delete, file_id)
        raise ApiError(400, f"file: {e}", param="file") from None
    except BaseException:
        # refused or cut short: no half file is left (nor read: only finished files are)
        if created:
            await run_in_threadpool(store.delete, file_id)
        raise


def _batch_file(c: Client, file_id: str) -> tuple[str, bool] | None:
    """(batch id, errors?) of a batch's output or error file id; None for an upload."""
    for prefix, errors in ((OUTPUT_FILE, False), (ERROR_FILE, True)):
        if file_id.startswith(prefix):
            return file_id[len(prefix):], errors
    return None


def _lines(c: Client, file_id: str) -> Iterator[bytes]:
    batch_id, errors = _batch_file(c, file_id)
    try:
        b = c.batch(batch_id)
    except JobNotFound:
        raise not_found("file", file_id) from None
    if b["status"] == "in_progress":
        raise not_found("file", file_id)  # not there until the batch is finished, as at OpenAI
    return output_lines(c, batch_id, errors)


def _get(c: Client, file_id: str) -> dict:
    if _batch_file(c, file_id) is not None:
        lines = _lines(c, file_id)
        batch_id, errors = _batch_file(c, file_id)
        row = c.batches.batch(batch_id)
        return {"id": file_id, "object": "file", "bytes": sum(len(x) for x in lines),
                "created_at": _unix(row["updated_at"]), "expires_at": None,
                "filename": f"{batch_id}_{'error' if errors else 'output'}.jsonl",
                "purpose": "batch_output", "status": "processed", "status_details": None}
    f = _store(c).file(file_id, c.tenant)
    if f is None:
        raise not_found("file", file_id)
    return file_object(f)


@router.get("")
def list_files(c: Client = Depends(caller), after: str | None = Query(None, max_length=200),
               limit: int = Query(20, ge=1, le=10000), purpose: str | None = Query(None, max_length=32),
               order: str = Query("desc", pattern="^desc$")) -> dict:
    """The caller's uploaded files, newest first (a page: `after` is the last id of the
    previous one). Batch output and error files are not listed (the batch names them)."""
    rows = _store(c).page(c.tenant, after=after, limit=limit + 1, purpose=purpose)
    data = [file_object(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


@router.get("/{file_id}")
def retrieve(file_id: str, c: Client = Depends(caller)) -> dict:
    return _get(c, file_id)


@router.get("/{file_id}/content", response_class=StreamingResponse)
def content(file_id: str, c: Client = Depends(caller)):
    """The file's bytes as uploaded, or a batch's output or error JSONL, streamed."""
    if _batch_file(c, file_id) is not None:
        return StreamingResponse(_lines(c, file_id), media_type="application/x-ndjson")
    store = _store(c)
    if store.file(file_id, c.tenant) is None:
        raise not_found("file", file_id)
    return StreamingResponse(store.chunks(file_id), media_type="application/octet-stream")


@router.delete("/{file_id}")
def delete(file_id: str, c: Client = Depends(caller)) -> dict:
    if _batch_file(c, file_id) is not None:
        _get(c, file_id)
        raise ApiError(400, f"{file_id!r} is a batch's output: it goes with the batch (cascade purge)",
                       param="file_id")
    if not _store(c).delete(file_id, c.tenant):
        raise not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}
