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
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import structlog

from router.core.errors import InternalError, UserError
from router.core.portfolio import Portfolio
from worker.job.codec import JobStatus, failed_job_row
from worker.job.request import RequestError, job_input
from worker.job.storable import clean_text, text_problem, unstorable
from worker.queue.admission import Admission, new_job_row
from worker.queue.batch import job_rows
from worker.queue.catalog import Catalog
from worker.queue.dispatch import BATCH, INTERACTIVE, PRIORITIES, Dispatcher, queue_for
from worker.queue.items import MAX_KEY, Item, Keys, item_from
from worker.queue.runtime import Runtime

log = structlog.get_logger("cascade.submit")

MAX_METADATA_BYTES = 16_384
TENANT_DEFAULT = "default"


class IdempotencyConflict(UserError):
    """An idempotency key reused for a different request."""


def job_id_for(tenant: str, key: str) -> str:
    """The id of the job submitted by `tenant` with idempotency key `key`."""
    return "job-" + hashlib.sha256(f"{tenant}\n{key}".encode()).hexdigest()[:32]


def refuse_unstorable(value: Any, field: str) -> None:
    """RequestError naming the field (`metadata.k`, `messages[0].content`) of anything in
    `value` PostgreSQL cannot store: NUL, a lone surrogate, NaN, nesting deeper than
    MAX_DEPTH. Checked in every mode, so the embedded one (SQLite) takes no more than
    the distributed one."""
    found = unstorable(value, field)
    if found is not None:
        raise RequestError(found[0] or field or "request", found[1])


def check_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise RequestError("metadata", f"must be an object, got {type(metadata).__name__}")
    refuse_unstorable(metadata, "metadata")
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise RequestError("metadata", "must be JSON without NaN or infinities") from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise RequestError("metadata", f"is larger than {MAX_METADATA_BYTES} bytes")
    return metadata


def check_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= 200 or text_problem(key):
        raise RequestError("idempotency_key", "must be a string of 1 to 200 characters without NUL or lone "
                                              "surrogates")
    return key


def check_tenant(tenant: Any) -> str:
    if not isinstance(tenant, str) or not 1 <= len(tenant) <= 200 or text_problem(tenant):
        raise RequestError("tenant", "must be a name of 1 to 200 characters without NUL or lone surrogates")
    return tenant


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
        tenant = check_tenant(tenant)
        priority = check_priority(priority)
        meta = check_metadata(metadata)
        data = job_input(request)
        for field in data:
            if field not in ("prompt", "messages", "params", "category"):
                raise RequestError(field, "is not a request field (prompt, messages, params, category)")
        refuse_unstorable(data, "")
        p = self.portfolio(portfolio)
        job_id = job_id_for(tenant, key) if key is not None else f"job-{uuid.uuid4().hex}"
        data.update(id=job_id, priority=priority)
        if meta:
            data["metadata"] = meta
        version, policy = self.runtime.current_policy(p.digest)
        row = new_job_row(job_id, key, 0, p, data, policy=policy, version=version)
        row["tenant"] = tenant
        return row, p

    def submit(self, request: Mapping[str, Any], *, before_insert: Callable[[str], Any] | None = None,
               budgeted: bool | None = None, awaited: bool = False, **kw) -> Submission:
        """One job, written and sent. before_insert(job id): called before the row is
        written (a waiter subscribing to its completion). budgeted: whether the caller
        has just read that the tenant has a budget (worker.service.tenants); None: not
        known. A job of a tenant without a budget goes in as one statement; one with a
        budget reserves its most under the tenant's admission lock (four), or raises
        BudgetExhausted with nothing written. A budget set at that very moment applies
        from the next job on, as it would have had this one come a moment earlier.
        awaited: the caller waits for the result and gives the job's id to no one before
        (`Client.run`, a chat completion): without an idempotency key nobody else can know
        the id, so the insert does not wait for the disk (JobStore.insert_unless_budgeted
        says why); with a key the id follows from it, and the insert waits. A caller that
        names the job before its result (a timeout) calls `runtime.jobs.make_durable(job_id)`."""
        row, p = self.prepare(request, **kw)
        durable = not awaited or row["item_key"] is not None
        jobs = self.runtime.jobs
        if before_insert is not None:
            before_insert(row["id"])
        if budgeted is False and durable:
            new = bool(jobs.insert_jobs(None, [row]))
        else:
            new = None if budgeted else jobs.insert_unless_budgeted(row, durable=durable)
            if new is None:
                new = bool(jobs.insert_jobs(None, [row], admit=Admission(row["tenant"], strict=True),
                                            durable=durable))
        if new:
            tier = row["current_tier"]
            try:
                self.dispatcher.send([(row["id"], tier, queue_for(p.tier(tier).queue_name, row["input"]["priority"]))])
            except Exception as e:  # noqa: BLE001 - the broker is away (kombu's or a socket's error)
                # Accepted all the same: the job is committed in PostgreSQL, the source of truth,
                # and a tier worker's sweeper sends a queued job nothing touched for stale_after.
                # Refusing it now would have a client without an idempotency key submit it twice.
                log.warning("submit.send_deferred", job=row["id"], tier=tier, error=str(e)[:200])
            return Submission(row["id"], True, row["status"])
        old = jobs.job(row["id"])
        if old["input"] != row["input"] or old["portfolio"] != row["portfolio"]:
            raise IdempotencyConflict(f"idempotency key {row['item_key']!r} was used before for another request")
        return Submission(row["id"], False, old["status"])

    def record_refusal(self, tenant: Any, idempotency_key: Any, error: str, *, prefix: str = "refused: ") -> bool:
        """For a submitter with no one to answer to (the Celery task): keep a refused keyed
        request as a failed job naming the problem, under the id the key gives. False when
        there is nowhere to keep it (no key, or a key or tenant the database cannot hold)."""
        try:
            key = check_key(idempotency_key)
            tenant = check_tenant(tenant)
            p = self.portfolio(None)
        except UserError:
            return False
        if key is None:
            return False
        job_id = job_id_for(tenant, key)
        row = failed_job_row(job_id, key, 0, p, clean_text(prefix + error)[:2000])  # it may quote the bad text
        row.update(tenant=tenant, input={"id": job_id})
        return bool(self.runtime.jobs.insert_jobs(None, [row]))

    # -- batches -------------------------------------------------------------------
    def submit_batch(self, records: Iterable[tuple[int, Any]], *, chunk: int = 1000, **kw) -> str:
        """Stream (line number, parsed record or an Item carrying its error) into a new
        batch (see `open_batch`), `chunk` at a time. Returns the batch id."""
        writer = self.open_batch(**kw)
        try:
            buf: list[tuple[int, Any]] = []
            for rec in records:
                buf.append(rec)
                if len(buf) >= chunk:
                    writer.add(buf)
                    buf = []
            writer.add(buf)
        except BaseException:
            writer.abandon("cancelled: the submission did not complete")
            raise
        writer.close()
        return writer.batch_id

    def open_batch(self, *, portfolio: str | None = None, tenant: str = TENANT_DEFAULT, batch_id: str | None = None,
                   priority: str = BATCH, source: str | None = None) -> "BatchWriter":
        priority = check_priority(priority)
        tenant = check_tenant(tenant)
        p = self.portfolio(portfolio)
        batch_id = batch_id or f"batch-{uuid.uuid4().hex}"
        b = self.runtime.batches.ensure_batch(batch_id, p.digest, source, tenant, submitting=True)
        if not b["submitting"]:  # lines added to an existing batch
            self.runtime.batches.begin_submission(batch_id)
        return BatchWriter(self, p, batch_id, tenant, priority)


