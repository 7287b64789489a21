"""`cascade cancel BATCH`: stop a batch's unfinished jobs (finished ones keep their results)."""
from __future__ import annotations

import click

from worker.config.settings import get_settings
from worker.ops.migrate import current
from worker.store.batches import BatchStore


@click.command()
@click.argument("batch_id")
def cancel(batch_id) -> None:
    """Mark BATCH's queued and running jobs cancelled.

    A stage already calling a model finishes its call (its attempt is recorded and
    costed) but can no longer change the job; queued stages skip cancelled jobs.
    """
    settings = get_settings()
    if current(settings.db_url) is None:
        raise click.ClickException("the database has no schema yet: nothing to cancel")
    store = BatchStore(settings.db_url, keep_content=settings.store_content)
    if store.batch(batch_id) is None:
        raise click.ClickException(f"no batch {batch_id!r} (list them with `cascade status`)")
    n = store.cancel_batch(batch_id)
    click.echo(f"batch {batch_id}: {n} unfinished jobs cancelled")
