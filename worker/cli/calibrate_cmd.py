"""`cascade calibrate`: label a sample of traffic by agreement with the top tier.

    cascade calibrate --portfolio P --input TRAFFIC.jsonl --sample N --out LABELLED.jsonl

Draws N requests, runs each through every tier of P as ordinary jobs (the
portfolio with the `every-tier` policy: see worker.labwork.calibration), and writes the
benchmarks format with each tier's `correct` = agreement with the top tier's
answer. `cascade tune --data LABELLED.jsonl` then tunes against the top tier.
"""
from __future__ import annotations

from pathlib import Path

import click

from router.core.comparators import make_comparator
from worker.cli.common import load_portfolio_option, user_errors
from worker.cli.pseudo_cmd import comparator_options
from worker.config.settings import get_settings
from worker.labwork.calibration import draw, run_calibration


def _log(message: str) -> None:
    click.echo(message, err=True)


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
        comp = make_comparator(comparator, kind=kind, similarity=similarity)
        d = draw(portfolio, input_path, n, seed, reuse, settings, log=_log)
        top = portfolio.tiers[-1]
        names = portfolio.tier_names
        click.echo(f"calibration: {n} requests x {len(names)} tiers ({', '.join(names)}); reference: {top.name}; "
                   f"estimated spend ${d.estimate:.4g} (prompt and template tokens ~ characters/2, output = max_tokens)"
                   + (f"; {len(d.known)} top-tier answers reused from {', '.join(reuse)} (~${d.saved:.4g} not spent)"
                      if reuse else ""))
        d.check_spend(max_spend)
        if any(t.price.is_free for t in portfolio.tiers):
            click.echo("tiers without a configured price ("
                       + ", ".join(t.name for t in portfolio.tiers if t.price.is_free)
                       + ") count $0 in the estimate (a backend that reports its cost is still charged)")
        done = run_calibration(d, comp, out_path, input_path=input_path, n=n, seed=seed, test_share=test_share,
                               unparsed=unparsed, settings=settings, batch_id=batch_id, max_spend=max_spend,
                               timeout=timeout, progress=not quiet, say=click.echo)
    click.echo(f"spent ${done.spent:.6g} on {len(done.jobs)} jobs"
               + (f" (estimate ${d.estimate:.4g})" if done.jobs else ""))
    if any(done.errors.values()):
        click.echo("failed calls (no answer; a lower tier's counts as disagreement, the top tier's leaves the row "
                   "unlabelled): " + ", ".join(f"{t} {k}" for t, k in done.errors.items() if k))
    click.echo("\n".join(done.report.lines()))
    click.echo(f"wrote {out_path}: `correct` is agreement with the top tier {top.name!r}, not a grade against the "
               f"truth; tune with `cascade tune --data {Path(out_path)} --policy threshold --risk-bound 0.05`")
