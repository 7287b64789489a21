"""`cascade purge --older-than 30d`: delete finished work (retention)."""
from __future__ import annotations

import re
from datetime import timedelta

import click

from worker.config.settings import get_settings
from worker.ops.migrate import current
from worker.store.retention import RetentionStore
from worker.store.schema import now

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(_ctx, _param, text: str) -> timedelta:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not an age: write a number and a unit, e.g. 90s, 12h, 30d, 2w")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


@click.command()
@click.option("--older-than", "age", required=True, callback=parse_age, help="finished longer ago than this: 90s, 12h, 30d, 2w")
@click.option("--dry-run", is_flag=True, help="count what would go, delete nothing")
def purge(age, dry_run) -> None:
    """Delete batches whose jobs all finished longer ago than the given age (with
    their jobs, attempts, feedback, prompts and answers), and such finished jobs outside a
    batch. Open work, and any batch with an open job, is never touched. Uploaded files
    (/v1/files) past their expiry go too, whatever the age given."""
    before = now() - age
    settings = get_settings()
    if current(settings.db_url) is None:
        raise click.ClickException("the database has no schema yet: nothing to purge")
    store = RetentionStore(settings.db_url)
    n = store.purge(before, dry_run=dry_run)
    n_files = store.purge_files(now(), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {n['batches']} batches, {n['jobs']} jobs, {n['attempts']} attempts "
               f"finished before {before:%Y-%m-%d %H:%M:%S} UTC, and {n_files} expired files")
