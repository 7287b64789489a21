"""Submitting jobs for the task API (the Python client, the `cascade.submit` task and
the HTTP service all come here): the same straight line as a CLI batch,

    worker.job.request (validate) -> worker.job.codec (plan: pre-call policies run here, in the
    submitter) -> worker.store.jobs (commit) -> worker.queue.dispatch (first stage)

A job with an idempotency key has an id derived from (tenant, key): submitting it
again finds the same row, and nothing is sent twice. Everything that can be wrong
with a request is found before the first write, so a refused request leaves no row.

Batches stream: items are read, validated, committed and sent `chunk` at a time,
so a million-item batch never sits in memory.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from router.core import cascade
from router.core.errors import UserError
from router.core.portfolio import Portfolio
from worker.job.codec import JobStatus, failed_job_row, query_of
from worker.job.request import RequestError, job_input
from worker.queue.admission import job_row, new_job_row
from worker.queue.catalog import Catalog
from worker.queue.dispatch import BATCH, INTERACTIVE, PRIORITIES, Dispatcher, queue_for
from worker.queue.items import MAX_KEY, Item, item_from
from worker.queue.runtime import Runtime

MAX_METADATA_BYTES = 16_384
TENANT_DEFAULT = "default"


class IdempotencyConflict(UserError):
    """An idempotency key reused for a different request."""


def job_id_for(tenant: str, key: str) -> str:
    """The id of the job submitted by `tenant` with idempotency key `key`."""
    return "job-" + hashlib.sha256(f"{tenant}\n{key}".encode()).hexdigest()[:32]


def _no_nul(value: Any, field: str) -> str:
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    if "\\u0000" in text:
        raise RequestError(field, "contains a NUL character")
    return text


def check_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise RequestError("metadata", f"must be an object, got {type(metadata).__name__}")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError):
        raise RequestError("metadata", "must be JSON without NaN or infinities") from None
    text = _no_nul(metadata, "metadata")
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise RequestError("metadata", f"is larger than {MAX_METADATA_BYTES} bytes")
    return metadata


def check_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= 200 or "\x00" in key:
        raise RequestError("idempotency_key", "must be a string of 1 to 200 characters without NUL")
    return key


def check_priority(priority: Any) -> str:
    if priority not in PRIORITIES:
        raise RequestError("priority", f"must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return priority


@dataclass
class Submission:
    job_id: str
    created: bool  # False: the idempotency key found the job submitted before
    status: str


class Submitter:
    def __init__(self, runtime: Runtime, dispatcher: Dispatcher, catalog: Catalog):
        self.runtime = runtime
        self.dispatcher = dispatcher
        self.catalog = catalog
        self._saved: set[str] = set()

    def portfolio(self, name: str | None) -> Portfolio:
        p = self.runtime.add_portfolio(self.catalog.get(name))
        if p.digest not in self._saved:
            self.runtime.jobs.save_portfolio(p.digest, p.spec())
            self._saved.add(p.digest)
        return p

    def prepare(self, request: Mapping[str, Any], *, portfolio: str | None = None, tenant: str = TENANT_DEFAULT,
                idempotency_key: str | None = None, priority: str = INTERACTIVE,
                metadata: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], Portfolio]:
        """The job row for a request, every check done, nothing written (RequestError,
        PortfolioError: the caller's mistake, named)."""
        key = check_key(idempotency_key)
        priority = check_priority(priority)
        meta = check_metadata(metadata)
        data = job_input(request)
        for field in data:
            if field not in ("prompt", "messages", "params", "category"):
                raise RequestError(field, "is not a request field (prompt, messages, params, category)")
        _no_nul(data, "messages" if "messages" in data else "prompt")
        p = self.portfolio(portfolio)
        job_id = job_id_for(tenant, key) if key is not None else f"job-{uuid.uuid4().hex}"
        data.update(id=job_id, priority=priority)
        if meta:
            data["metadata"] = meta
        row = new_job_row(job_id, key, 0, p, data)
        row["tenant"] = tenant
        return row, p

    def submit(self, request: Mapping[str, Any], **kw) -> Submission:
        row, p = self.prepare(request, **kw)
        jobs = self.runtime.jobs
        if jobs.insert_jobs(None, [row]):
            tier = row["current_tier"]
            self.dispatcher.send([(row["id"], tier, queue_for(p.tier(tier).queue_name, row["input"]["priority"]))])
            return Submission(row["id"], True, row["status"])
        old = jobs.job(row["id"])
        if old["input"] != row["input"] or old["portfolio"] != row["portfolio"]:
            raise IdempotencyConflict(f"idempotency key {row['item_key']!r} was used before for another request")
        return Submission(row["id"], False, old["status"])

    def record_refusal(self, tenant: Any, idempotency_key: Any, error: str) -> bool:
        """For a submitter with no one to answer to (the Celery task): keep a refused keyed
        request as a failed job naming the problem, under the id the key gives."""
        try:
            key = check_key(idempotency_key)
            p = self.portfolio(None)
        except UserError:
            return False
        if key is None or not isinstance(tenant, str):
            return False
        job_id = job_id_for(tenant, key)
        row = failed_job_row(job_id, key, 0, p, f"refused: {error}")
        row.update(tenant=tenant, input={"id": job_id})
        return bool(self.runtime.jobs.insert_jobs(None, [row]))

    # -- batches -------------------------------------------------------------------
    def submit_batch(self, records: Iterable[tuple[int, Any]], *, chunk: int = 1000, **kw) -> str:
        """Stream (line number, parsed record or an Item carrying its error) into a new
        batch (see `open_batch`), `chunk` at a time. Returns the batch id."""
        writer = self.open_batch(**kw)
        buf: list[tuple[int, Any]] = []
        for rec in records:
            buf.append(rec)
            if len(buf) >= chunk:
                writer.add(buf)
                buf = []
        writer.add(buf)
        return writer.batch_id

    def open_batch(self, *, portfolio: str | None = None, tenant: str = TENANT_DEFAULT, batch_id: str | None = None,
                   priority: str = BATCH, source: str | None = None) -> "BatchWriter":
        priority = check_priority(priority)
        p = self.portfolio(portfolio)
        batch_id = batch_id or f"batch-{uuid.uuid4().hex}"
        self.runtime.batches.ensure_batch(batch_id, p.digest, source, tenant)
        return BatchWriter(self, p, batch_id, tenant, priority)


class BatchWriter:
    """Adds records to one batch, a chunk per call: each chunk validated, committed,
    then its first stages sent. A bad record is a failed job naming its line and field."""

    def __init__(self, submitter: Submitter, portfolio: Portfolio, batch_id: str, tenant: str, priority: str):
        self.submitter, self.portfolio, self.batch_id = submitter, portfolio, batch_id
        self.tenant, self.priority = tenant, priority
        self.added = 0

    def add(self, records: list[tuple[int, Any]]) -> None:
        if not records:
            return
        p, batch_id = self.portfolio, self.batch_id
        checked = []
        for seq, rec in records:
            it = rec if isinstance(rec, Item) else item_from(rec, seq, f"line {seq}")
            data = None if it.data is None else {**it.data, "priority": self.priority}
            error = it.error
            if data is not None:
                try:
                    _no_nul(data, "prompt")
                except RequestError as e:
                    data, error = None, f"line {it.seq}: {e}"
            checked.append((it, data, error))
        # pre-call decisions a chunk at a time: a policy that plans a batch as a whole
        # (OptLLM's budget) sees each chunk as its batch
        starts = iter(cascade.start_batch(p.built_policy, [query_of(f"{batch_id}:{it.key}", data)
                                                           for it, data, _ in checked if data is not None]))
        rows = []
        for it, data, error in checked:
            row = job_row(f"{batch_id}:{it.key}", it.key, it.seq, p, data, error, f"line {it.seq}: ",
                          None if data is None else next(starts))
            row["tenant"] = self.tenant
            rows.append(row)
        jobs = self.submitter.runtime.jobs
        new = jobs.insert_jobs(batch_id, rows)
        dups = [r for r in rows if r["id"] not in new]
        if dups:  # an id used twice in this batch: the later line fails, naming the first
            again = [{**r, "id": f"{batch_id}:line-{r['seq']}", "item_key": f"line-{r['seq']}", "status": "failed",
                      "plan": None, "current_tier": None,
                      "error": f"line {r['seq']}: id {r['item_key']!r} already used in this batch"} for r in dups]
            jobs.insert_jobs(batch_id, again)
        self.added += len(rows)
        self.submitter.dispatcher.send(
            (r["id"], r["current_tier"], queue_for(p.tier(r["current_tier"]).queue_name, self.priority))
            for r in rows if r["id"] in new and r["status"] == JobStatus.QUEUED)


__all__ = ["IdempotencyConflict", "MAX_KEY", "Submission", "Submitter", "job_id_for"]
