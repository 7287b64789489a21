"""`cascade feedback add|export`: graded outcomes of production jobs, stored in the
database and exported in the benchmarks format for re-tuning on live traffic."""
from __future__ import annotations

import click

from worker.cli.common import user_errors
from worker.config.settings import get_settings
from worker.service.feedback import export as export_graded
from worker.service.feedback import feedback_store, record_file, record_one


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
        store = feedback_store(get_settings().db_url)
        if path is not None:
            n = record_file(store, batch_id, path)
        else:
            n = record_one(store, batch_id, job_id, correct, gold)
    click.echo(f"recorded {n} grade(s)")


@feedback.command("export")
@click.argument("batch_id")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="benchmarks-format file (.jsonl or .jsonl.gz)")
@click.option("--split", default="train", show_default=True, help="the split written on every row")
def export(batch_id, out, split) -> None:
    """Write BATCH's graded jobs in the benchmarks format (`cascade tune --data OUT`)."""
    with user_errors():
        n = export_graded(feedback_store(get_settings().db_url), batch_id, out, split)
    click.echo(f"wrote {n} graded row(s) to {out}")
