"""The Python client of the task API: how a backend service in Python submits work.

    from worker.client import Client
    with Client() as c:                       # settings from CASCADE_* (see docs/api.md)
        job = c.submit("What is 2 + 2?", idempotency_key="order-17")
        print(c.wait(job)["answer"])

It goes the same way as every submitter (worker.queue.submit: validate, plan, commit,
send) and reads through worker.service.views. `wait` is woken by PostgreSQL LISTEN/NOTIFY
(worker.store.notify); on the embedded SQLite database it polls every 50 ms. With no
broker configured the client runs the tier workers itself, in threads, for the
portfolios it knows (the embedded mode), so it works on a bare checkout.

`AsyncClient` is the same for asyncio code: every call is awaitable and `wait`
does not block the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping

from router.core.portfolio import Portfolio, load_portfolio
from worker.config.settings import Settings, get_settings
from worker.job.codec import FINAL
from worker.queue.app import base_app
from worker.queue.batch import prepare_database
from worker.queue.catalog import Catalog
from worker.queue.dispatch import BATCH, INTERACTIVE, Dispatcher
from worker.queue.items import iter_records
from worker.queue.runtime import Runtime
from worker.queue.submit import TENANT_DEFAULT, Submission, Submitter
from worker.service.views import batch_view, job_view, notice_view
from worker.store.batches import finished
from worker.store.notify import BATCH_CHANNEL, JOB_CHANNEL, Waiter


class JobNotFound(LookupError):
    pass


# Starts one portfolio's tier workers for the runtime, for as long as the context lasts.
TierWorkers = Callable[[Runtime, Portfolio], ContextManager[Any]]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or an Item naming why the line cannot be read) of a
    JSONL(.gz) file, streamed; each line read as `cascade run` reads it (bytes that are
    not UTF-8, NaN, nesting, sizes: worker.queue.items.read_line)."""
    return iter_records(path)


