"""The sweeper: a tier worker's background thread that keeps the jobs it holds
alive (a heartbeat) and re-sends the stage of jobs whose message was lost.

Messages get lost: a worker killed mid-stage (its message waits out the broker's
visibility timeout, an hour by default), a broker restarted without its data, a
worker killed in the instant between popping a message and registering it as
unacknowledged. PostgreSQL still holds each such job as open. Every
`sweep_interval` each tier worker touches the jobs its stages are running (so a
model call of any length never looks lost), then claims the open jobs waiting at
its tier that nothing has touched for `stale_after` seconds (a minute by
default), and sends their stage again (a job past its deadline expires instead:
it fails, and is never re-sent). It skips a sweep while the tier's queue has
messages waiting (a backlog is not a loss), and the claim is one guarded UPDATE,
so with many workers each job is re-sent once. Stages are idempotent: a job whose
message was only slow is looked at twice, never recorded twice.

It is also the worker's watchdog: a consumer that stopped consuming while its
queue fills (`check_consumer`) ends the process, for its manager to restart it.
"""
from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import structlog
from celery import Celery

from router.core.portfolio import Tier
from worker.config.credentials import redact_text
from worker.ops import metrics
from worker.queue.dispatch import Dispatcher
from worker.queue.runtime import Runtime
from worker.store.schema import now

log = structlog.get_logger("cascade.sweeper")


class Sweeper(threading.Thread):
    def __init__(self, app: Celery, runtime: Runtime, tier: Tier, *, interval: float, idle: float, chunk_size: int,
                 watchdog: bool = True):
        super().__init__(name=f"sweeper-{tier.name}", daemon=True)
        self.watchdog = watchdog
        self.app = app
        self.runtime = runtime
        self.dispatcher = Dispatcher(app, chunk_size, publish_wait=runtime.settings.publish_wait,
                                     size_of=runtime.stage_size)
        self.tier = tier
        self.interval = interval
        self.idle = idle

    def run(self) -> None:
        while True:  # a daemon thread: it ends with the worker process
            time.sleep(self.interval)
            try:
                rt = self.runtime  # the heartbeat of the jobs held here, and their leases renewed
                rt.stages.touch(rt.inflight(), rt.holder, rt.lease_until())
                self.sweep()
            except Exception as e:  # the database or broker is away: try again next time
                log.warning("sweep.failed", tier=self.tier.name, error=redact_text(str(e))[:300])

    def queued(self) -> int:
        with self.app.connection_for_read() as conn:
            try:
                return conn.default_channel.queue_declare(self.tier.queue_name, passive=True).message_count
            except conn.channel_errors:
                return 0  # Redis keeps no empty list: "no such queue" is an empty queue

    def check_consumer(self, waiting: int) -> None:
        """The watchdog: messages wait in this tier's queue, nothing runs here and no
        stage has started for `idle` seconds (at least 60), so this process's consumer is stuck (seen
        after a broker killed mid-batch: the connection never reported lost). Exit, for
        the process manager to start a fresh worker; nothing is running to lose."""
        rt = self.runtime
        # at least a minute: a fresh worker's consumer may take a while to start
        if waiting and not rt.inflight() and time.monotonic() - rt.last_stage_at > max(self.idle, 60.0):
            log.error("worker.consumer_stuck", tier=self.tier.name, waiting=waiting,
                      idle_s=round(time.monotonic() - rt.last_stage_at))
            os._exit(75)  # EX_TEMPFAIL: restart me

    def sweep(self) -> int:
        rt = self.runtime
        expired = rt.stages.expire_overdue()
        if expired:  # past their deadline: failed, never re-sent
            for _, tier in expired:
                metrics.EXPIRED.labels(tier or "").inc()
            log.warning("sweep.expired", tier=self.tier.name, jobs=len(expired))
        waiting = self.queued()
        if waiting:
            if self.watchdog:
                self.check_consumer(waiting)
            return 0
        claimed = rt.stages.claim_stale(self.tier.name, now() - timedelta(seconds=self.idle))
        if not claimed:
            return 0
        t = self.tier.name
        self.dispatcher.send((job_id, t, rt.queue_of(digest, t)) for job_id, digest in claimed)
        log.warning("sweep.resent", tier=self.tier.name, jobs=len(claimed))
        return len(claimed)
