"""`cascade calibrate`: label a sample of traffic by agreement with the top tier.

    cascade calibrate --portfolio P --input TRAFFIC.jsonl --sample N --out LABELLED.jsonl

Draws N requests, runs each through every tier of P as ordinary jobs (the
portfolio with the `every-tier` policy: see worker.labwork.calibration), and writes the
benchmarks format with each tier's `correct` = agreement with the top tier's
answer. `cascade tune --data LABELLED.jsonl` then tunes against the top tier.
"""
from __future__ import annotations

import math
from pathlib import Path

import click

from router.core.comparators import make_comparator
from router.core.records import parse_record, record_json, write_records
from router.lab.pseudo_labels import pseudo_label
from worker.cli.common import load_portfolio_option, user_errors
from worker.cli.pseudo_cmd import comparator_options
from worker.config.settings import get_settings
from worker.labwork.calibration import (
    CalibrationError,
    calibration_portfolio,
    calibration_rows,
    draw_sample,
    estimate_tier,
    stored_answers,
)
from worker.queue.batch import default_batch_id, prepare_database
from worker.queue.items import read_items
from worker.queue.run import run_batch
from worker.store.batches import BatchStore
from worker.store.jobs import JobStore


@click.command("calibrate")
@click.option("--portfolio", "portfolio_path", type=click.Path(dir_okay=False),
              help="portfolio file (default: $CASCADE_PORTFOLIO); its last tier is the reference")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="traffic: JSONL with `prompt` (and `id`) per line; gold answers, if any, are ignored")
@click.option("--sample", "n", required=True, type=int, help="requests to draw from the traffic")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="labelled file to write (benchmarks format; .gz to compress)")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the draw and of the train/test split")
@click.option("--test-share", type=click.FloatRange(0.0, 0.9), default=0.3, show_default=True,
              help="share of the sample marked split=test (the rest: train)")
@click.option("--max-spend", type=float, default=None,
              help="USD: refuse to start when the estimated spend exceeds it, and cancel the unfinished jobs "
                   "once the spend passes it")
@click.option("--reuse-batch", "reuse", multiple=True,
              help="a previous batch whose top-tier answers to the same prompts are used instead of calling the "
                   "top tier again (repeatable)")
@click.option("--batch", "batch_id", default=None, help="batch name (default: derived from input, sample and "
                                                         "portfolio, so a re-run resumes)")
@comparator_options
@click.option("--timeout", type=float, help="give up waiting after this many seconds (the batch stays resumable)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def calibrate(portfolio_path, input_path, n, out_path, seed, test_share, max_spend, reuse, batch_id, comparator,
              kind, similarity, unparsed, timeout, quiet) -> None:
    """Run a sample of traffic through every tier and label it by agreement with the top tier."""
    settings = get_settings()
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        full_pf = calibration_portfolio(portfolio)
        top = portfolio.tiers[-1]
        names = portfolio.tier_names
        comp = make_comparator(comparator, kind=kind, similarity=similarity)
        sample, bad = draw_sample(read_items(input_path), n, seed)
        if bad:
            click.echo(f"{len(bad)} unusable lines of {input_path} left out of the draw (first: {bad[0].error})",
                       err=True)
        stored = {}
        if reuse:
            prepare_database(settings)
            stored = stored_answers(BatchStore(settings.db_url), JobStore(settings.db_url), reuse, top,
                                    {it.data["prompt"] for it in sample})
        fresh = [it for it in sample if it.data["prompt"] not in stored]
        known = [it for it in sample if it.data["prompt"] in stored]
        estimate = math.fsum(estimate_tier(t, [it.data["prompt"] for it in fresh]) for t in portfolio.tiers)
        estimate += math.fsum(estimate_tier(t, [it.data["prompt"] for it in known]) for t in portfolio.tiers[:-1])
        saved = estimate_tier(top, [it.data["prompt"] for it in known])
        click.echo(f"calibration: {n} requests x {len(names)} tiers ({', '.join(names)}); reference: {top.name}; "
                   f"estimated spend ${estimate:.4g} (prompt and template tokens ~ characters/2, output = max_tokens)"
                   + (f"; {len(known)} top-tier answers reused from {', '.join(reuse)} (~${saved:.4g} not spent)"
                      if reuse else ""))
        if max_spend is not None and estimate > max_spend:
            raise CalibrationError(f"estimated spend ${estimate:.4g} exceeds --max-spend ${max_spend:g}: "
                                   f"draw a smaller --sample or raise the cap")
        base = batch_id or default_batch_id(input_path, full_pf, f"calibrate sample={n} seed={seed}")
        if any(t.price.is_free for t in portfolio.tiers):
            click.echo("tiers without a configured price ("
                       + ", ".join(t.name for t in portfolio.tiers if t.price.is_free)
                       + ") count $0 in the estimate (a backend that reports its cost is still charged)")
        jobs, spent = [], 0.0
        for part, pf, bid in ((fresh, full_pf, base),
                              (known, calibration_portfolio(portfolio, names[:-1]), f"{base}-reuse")):
            if not part:
                continue
            report = run_batch(part, pf, settings=settings, batch_id=bid, source=str(input_path),
                               progress=not quiet, timeout=timeout,
                               max_cost=None if max_spend is None else max_spend - spent)
            jobs += report.jobs
            spent += math.fsum(j["cost_usd"] for j in report.jobs)
            click.echo(f"batch {bid}: {len(report.jobs)} jobs, cost ${math.fsum(j['cost_usd'] for j in report.jobs):.6g}")
        rows = calibration_rows(jobs, names, stored, test_share=test_share, seed=seed)
        records = [parse_record(r, f"calibration job {r['job']}") for r in rows]
        labelled, rep = pseudo_label(records, top.name, comp, models=names, unparsed=unparsed)
        errors = {t: sum(1 for j in jobs for a in j["attempts"] if a["tier"] == t and a["error"]) for t in names}
        write_records(out_path, [record_json(r, {"job": row["job"]}) for r, row in zip(labelled, rows)])
    click.echo(f"spent ${spent:.6g} on {len(jobs)} jobs" + (f" (estimate ${estimate:.4g})" if jobs else ""))
    if any(errors.values()):
        click.echo("failed calls (no answer; a lower tier's counts as disagreement, the top tier's leaves the row "
                   "unlabelled): " + ", ".join(f"{t} {k}" for t, k in errors.items() if k))
    click.echo("\n".join(rep.lines()))
    click.echo(f"wrote {out_path}: `correct` is agreement with the top tier {top.name!r}, not a grade against the "
               f"truth; tune with `cascade tune --data {Path(out_path)} --policy threshold --risk-bound 0.05`")
