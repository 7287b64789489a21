"""`cascade check`: probe a portfolio's tiers the way a tier worker does at start
(worker.models.preflight) and say, per tier, whether its backend answers with every
signal the policy reads there."""
from __future__ import annotations

import json

import click

from worker.cli.common import load_portfolio_option, user_errors
from worker.models.preflight import check_portfolio


@click.command()
@click.option("--portfolio", "portfolio_path", type=click.Path(dir_okay=False),
              help="portfolio file (default: $CASCADE_PORTFOLIO)")
@click.option("--tier", "tiers", multiple=True, help="only this tier (repeatable; default: every tier)")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="seconds to wait for a server that is not reachable yet")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per tier")
def check(portfolio_path, tiers, wait, as_json) -> None:
    """Send one small probe to each tier's backend (a local model is loaded) and check that
    the answer carries every signal the portfolio's policy reads at that tier. Exit code 1
    if a tier's server lacks one, failed or could not be reached."""
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        unknown = [t for t in tiers if t not in {x.name for x in portfolio.tiers}]
        if unknown:
            raise click.ClickException(f"no tier {', '.join(map(repr, unknown))} in the portfolio; tiers: "
                                       f"{', '.join(t.name for t in portfolio.tiers)}")
        probes = check_portfolio(portfolio, list(tiers) or None, wait=wait,
                                 on_wait=lambda p, d: click.echo(f"waiting {d:g}s for {p.server}: {p.error}",
                                                                 err=True))
    for p in probes:
        if as_json:
            click.echo(json.dumps({"tier": p.tier, "kind": p.kind, "server": p.server, "status": p.status,
                                   "reads": list(p.needs.signals), "signals": p.signals, "missing": p.missing,
                                   "unread": p.unread, "error": p.error, "answer": p.answer,
                                   "seconds": round(p.seconds, 3), "message": p.message()}))
        else:
            click.echo(f"{p.status:<11} {p.message()}")
    if not all(p.ok for p in probes):
        raise SystemExit(1)
