"""`cascade retry BATCH`: replay a batch's dead letters and expired jobs."""
from __future__ import annotations

from datetime import timedelta

import click

from worker.config.settings import get_settings
from worker.ops.migrate import current
from worker.queue.dispatch import Dispatcher
from worker.queue.runtime import Runtime
from worker.queue.tasks import make_app
from worker.store.schema import now


@click.command()
@click.argument("batch_id")
@click.option("--match", help="only failed jobs whose error contains this text, e.g. 'dead letter' or 'expired'")
def retry(batch_id, match) -> None:
    """Queue again BATCH's failed jobs that never got an answer at the tier they
    failed at (dead letters, expired jobs, internal errors), with a fresh delivery
    count and deadline, and send their stage. Jobs the policy rejected stay failed.
    Fix the cause first (a crashing backend, a missing worker), or they fail again."""
    settings = get_settings()
    if settings.embedded:
        raise click.ClickException("the embedded mode has no broker: re-run the batch with `cascade run`")
    if current(settings.db_url) is None:
        raise click.ClickException("the database has no schema yet: nothing to retry")
    if not settings.store_content:
        raise click.ClickException("CASCADE_STORE_CONTENT is off: failed jobs' prompts were erased, so they "
                                   "cannot be replayed; submit them again")
    rt = Runtime(settings)
    batch = rt.batches.batch(batch_id)
    if batch is None:
        raise click.ClickException(f"no batch {batch_id!r} (list them with `cascade status`)")
    deadline = now() + timedelta(seconds=settings.job_timeout) if settings.job_timeout else None
    reopened = rt.batches.reopen_failed(batch_id, match, deadline)
    digest = batch["portfolio"]
    messages = Dispatcher(make_app(settings, rt), settings.chunk_size, size_of=rt.stage_size).send(
        (job_id, tier, rt.queue_of(digest, tier)) for job_id, tier in reopened)
    click.echo(f"batch {batch_id}: {len(reopened)} failed jobs queued again in {messages} messages")
