"""`cascade feedback add|export`: graded outcomes of production jobs, stored in the
database and exported in the benchmarks format for re-tuning on live traffic."""
from __future__ import annotations

from pathlib import Path

import click

from worker.cli.common import user_errors
from worker.config.settings import get_settings
from worker.ops.migrate import current
from worker.service.feedback import export_rows, parse_grades, record, write_export
from worker.store.batches import BatchStore
from worker.store.feedback import FeedbackStore
from worker.store.jobs import JobStore

FEEDBACK_REVISION = "0002"


def _db_url() -> str:
    settings = get_settings()
    rev = current(settings.db_url)
    if rev is None:
        raise click.ClickException("the database has no schema yet: nothing has run (or run `cascade db upgrade`)")
    if rev < FEEDBACK_REVISION:
        raise click.ClickException(f"the database schema is at revision {rev}, feedback needs {FEEDBACK_REVISION}: "
                                   f"run `cascade db upgrade`")
    return settings.db_url


@click.group()
def feedback() -> None:
    """Record graded outcomes of jobs and export them for re-tuning."""


@feedback.command("add")
@click.argument("batch_id", required=False)
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False),
              help='grades, one JSON line each: {"id": ITEM | "job": JOB, "correct": 0..1, "gold"?, "tiers"?}')
@click.option("--job", "job_id", help="grade one job (with --correct)")
@click.option("--correct", type=click.FloatRange(0, 1), help="the grade of --job's final answer")
@click.option("--gold", default=None, help="the reference answer of --job")
def add(batch_id, path, job_id, correct, gold) -> None:
    """Store grades for BATCH's jobs from --file, or one grade with --job/--correct."""
    if (path is None) == (job_id is None):
        raise click.UsageError("give --file (with BATCH for item ids) or --job with --correct")
    if job_id is not None and correct is None:
        raise click.UsageError("--job needs --correct")
    with user_errors():
        url = _db_url()
        if batch_id is not None and BatchStore(url).batch(batch_id) is None:
            raise click.ClickException(f"no batch {batch_id!r} (list them with `cascade status`)")
        if path is not None:
            grades = parse_grades(Path(path).read_text(encoding="utf-8").splitlines(), Path(path).name)
            n = record(FeedbackStore(url), JobStore(url), batch_id, grades, Path(path).name)
        else:
            n = record(FeedbackStore(url), JobStore(url), batch_id, [{"key": None, "job": job_id, "correct": correct,
                                                                      "gold": gold, "tiers": {}, "line": 1}], "--job")
    click.echo(f"recorded {n} grade(s)")


@feedback.command("export")
@click.argument("batch_id")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="benchmarks-format file (.jsonl or .jsonl.gz)")
@click.option("--split", default="train", show_default=True, help="the split written on every row")
def export(batch_id, out, split) -> None:
    """Write BATCH's graded jobs in the benchmarks format (`cascade tune --data OUT`)."""
    with user_errors():
        url = _db_url()
        if BatchStore(url).batch(batch_id) is None:
            raise click.ClickException(f"no batch {batch_id!r} (list them with `cascade status`)")
        rows = export_rows(FeedbackStore(url), JobStore(url), batch_id, split)
        if not rows:
            raise click.ClickException(f"batch {batch_id!r} has no graded jobs (record some with `cascade feedback add`)")
        write_export(rows, out)
    click.echo(f"wrote {len(rows)} graded row(s) to {out}")
