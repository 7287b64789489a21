"""The tasks a tier worker runs, bound to its Runtime: the stage (idempotent, retried
whole on a database blip), the submission of the `cascade.submit` task, and the
canary. `make_app` is the worker's app; worker.queue.app holds the configuration
every process shares (docs/operations.md explains each setting).
"""
from __future__ import annotations

from typing import Iterable

import structlog
from celery import Celery

from router.core.errors import UserError
from worker.config.settings import Settings, get_settings
from worker.ops import canary
from worker.ops.canary import CANARY_TASK
from worker.queue.app import BadMessage, base_app, check_stage_message, without_builtin_tasks
from worker.queue.catalog import Catalog
from worker.queue.dispatch import INTERACTIVE, STAGE_TASK, SUBMIT_TASK, Dispatcher
from worker.queue.runtime import Runtime
from worker.queue.stage import run_stage
from worker.queue.submit import TENANT_DEFAULT, Submitter
from worker.store.errors import InterfaceError, OperationalError

DB_RETRY_MAX_DELAY = 30
log = structlog.get_logger("cascade.worker")


def make_app(settings: Settings | None = None, runtime: Runtime | None = None,
             catalog: Catalog | None = None, tiers: Iterable[str] | None = None) -> Celery:
    """The production app: the stage task and the submit task, bound to `runtime`
    (built here when not given; it connects to nothing until the first task runs).
    `catalog` names the portfolios a submission may ask for (default: from settings,
    read at the first submission). With `tiers`, a stage for any other tier is refused."""
    settings = settings or get_settings()
    served = None if tiers is None else frozenset(tiers)
    rt = runtime or Runtime(settings)
    app = base_app(settings)
    dispatcher = Dispatcher(app, settings.chunk_size, publish_wait=settings.publish_wait, size_of=rt.stage_size)
    submitters: list[Submitter] = []

    def submitter() -> Submitter:
        if not submitters:
            submitters.append(Submitter(rt, dispatcher, catalog or Catalog.from_settings(settings)))
        return submitters[0]

    @app.task(name=SUBMIT_TASK, bind=True, shared=False, acks_late=True, max_retries=None, ignore_result=True)
    def submit(self, prompt: str | None = None, messages: list | None = None, params: dict | None = None,
               portfolio: str | None = None, tenant: str = TENANT_DEFAULT, idempotency_key: str | None = None,
               priority: str = INTERACTIVE, metadata: dict | None = None) -> str:
        """See docs/api.md: commit the job (idempotent on idempotency_key) and send its first
        stage. The key ends up holding the job, or a failed job naming why there is none."""
        request = {k: v for k, v in (("prompt", prompt), ("messages", messages), ("params", params)) if v is not None}
        try:
            try:
                return submitter().submit(request, portfolio=portfolio, tenant=tenant,
                                          idempotency_key=idempotency_key, priority=priority,
                                          metadata=metadata).job_id
            except UserError as e:
                # no result backend to answer with: a keyed request leaves a failed job naming
                # the problem, where the caller looks for its job (worker.queue.submit.job_id_for)
                log.warning("submit.refused", error=str(e), idempotency_key=idempotency_key)
                submitter().record_refusal(tenant, idempotency_key, str(e))
                return ""
        except (OperationalError, InterfaceError) as e:
            # the database is away: the submission (idempotent) is tried again, for as long as
            # the outage lasts, as a stage is
            log.warning("submit.database_unavailable", retry=self.request.retries,
                        error=str(e.orig or e).splitlines()[0][:200])
            raise self.retry(exc=e, countdown=min(2 ** min(self.request.retries, 5), DB_RETRY_MAX_DELAY))
        except Exception as e:
            # a bug: the key still holds what happened, then the task fails loudly
            try:
                submitter().record_refusal(tenant, idempotency_key, f"{type(e).__name__}: {e}",
                                           prefix="internal error: ")
            except Exception:  # noqa: BLE001 - the first error is the one to report
                log.exception("submit.record_failed")
            raise

    @app.task(name=STAGE_TASK, bind=True, shared=False, acks_late=True, max_retries=None, ignore_result=True)
    def stage(self, tier: str, job_ids: list[str]) -> int:
        try:
            check_stage_message(tier, job_ids, served)
        except BadMessage as e:
            log.error("stage.bad_message", task=self.request.id, error=str(e))
            return 0  # acked and dropped: a malformed message never becomes work or a retry
        try:
            sends = run_stage(rt, tier, job_ids)
        except (OperationalError, InterfaceError) as e:
            # The database is away, before any model was called (a stage that called
            # one waits in record_durably instead): try the whole, idempotent stage
            # again, for as long as the outage lasts; nothing needs the database to
            # give up, and every job is still open when it is back.
            log.warning("stage.database_unavailable", tier=tier, retry=self.request.retries,
                        error=str(e.orig or e).splitlines()[0][:200])
            raise self.retry(exc=e, countdown=min(2 ** min(self.request.retries, 5), DB_RETRY_MAX_DELAY))
        except Exception as e:
            # A bug or an unexpected backend crash: fail these jobs loudly rather than
            # leave them running forever (the message is acked on failure).
            rt.stages.fail_open_jobs(job_ids, f"internal error at tier {tier}: {type(e).__name__}: {e}")
            raise
        dispatcher.send(sends)
        return len(job_ids)

    @app.task(name=CANARY_TASK, shared=False, ignore_result=True)
    def canary_task(tier: str, sent_at: float) -> None:
        canary.consumed(tier, sent_at)

    without_builtin_tasks(app)
    return app


# `celery -A worker.queue.tasks flower` and `cascade worker` use this one.
app = make_app()
