"""Sending stages: the one place a stage message leaves, whoever sends it (the
submitter, a stage escalating, the sweeper, `cascade resume`).

Jobs are grouped by (tier, queue) and chunked, so a batch travels as few messages
(one message, one read, one call of generate_many, one write per chunk per tier);
a chunk's size is the tier backend's `stage_size` under CASCADE_CHUNK_SIZE. A message's task id
says which jobs and tier it carries, and ends in 128 random bits: nobody can
predict an id and revoke it before it is sent, and a re-send (the sweeper,
`cascade resume`) never reuses one. Duplicates need no shared id: a stage is
idempotent in the database (worker.store.stages).

On a Redis broker a queue's first message goes through Celery's send_task, which
declares the queue; later ones are written with one LPUSH by worker.queue.publish,
the same message for a fraction of the Python.
"""
from __future__ import annotations

import secrets
import time
from typing import Callable, Iterable, Sequence

import structlog
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError

from worker.queue import publish

log = structlog.get_logger("cascade.dispatch")

STAGE_TASK = "cascade.stage"
MAX_STAGE_JOBS = 1000  # the largest chunk_size; a message with more is refused
MAX_JOB_ID = 200  # the jobs.id column
SUBMIT_TASK = "cascade.submit"
SUBMIT_QUEUE = "cascade.submit"
# Priorities: an interactive job's stages go to its tier's `.interactive` queue,
# which the tier's workers drain before the plain (batch) queue.
INTERACTIVE, BATCH = "interactive", "batch"
PRIORITIES = (INTERACTIVE, BATCH)


def queue_for(tier_queue: str, priority: str | None) -> str:
    return f"{tier_queue}.{INTERACTIVE}" if priority == INTERACTIVE else tier_queue


def worker_queues(tier_queue: str, *, submit: bool = True) -> list[str]:
    """A tier worker's queues, in the order it drains them (Redis transport option
    queue_order_strategy=priority): interactive stages, submissions, batch stages."""
    return [queue_for(tier_queue, INTERACTIVE)] + ([SUBMIT_QUEUE] if submit else []) + [tier_queue]


def task_id(tier: str, job_ids: Sequence[str]) -> str:
    more = f"+{len(job_ids) - 1}" if len(job_ids) > 1 else ""
    # URL-safe characters only: Flower links to /task/<id>, and a '#' would cut it short
    return f"{job_ids[0][:80]}{more}@{tier}~{secrets.token_hex(16)}"


def stage_repr(tier: str, job_ids: Sequence[str]) -> str:
    n = len(job_ids)
    return f"tier={tier} jobs={n} first={job_ids[0]}" if n else f"tier={tier} jobs=0"


def chunks(seq: Sequence[str], n: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class Dispatcher:
    """Sends stage messages. A send rides out a broker restart: kombu reconnects and
    publishes again, every second or two, for up to `publish_wait` seconds (the
    messages of a stage whose results are committed must not wait for the sweeper)."""

    def __init__(self, app: Celery, chunk_size: int, *, publish_wait: float = 600.0,
                 size_of: Callable[[str, str, int], int] | None = None):
        if not 1 <= chunk_size <= MAX_STAGE_JOBS:
            raise ValueError(f"chunk_size must be in 1..{MAX_STAGE_JOBS}, got {chunk_size}")
        self.app = app
        self.chunk_size = chunk_size
        # (tier, queue, chunk_size) -> jobs per message to that queue (Runtime.stage_size: the tier's backend)
        self.size_of = size_of
        self.publish_wait = publish_wait
        # intervals 0, 0.5, 1, 1.5, 2, 2, ...: about publish_wait seconds in all
        self.retry_policy = {"interval_start": 0, "interval_step": 0.5, "interval_max": 2.0,
                             "max_retries": max(3, int(publish_wait / 2) + 3)}
        self.lean = publish.RedisPublisher(app) if publish.usable(app) else None

    def send_one(self, tier: str, queue: str, job_ids: Sequence[str]) -> None:
        # sent_at: the age of a queue's oldest message (worker.ops.metrics) is read from it;
        # argsrepr: what Flower shows as the task's arguments (the tier and job count, not every id)
        # kombu's retry policy covers a publish that fails; a connection that cannot be made
        # (a broker cut off by the network: the connect times out) is raised from outside it,
        # so the send is tried again here too, for the same publish_wait in all
        deadline = time.monotonic() + self.publish_wait
        delay = 0.5
        task = task_id(tier, job_ids)  # one id for every try: a duplicate delivery is a duplicate, stages are idempotent
        lean = self.lean
        if lean is not None and lean.ready(queue):
            try:
                lean.send(STAGE_TASK, task, [tier, list(job_ids)], queue, stage_repr(tier, job_ids), time.time())
                return
            except publish.ERRORS as e:
                lean.forget()
                if time.monotonic() > deadline:  # the LPUSH waited out the socket timeout past publish_wait
                    raise BrokerError(str(e)) from e
                # tried again at once through send_task, as kombu's retry policy would (its first
                # interval is 0), which reconnects and declares the queue again
                log.warning("dispatch.send_retry", tier=tier, queue=queue, jobs=len(job_ids), error=str(e)[:200],
                            retry_in_s=0)
        while True:
            try:
                self.app.send_task(STAGE_TASK, args=[tier, list(job_ids)], queue=queue, routing_key=queue,
                                   task_id=task, headers={"sent_at": time.time()},
                                   argsrepr=stage_repr(tier, job_ids), retry=True, retry_policy=self.retry_policy)
            except (BrokerError, OSError) as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("dispatch.send_retry", tier=tier, queue=queue, jobs=len(job_ids), error=str(e)[:200],
                            retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if lean is not None:
                lean.declared(queue)
            return

    def send(self, targets: Iterable[tuple[str, str, str]]) -> int:
        """Send the stage of each (job id, tier, queue); returns the number of messages."""
        grouped: dict[tuple[str, str], list[str]] = {}
        for job_id, tier, queue in targets:
            grouped.setdefault((tier, queue), []).append(job_id)
        messages = 0
        for (tier, queue), ids in grouped.items():
            size = self.size_of(tier, queue, self.chunk_size) if self.size_of else self.chunk_size
            for chunk in chunks(ids, max(1, min(size, MAX_STAGE_JOBS))):
                self.send_one(tier, queue, chunk)
                messages += 1
        return messages