class BatchWriter:
    """Adds records to one batch, a chunk per call: each chunk validated, keyed
    (worker.queue.items.Keys: no line is ever dropped, whatever its id), committed, then
    its first stages sent. A bad record is a failed job naming its line and field."""

    def __init__(self, submitter: Submitter, portfolio: Portfolio, batch_id: str, tenant: str, priority: str):
        self.submitter, self.portfolio, self.batch_id = submitter, portfolio, batch_id
        self.tenant, self.priority = tenant, priority
        self.keys = Keys(lambda n: f"line {n}")
        self.added = 0
        self.stopped = False  # the tenant's budget stopped admitting: every later line fails

    def add(self, records: list[tuple[int, Any]]) -> None:
        """Commit these (line number, parsed record or an Item carrying its error) and send
        their first stages. A key an earlier chunk holds (the insert finds it taken) is
        decided again by the same rule, until every line is in."""
        if not records:
            return
        items = self.keys.assign([rec if isinstance(rec, Item) else item_from(rec, seq, f"line {seq}")
                                  for seq, rec in records])
        jobs = self.submitter.runtime.jobs
        for attempt in range(100):
            admission = Admission(self.tenant, stopped=self.stopped)
            new = jobs.insert_jobs(self.batch_id, self._rows(items), admit=admission)
            rows, self.stopped = admission.rows, admission.stopped
            self.added += len(new)
            self.submitter.dispatcher.send(
                (r["id"], r["current_tier"], queue_for(self.portfolio.tier(r["current_tier"]).queue_name, self.priority))
                for r in rows if r["id"] in new and r["status"] == JobStatus.QUEUED)
            left = [it for it, r in zip(items, rows) if r["id"] not in new]
            if not left:
                return
            firsts = jobs.item_seqs(self.batch_id, [it.key for it in left])
            items = [self.keys.taken(it, firsts.get(it.key), attempt) for it in left]
        raise InternalError(f"batch {self.batch_id}: {len(items)} line(s) found no free key")

    def close(self) -> None:
        """Every line is in: the batch can now finish."""
        self.submitter.runtime.batches.end_submission(self.batch_id)

    def abandon(self, why: str) -> None:
        """The submission stopped half-way (the upload was cut short): the jobs written
        are cancelled, and a batch that got no line at all is removed."""
        batches = self.submitter.runtime.batches
        batches.cancel_batch(self.batch_id, why)
        batches.drop_if_empty(self.batch_id)

    def _rows(self, items: list[Item]) -> list[dict[str, Any]]:
        # pre-call decisions a chunk at a time: a policy that plans a batch as a whole
        # (OptLLM's budget) sees each chunk as its batch
        items = [it if it.data is None else replace(it, data={**it.data, "priority": self.priority}) for it in items]
        version, policy = self.submitter.runtime.current_policy(self.portfolio.digest)
        rows = job_rows(self.batch_id, items, self.portfolio, lambda it: f"line {it.seq}: ", policy=policy,
                        version=version)
        for r in rows:
            r["tenant"] = self.tenant
        return rows


__all__ = ["IdempotencyConflict", "MAX_KEY", "Submission", "Submitter", "job_id_for"]
