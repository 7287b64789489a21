"""`cascade run`'s whole batch in one call: submit, wait, collect. In the embedded
mode the tier workers run in this process for the duration of the call
(worker.queue.embedded); in the distributed mode `cascade worker` pools do the work."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Iterator, Sequence

from router.core.portfolio import Portfolio
from worker.config.settings import Settings, get_settings
from worker.models.backends import validate_portfolio
from worker.queue.batch import (
    BatchError,
    BatchReport,
    check_batch_id,
    default_batch_id,
    job_results,
    prepare_database,
    submit,
    wait_for,
)
from worker.queue.dispatch import Dispatcher
from worker.queue.embedded import EmbeddedWorkers
from worker.queue.items import Item, items_from_dicts
from worker.queue.runtime import Runtime
from worker.queue.tasks import make_app
from worker.store.errors import ride_out


@contextlib.contextmanager
def _workers(app, runtime: Runtime, portfolio: Portfolio, settings: Settings) -> Iterator[Any]:
    if settings.embedded:
        with EmbeddedWorkers(runtime, portfolio, concurrency=settings.worker_concurrency) as w:
            yield w.alive
    else:
        yield None



def run_batch(items: Iterable[dict[str, Any]] | Sequence[Item], portfolio: Portfolio, *,
              settings: Settings | None = None, batch_id: str | None = None, source: str | None = None,
              progress: bool = True, wait: bool = True, timeout: float | None = None,
              max_cost: float | None = None) -> BatchReport:
    """Run items through the portfolio's tiers and return every job with its attempts.

    In the embedded mode the tier workers run in this process for the duration of
    the call; in the distributed mode `cascade worker --tier NAME` pools do the work.
    """
    settings = settings or get_settings()
    if batch_id is not None:
        check_batch_id(batch_id)
    items = list(items)
    if items and not isinstance(items[0], Item):
        items = items_from_dicts(items)
    validate_portfolio(portfolio)
    prepare_database(settings)
    if batch_id is None:
        if source is None:
            raise BatchError("a batch needs an id or a source to derive one from")
        batch_id = default_batch_id(source, portfolio)
    runtime = Runtime(settings)
    app = make_app(settings, runtime)
    dispatcher = Dispatcher(app, settings.chunk_size, publish_wait=settings.publish_wait, size_of=runtime.stage_size)
    t0 = time.perf_counter()
    try:
        with _workers(app, runtime, portfolio, settings) as alive:
            t1 = time.perf_counter()
            sub = submit(runtime, dispatcher, portfolio, items, batch_id, source=source)
            if not wait:
                return BatchReport(batch_id, runtime.batches.batch(batch_id), sub, timing={"start": t1 - t0})
            hint = "" if settings.embedded else (
                "are workers running? start one per tier: "
                + ", ".join(f"`cascade worker --tier {t.name}`" for t in portfolio.tiers))
            b = wait_for(runtime.batches, batch_id, progress=progress, alive=alive, timeout=timeout, hint=hint,
                         max_cost=max_cost)
            t2 = time.perf_counter()
    finally:
        runtime.close()  # unload models now, not at garbage collection
    # the results are read as the batch was submitted and waited for: through an outage
    results = ride_out(lambda: job_results(runtime.jobs, batch_id), wait=settings.record_wait, what="results")
    if not settings.store_content:  # collected: the final answers leave the database now
        ride_out(lambda: runtime.jobs.erase_answers([j["job_id"] for j in results]), wait=settings.record_wait,
                 what="results")
    return BatchReport(batch_id, b, sub, results, timing={"start": t1 - t0, "serve": t2 - t1})
