"""The Celery app: one queue per tier, one task (a stage), idempotent and acked late.

Settings that guard against lost or duplicated work (see docs/operations.md):
- acks_late + retry on a lost worker: a killed worker's message is redelivered,
  and the stage is idempotent, so the job finishes exactly once;
- prefetch 1: a long model call never holds other jobs hostage;
- no result backend: PostgreSQL holds every result;
- every countdown stays far below the visibility timeout, so a delayed retry is
  never redelivered while it waits.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from celery import Celery
from sqlalchemy.exc import OperationalError

from .settings import Settings, get_settings

STAGE_TASK = "cascade.stage"
NOOP_TASK = "cascade.noop"
DEFAULT_QUEUE = "cascade.default"
DB_RETRIES = 8


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("cascade", set_as_current=False)
    transport: dict = {"visibility_timeout": settings.visibility_timeout}
    if settings.broker.startswith(("redis://", "rediss://", "unix://")):
        transport.update(health_check_interval=25, socket_timeout=30, socket_connect_timeout=10,
                         # sweep for a dead worker's unacked messages every few seconds (kombu's
                         # default scans only every ~100 s), so recovery takes about one visibility timeout
                         unacked_restore_interval=max(1, min(10, settings.visibility_timeout // 10)),
                         unacked_restore_throttle=1)
        if settings.redis_prefix:
            transport["global_keyprefix"] = settings.redis_prefix
    if settings.broker.startswith("memory://"):
        transport["polling_interval"] = 0.01
    app.conf.update(
        broker_url=settings.broker,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=DEFAULT_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=False,
        task_retry_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_soft_shutdown_timeout=10.0,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_send_sent_event=False,
    )
    app.cascade_settings = settings
    app.cascade_runtime = None

    @app.task(name=STAGE_TASK, bind=True, shared=False, acks_late=True, max_retries=DB_RETRIES, ignore_result=True)
    def stage(self, tier: str, job_ids: list[str]) -> int:
        from .stage import run_stage

        rt = runtime_of(self.app)
        try:
            messages = run_stage(rt, tier, job_ids)
        except OperationalError as e:
            # the database is away for a moment: try the whole (idempotent) stage again
            if self.request.retries < DB_RETRIES:
                raise self.retry(exc=e, countdown=min(2 ** self.request.retries, 30))
            rt.store.fail_open_jobs(job_ids, f"internal error at tier {tier}: database unavailable: {e}")
            raise
        except Exception as e:
            # A bug or an unexpected backend crash: fail these jobs loudly rather than
            # leave them running forever (the message is acked on failure).
            rt.store.fail_open_jobs(job_ids, f"internal error at tier {tier}: {type(e).__name__}: {e}")
            raise
        for m in messages:
            send_stage(self.app, m.tier, m.queue, m.job_ids)
        return len(job_ids)

    @app.task(name=NOOP_TASK, shared=False, ignore_result=True)
    def noop(counter_key: str | None = None) -> None:
        """Does nothing (the benchmark's baseline and a liveness canary); counts itself if asked."""
        if counter_key:
            _redis(app).incr(counter_key)

    return app


def _redis(app: Celery):
    client = getattr(app, "_cascade_redis", None)
    if client is None:
        import redis

        client = app._cascade_redis = redis.Redis.from_url(app.cascade_settings.broker)
    return client


def runtime_of(app: Celery):
    if app.cascade_runtime is None:
        from .runtime import Runtime

        app.cascade_runtime = Runtime(app.cascade_settings)
    return app.cascade_runtime


def task_id(tier: str, job_ids: Sequence[str]) -> str:
    """Derived from (job, tier): a duplicate message carries the same id."""
    if len(job_ids) == 1:
        return f"{job_ids[0]}@{tier}"
    digest = hashlib.sha256("\n".join(job_ids).encode()).hexdigest()[:10]
    return f"{job_ids[0]}+{len(job_ids) - 1}@{tier}#{digest}"


def send_stage(app: Celery, tier: str, queue: str, job_ids: Sequence[str]) -> None:
    app.send_task(STAGE_TASK, args=[tier, list(job_ids)], queue=queue, routing_key=queue,
                  task_id=task_id(tier, job_ids))


# `celery -A worker.celery_app flower` and `cascade worker` use this one.
app = make_app()