class Client:
    def __init__(self, settings: Settings | None = None, *, portfolio: Portfolio | str | Path | None = None,
                 tenant: str = TENANT_DEFAULT, tier_workers: TierWorkers | None = None):
        """portfolio: the default (`cascade/default`); else CASCADE_PORTFOLIO. tier_workers:
        run each known portfolio's tiers in this process, for the client's lifetime
        (None: workers elsewhere serve the queues)."""
        self.settings = settings or get_settings()
        if isinstance(portfolio, (str, Path)):
            portfolio = load_portfolio(portfolio)
        self.catalog = Catalog.from_settings(self.settings, portfolio)
        self.tenant = tenant
        # whether the tenant has a budget, on a view whose caller has just read it (the HTTP service); None: unknown
        self.budgeted: bool | None = None
        prepare_database(self.settings)
        self.runtime = Runtime(self.settings)
        self.app = base_app(self.settings)  # sends stages by task name; runs none
        # a request does not wait out a broker outage: what it committed is sent later (Submitter.submit)
        dispatcher = Dispatcher(self.app, self.settings.chunk_size, publish_wait=self.settings.api_publish_wait,
                                size_of=self.runtime.stage_size)
        self.submitter = Submitter(self.runtime, dispatcher, self.catalog)
        self.jobs, self.batches = self.runtime.jobs, self.runtime.batches
        self.waiter = Waiter(self.settings.db_url)
        self._owner = True
        self._workers = contextlib.ExitStack()
        if tier_workers is not None:
            try:
                for name in self.catalog.names():
                    self._workers.enter_context(tier_workers(self.runtime, self.catalog.get(name)))
            except BaseException:
                self.close()
                raise

    def for_tenant(self, tenant: str) -> "Client":
        """A view of this client acting for another tenant, sharing its connections and
        workers (the HTTP service keeps one client and one view per caller)."""
        view = copy.copy(self)
        view.tenant = tenant
        view.budgeted = None
        view._owner = False
        return view

    # -- one job ---------------------------------------------------------------------
    def submit(self, prompt: str | None = None, *, messages: list[Mapping[str, str]] | None = None,
               params: Mapping[str, Any] | None = None, portfolio: str | None = None,
               metadata: Mapping[str, Any] | None = None, idempotency_key: str | None = None,
               priority: str = INTERACTIVE) -> str:
        """Submit a prompt or chat messages; returns the job id (the same id again for a
        repeated idempotency key). Raises RequestError/PortfolioError naming the field."""
        return self._submit(prompt, messages=messages, params=params, portfolio=portfolio, metadata=metadata,
                            idempotency_key=idempotency_key, priority=priority).job_id

    def _submit(self, prompt: str | None = None, *, messages: list[Mapping[str, str]] | None = None,
                params: Mapping[str, Any] | None = None, before_insert=None, **kw) -> Submission:
        request = {k: v for k, v in (("prompt", prompt), ("messages", messages), ("params", params)) if v is not None}
        return self.submitter.submit(request, tenant=self.tenant, before_insert=before_insert, **kw)

    def get(self, job_id: str) -> dict[str, Any]:
        job, tries = self.jobs.job_with_attempts(job_id)
        if job is None or job["tenant"] != self.tenant:
            raise JobNotFound(f"no job {job_id!r}")
        return job_view(job, tries)

    def from_notice(self, job_id: str, notice: dict[str, Any] | None) -> dict[str, Any] | None:
        """The job as `get` shows it, from its completion notice when the notice carried
        it (worker.service.views.notice_view), this tenant's and final; else None."""
        got = notice_view(notice)
        if got is None or got[0] != self.tenant or got[1]["id"] != job_id or got[1]["status"] not in FINAL:
            return None
        return got[1]

    def _final(self, job_id: str) -> bool:
        job = self.jobs.job(job_id)
        if job is None or job["tenant"] != self.tenant:
            raise JobNotFound(f"no job {job_id!r}")
        return job["status"] in FINAL

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The finished job; TimeoutError if it is still open after `timeout` seconds."""
        if not self.waiter.wait(JOB_CHANNEL, job_id, lambda: self._final(job_id), timeout):
            raise TimeoutError(f"job {job_id} not finished after {timeout}s")
        return self.get(job_id)

    def run(self, prompt: str | None = None, *, timeout: float | None = None, **kw) -> dict[str, Any]:
        """Submit and wait: subscribed to the job's completion before its row is written,
        so the first read is the one after the job's notice (worker.store.notify.Expectation).
        The job's id reaches the caller with its result (`awaited`: without an idempotency
        key its insert does not wait for the disk, Submitter.submit); a timeout names the
        job, so it is made durable first."""
        expect = self.waiter.expect(JOB_CHANNEL)
        try:
            sub = self._submit(prompt, before_insert=expect.subscribe, awaited=True, **kw)
            deadline = None if timeout is None else time.monotonic() + timeout
            job = self.get(sub.job_id) if not sub.created or sub.status in FINAL else None
            while job is None or job["status"] not in FINAL:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.jobs.make_durable(sub.job_id)
                    raise TimeoutError(f"job {sub.job_id} not finished after {timeout}s")
                expect.wait(left)  # woken, or out of time: read either way (unless the notice carried the job)
                job = self.from_notice(sub.job_id, expect.notice) or self.get(sub.job_id)
            return job
        finally:
            expect.close()

    def cancel(self, job_id: str) -> bool:
        """Cancel an open job; False if it had finished already."""
        self.get(job_id)
        return self.jobs.cancel_job(job_id)

    # -- batches ---------------------------------------------------------------------
    def submit_batch(self, items: Iterable[Mapping[str, Any]] | str | Path, *, portfolio: str | None = None,
                     batch_id: str | None = None, priority: str = BATCH, chunk: int = 1000) -> str:
        """Stream items (dicts like a JSONL line: id, prompt or messages, params, ...) or a
        JSONL file into a batch; returns its id. Bad items become failed jobs naming the line."""
        if isinstance(items, (str, Path)):
            records, source = read_jsonl(items), str(items)
        else:
            records, source = enumerate(items, 1), None
        return self.submitter.submit_batch(records, portfolio=portfolio, tenant=self.tenant, batch_id=batch_id,
                                           priority=priority, source=source, chunk=chunk)

    def batch(self, batch_id: str) -> dict[str, Any]:
        b = self.batches.batch(batch_id)
        if b is None or b["tenant"] != self.tenant:
            raise JobNotFound(f"no batch {batch_id!r}")
        return batch_view(b, self.batches.batch_tiers(batch_id), self.batches.signal_gaps(batch_id))

    def _batch_done(self, batch_id: str) -> bool:
        b = self.batches.batch(batch_id)
        if b is None or b["tenant"] != self.tenant:
            raise JobNotFound(f"no batch {batch_id!r}")
        return finished(b)

    def wait_batch(self, batch_id: str, timeout: float | None = None) -> dict[str, Any]:
        if not self.waiter.wait(BATCH_CHANNEL, batch_id, lambda: self._batch_done(batch_id), timeout):
            raise TimeoutError(f"batch {batch_id} not finished after {timeout}s")
        return self.batch(batch_id)

    def results(self, batch_id: str, page: int = 1000) -> Iterator[dict[str, Any]]:
        """Every job of the batch in input order, read a page at a time."""
        self.batch(batch_id)
        after = -1
        while True:
            rows = self.jobs.jobs_page(batch_id, after, page)
            if not rows:
                return
            ats = self.jobs.attempts_of([r["id"] for r in rows])
            for r in rows:
                yield job_view(r, ats[r["id"]])
            after = rows[-1]["seq"]

    def map(self, items: Iterable[Mapping[str, Any]] | str | Path, *, timeout: float | None = None,
            **kw) -> Iterator[dict[str, Any]]:
        """Items in, results out: submit a batch, wait for it, stream its results."""
        batch_id = self.submit_batch(items, **kw)
        self.wait_batch(batch_id, timeout)
        yield from self.results(batch_id)

    def cancel_batch(self, batch_id: str) -> int:
        self.batch(batch_id)
        return self.batches.cancel_batch(batch_id)

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        if not self._owner:
            return
        self._workers.close()
        self.waiter.close()
        self.runtime.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The client for asyncio code: the same calls, awaitable; database work runs in
    threads and `wait` awaits the notification without blocking the loop."""

    sync_class = Client

    def __init__(self, *args, **kw):
        self.sync = self.sync_class(*args, **kw)

    async def submit(self, prompt: str | None = None, **kw) -> str:
        return await asyncio.to_thread(self.sync.submit, prompt, **kw)

    async def get(self, job_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.get, job_id)

    async def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        s = self.sync
        if not await s.waiter.wait_async(JOB_CHANNEL, job_id, lambda: s._final(job_id), timeout):
            raise TimeoutError(f"job {job_id} not finished after {timeout}s")
        return await self.get(job_id)

    async def run(self, prompt: str | None = None, *, timeout: float | None = None, **kw) -> dict[str, Any]:
        """`Client.run` for the loop: subscribed before the insert, the insert not waiting
        for the disk (the id reaches no one before its result; a timeout makes it durable
        first), the job taken from its notice when the notice carries it. Only the submit
        and a read run in threads: the wait itself holds none."""
        s = self.sync
        loop = asyncio.get_running_loop()
        expect = await asyncio.to_thread(s.waiter.expect, JOB_CHANNEL, loop)  # may open the LISTEN connection
        try:
            sub = await asyncio.to_thread(s._submit, prompt, before_insert=expect.subscribe, awaited=True, **kw)
            deadline = None if timeout is None else loop.time() + timeout
            job = await self.get(sub.job_id) if not sub.created or sub.status in FINAL else None
            while job is None or job["status"] not in FINAL:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    await asyncio.to_thread(s.jobs.make_durable, sub.job_id)
                    raise TimeoutError(f"job {sub.job_id} not finished after {timeout}s")
                await expect.wait_async(left)  # woken, or out of time: read either way (unless the notice carried it)
                job = s.from_notice(sub.job_id, expect.notice) or await self.get(sub.job_id)
            return job
        finally:
            expect.close()

    async def cancel(self, job_id: str) -> bool:
        return await asyncio.to_thread(self.sync.cancel, job_id)

    async def submit_batch(self, items, **kw) -> str:
        return await asyncio.to_thread(self.sync.submit_batch, items, **kw)

    async def wait_batch(self, batch_id: str, timeout: float | None = None) -> dict[str, Any]:
        s = self.sync
        if not await s.waiter.wait_async(BATCH_CHANNEL, batch_id, lambda: s._batch_done(batch_id), timeout):
            raise TimeoutError(f"batch {batch_id} not finished after {timeout}s")
        return await asyncio.to_thread(s.batch, batch_id)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
