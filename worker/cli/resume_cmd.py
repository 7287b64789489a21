"""`cascade resume BATCH`: send again the current stage of a batch's unfinished jobs."""
from __future__ import annotations

from datetime import timedelta

import click

from worker.config.settings import get_settings
from worker.ops.migrate import current
from worker.queue.batch import resend_open
from worker.queue.dispatch import Dispatcher
from worker.queue.runtime import Runtime
from worker.queue.tasks import make_app
from worker.store.schema import now


@click.command()
@click.argument("batch_id")
@click.option("--idle", type=click.FloatRange(min=0), default=0, show_default=True,
              help="only jobs not updated for this many seconds (run it from cron with a value above the "
                   "longest stage, as a sweeper for messages a broker lost)")
def resume(batch_id, idle) -> None:
    """Recover a batch whose messages were lost (a Redis restart without AOF, a
    submitter that died between committing its jobs and sending them). Safe to run
    at any time: stages are idempotent, so a job whose message still exists is
    only looked at twice, never run twice."""
    settings = get_settings()
    if settings.embedded:
        raise click.ClickException("the embedded mode has no broker to resend to: re-run the same "
                                   "`cascade run` command to resume a batch")
    if current(settings.db_url) is None:
        raise click.ClickException("the database has no schema yet: nothing to resume")
    rt = Runtime(settings)
    if rt.batches.batch(batch_id) is None:
        raise click.ClickException(f"no batch {batch_id!r} (list them with `cascade status`)")
    dispatcher = Dispatcher(make_app(settings, rt), settings.chunk_size, publish_wait=settings.publish_wait,
                            size_of=rt.stage_size)
    idle_before = now() - timedelta(seconds=idle) if idle else None
    jobs, messages = resend_open(rt, dispatcher, batch_id, idle_before=idle_before)
    click.echo(f"batch {batch_id}: the current stage of {jobs} unfinished jobs sent again in {messages} messages")
