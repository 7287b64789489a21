"""`cascade run INPUT.jsonl --portfolio FILE --out OUT.jsonl`: a batch, resumable."""
from __future__ import annotations

import math
from pathlib import Path

import click

from worker.cli.common import load_portfolio_option, user_errors
from worker.config.settings import Settings, get_settings
from worker.queue.batch import default_batch_id, write_results
from worker.queue.items import read_items
from worker.queue.run import run_batch


@click.command()
@click.argument("input_path", metavar="INPUT.jsonl", type=click.Path(dir_okay=False))
@click.option("--portfolio", "portfolio_path", type=click.Path(dir_okay=False), help="portfolio file (default: $CASCADE_PORTFOLIO)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="results, one JSON line per input line (default: INPUT.results.jsonl under the state folder)")
@click.option("--batch", "batch_id", help="batch name (default: derived from the input path and portfolio, so a re-run resumes)")
@click.option("--split", help="only rows whose `split` field equals this (e.g. test)")
@click.option("--limit", type=click.IntRange(min=1), help="only the first N rows")
@click.option("--chunk", type=click.IntRange(1, 1000),
              help=f"jobs per stage message (default: $CASCADE_CHUNK_SIZE or {Settings.model_fields['chunk_size'].default})")
@click.option("--timeout", type=float, help="give up waiting after this many seconds (the batch stays resumable)")
@click.option("--no-wait", is_flag=True, help="submit and return (distributed mode)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def run(input_path, portfolio_path, out_path, batch_id, split, limit, chunk, timeout, no_wait, quiet) -> None:
    """Run every line of INPUT.jsonl through the tiers; write one result line per input line.

    Each line is a JSON object with `prompt` (and optionally `id`, kept as the
    item's key; files in the benchmarks format work as they are). A bad line
    becomes a failed item whose error names the line; the others still run.
    Re-running the same command skips finished items and resumes the rest.
    """
    settings = get_settings()
    if chunk:
        settings = settings.model_copy(update={"chunk_size": chunk})
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        items = read_items(input_path, split=split, limit=limit)
        if not items:
            raise click.ClickException(f"{input_path}: no rows" + (f" with split {split!r}" if split else ""))
        batch_id = batch_id or default_batch_id(input_path, portfolio, f"split={split} limit={limit}")
        report = run_batch(items, portfolio, settings=settings, batch_id=batch_id, source=str(input_path),
                           progress=not quiet, wait=not no_wait, timeout=timeout)
    if report.submitted.warning():
        click.echo(f"warning: {report.submitted.warning()}", err=True)
    if no_wait:
        click.echo(f"batch {batch_id}: {report.submitted.new} new jobs, {report.submitted.sent_jobs} sent "
                   f"in {report.submitted.messages} messages; follow it with `cascade status {batch_id}`")
        return
    out = Path(out_path) if out_path else settings.home / f"{Path(input_path).name.split('.')[0]}.results.jsonl"
    write_results(report.jobs, out)
    b = report.batch
    # fsum of the jobs' costs: exact and independent of the order jobs finished in
    cost = math.fsum(j["cost_usd"] for j in report.jobs)
    click.echo(f"batch {batch_id}: {b['total']} items, {b['succeeded']} succeeded, {b['failed']} failed, "
               f"{b['cancelled']} cancelled; cost ${cost:.6g}")
    counts = report.tier_counts()
    click.echo("answered at: " + ", ".join(f"{t.name} {counts.get(t.name, 0)}" for t in portfolio.tiers))
    graded = [j["correct"] for j in report.jobs if j["correct"] is not None]
    if graded:
        click.echo(f"accuracy (recorded grades): {sum(graded) / len(graded):.4f} over {len(graded)} items")
    failed = [j for j in report.jobs if j["status"] == "failed"]
    for j in failed[:10]:
        click.echo(f"  failed {j['id']}: {j['error']}", err=True)
    if len(failed) > 10:
        click.echo(f"  ... and {len(failed) - 10} more failed (see {out})", err=True)
    click.echo(f"results: {out}")
