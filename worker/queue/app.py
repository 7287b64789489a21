"""The Celery app as every process configures it: one queue per tier, messages acked
late, no tasks (worker.queue.tasks binds the stage, submit and canary tasks for a
worker; a submitter only sends by name, so this is all it needs).

Settings that guard against lost or duplicated work (see docs/operations.md):
- acks_late + retry on a lost worker: a killed worker's message is redelivered,
  and the stage is idempotent, so the job finishes exactly once;
- prefetch 1: a long model call never holds other jobs hostage;
- no result backend: PostgreSQL holds every result;
- every countdown stays far below the visibility timeout, so a delayed retry is
  never redelivered while it waits.

And against whoever else can reach the broker (docs/operations.md, "Security"):
- the app has only the project's tasks: Celery's built-ins (celery.starmap,
  celery.chord, ...) are unregistered, so a message naming one is refused, not run;
- remote control is read-only by default (CASCADE_REMOTE_CONTROL=flower): inspection,
  events and ping, what Flower needs, and nothing that stops, revokes, resizes or
  reroutes a worker; "off" turns it off, "full" is Celery's every command;
- a stage message is checked (shape, size, a tier this worker serves) before any
  work; a malformed one is logged and dropped, never retried.
"""
from __future__ import annotations

import ssl
from typing import Any, Iterable

from celery import Celery
from celery.worker.control import Panel

from worker.config.settings import Settings
from worker.queue.dispatch import MAX_JOB_ID, MAX_STAGE_JOBS

DEFAULT_QUEUE = "cascade.default"

# What Flower reads (CASCADE_REMOTE_CONTROL=flower, the default): inspection and events,
# nothing that stops, revokes, resizes or reroutes a worker.
FLOWER_COMMANDS = frozenset({
    "active", "active_queues", "clock", "conf", "dump_active", "dump_reserved", "dump_revoked", "dump_schedule",
    "dump_tasks", "hello", "ping", "query_task", "registered", "report", "reserved", "revoked", "scheduled",
    "stats", "enable_events", "disable_events", "heartbeat",
})


def base_app(settings: Settings, name: str = "cascade") -> Celery:
    """A Celery app with this project's reliability settings and no tasks."""
    app = Celery(name, set_as_current=False)
    transport: dict = {"visibility_timeout": settings.visibility_timeout}
    if settings.broker.startswith(("redis://", "rediss://", "unix://")):
        transport.update(health_check_interval=25, socket_timeout=30, socket_connect_timeout=10,
                         # sweep for a dead worker's unacked messages every few seconds (kombu's
                         # default scans only every ~100 s), so recovery takes about one visibility timeout
                         unacked_restore_interval=max(1, min(10, settings.visibility_timeout // 10)),
                         unacked_restore_throttle=1)
        if settings.redis_prefix:
            transport["global_keyprefix"] = settings.redis_prefix
        # a worker drains its queues in the order given (worker.queue.dispatch.worker_queues):
        # interactive stages before batch stages
        transport["queue_order_strategy"] = "priority"
    if settings.broker.startswith("memory://"):
        transport["polling_interval"] = 0.01
    if settings.broker.startswith("rediss://"):
        tls: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if settings.broker_tls_ca:
            tls["ssl_ca_certs"] = str(settings.broker_tls_ca)
        app.conf.broker_use_ssl = tls
    app.conf.update(
        # the embedded mode's in-memory broker has no one on it to inspect the workers
        worker_enable_remote_control=settings.remote_control != "off" and not settings.broker.startswith("memory://"),
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
    return app


class BadMessage(ValueError):
    pass


def check_stage_message(tier: Any, job_ids: Any, tiers: Iterable[str] | None) -> None:
    """A stage message's shape and size, before any work (BadMessage if wrong)."""
    if not isinstance(tier, str) or not tier or len(tier) > 64:
        raise BadMessage(f"tier must be a tier name, got {str(tier)[:80]!r}")
    if tiers is not None and tier not in tiers:
        raise BadMessage(f"tier {tier!r} is not served here ({', '.join(sorted(tiers))})")
    if not isinstance(job_ids, list) or not 1 <= len(job_ids) <= MAX_STAGE_JOBS:
        n = len(job_ids) if isinstance(job_ids, list) else type(job_ids).__name__
        raise BadMessage(f"job_ids must be a list of 1 to {MAX_STAGE_JOBS} ids, got {n}")
    for j in job_ids:
        if not isinstance(j, str) or not j or len(j) > MAX_JOB_ID or "\x00" in j:
            raise BadMessage(f"job id {str(j)[:80]!r} is not a job id")


def without_builtin_tasks(app: Celery) -> None:
    """Unregister Celery's built-in tasks (celery.starmap, celery.chord, ...): the app
    keeps only the tasks this project defines, and a message naming one of those
    is refused as unknown."""
    app.finalize()
    for name in list(app.tasks):
        if name.startswith("celery."):
            app.tasks.unregister(name)


def limit_remote_control(mode: str) -> None:
    """In this worker process, serve only the remote-control commands `mode` allows."""
    if mode != "flower":
        return  # "off": the worker does not listen at all; "full": Celery's default
    for name in list(Panel.data):
        if name not in FLOWER_COMMANDS:
            Panel.data.pop(name, None)
            Panel.meta.pop(name, None)


