"""`cascade retune`: refit the live policy on graded and top-tier-labelled live jobs and
store it as a candidate policy version (the work is worker.labwork.retune's)."""
from __future__ import annotations

import json

import click

from router.core.comparators import make_comparator
from router.lab.tuning import Target
from worker.cli.common import load_portfolio_option, short, user_errors
from worker.cli.pseudo_cmd import comparator_options
from worker.config.settings import get_settings
from worker.labwork.retune import render_shadow, retune, shadow


@click.command()
@click.option("--portfolio", "portfolio_path", type=click.Path(dir_okay=False),
              help="portfolio file the workers run (default: $CASCADE_PORTFOLIO)")
@click.option("--policy", "family", default=None,
              help="policy family to fit (default: the promoted version's; `auto` chooses one by nested CV)")
@click.option("--budget", type=float, default=None, help="target: mean cost per job")
@click.option("--target-accuracy", type=float, default=None, help="target: accuracy to reach at the lowest cost")
@click.option("--limit", type=click.IntRange(1), default=5000, show_default=True,
              help="the most recent finished jobs read")
@click.option("--audit-share", type=click.FloatRange(0, 1), default=None,
              help="share of the recent jobs that stopped below the top tier sent again through every tier to "
                   "label them (default: $CASCADE_RETUNE_AUDIT_SHARE, 0)")
@click.option("--audit-max-usd", type=click.FloatRange(0), default=None,
              help="the audit's spend cap in USD (default: $CASCADE_RETUNE_AUDIT_MAX_USD, 1)")
@click.option("--min-rows", type=click.IntRange(1), default=20, show_default=True,
              help="refuse to fit on fewer labelled rows")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-shadow", is_flag=True, help="store the candidate without the shadow comparison")
@click.option("--max-calls", type=click.IntRange(0), default=0, show_default=True,
              help="shadow: tier calls allowed for answers a version needs that were never recorded")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@comparator_options
def retune_cmd(portfolio_path, family, budget, target_accuracy, limit, audit_share, audit_max_usd, min_rows, seed,
               no_shadow, max_calls, as_json, comparator, kind, similarity, unparsed) -> None:
    """Refit the portfolio's live policy (target: the promoted version's accuracy on the same
    rows at the lowest cost, unless --budget or --target-accuracy) on its recent jobs, labelled by grades (`cascade feedback`)
    or by agreement with the top tier, store it as a candidate version, and compare it in
    shadow with the promoted version. Promote it with `cascade policy promote VERSION`."""
    if budget is not None and target_accuracy is not None:
        raise click.UsageError("give at most one of --budget, --target-accuracy")
    target = (Target.budget(budget) if budget is not None else
              Target.accuracy(target_accuracy) if target_accuracy is not None else None)
    settings = get_settings()
    say = (lambda s: click.echo(s, err=True)) if as_json else click.echo
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        comp = make_comparator(comparator, kind=kind, similarity=similarity)
        r = retune(portfolio, settings, comp, family=family, target=target, limit=limit, audit_share=audit_share,
                   audit_max_usd=audit_max_usd, seed=seed, min_rows=min_rows, say=say)
        s = None if no_shadow else shadow(portfolio, settings, r.version, comp, limit=limit, max_calls=max_calls)
    if as_json:
        click.echo(json.dumps({"version": r.version, "policy": {k: r.policy[k] for k in ("name", "params")},
                               "rows": r.rows, "from_version": r.live_version,
                               "shadow": s.as_json() if s else None}))
        return
    click.echo(f"stored candidate version {r.version}: {r.policy['name']} {short(r.policy['params'])} "
               f"(fitted on {r.rows} rows; the promoted version is {r.live_version})")
    if s is not None:
        for line in render_shadow(s):
            click.echo(line)
    click.echo(f"promote it with: cascade policy promote {r.version} --portfolio {portfolio_path or '$CASCADE_PORTFOLIO'}")
