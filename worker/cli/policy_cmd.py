"""`cascade policy list|add|shadow|promote|rollback`: a portfolio's policy versions in
the database. A promotion switches the tier workers at their next message (no restart);
jobs already started finish under the version they started with."""
from __future__ import annotations

import json

import click

from router.core.comparators import make_comparator
from router.core.policyfile import read_policy_file
from worker.cli.common import load_portfolio_option, short, user_errors
from worker.cli.pseudo_cmd import comparator_options
from worker.config.settings import get_settings
from worker.labwork.retune import (
    RetuneError,
    build_policy,
    file_policy,
    policy_store,
    render_shadow,
    shadow,
    version_policy,
    with_policy,
)
from worker.models.preflight import check_portfolio

_portfolio = click.option("--portfolio", "portfolio_path", type=click.Path(dir_okay=False),
                          help="portfolio file the workers run (default: $CASCADE_PORTFOLIO)")


@click.group()
def policy() -> None:
    """A portfolio's policy versions: list, add, shadow, promote, rollback."""


@policy.command("list")
@_portfolio
@click.option("--json", "as_json", is_flag=True, help="one JSON object per version")
def list_cmd(portfolio_path, as_json) -> None:
    """The versions, which one is promoted, and what each was fitted on."""
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        store = policy_store(get_settings())
        rows = store.versions(portfolio.digest) or [
            {"version": 1, "policy": file_policy(portfolio), "source": "portfolio", "state": "promoted",
             "info": None, "created_at": None, "promoted_at": None}]
    for r in rows:
        if as_json:
            click.echo(json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                                   if k != "portfolio"}))
            continue
        info = r["info"] or {}
        fit = f"  fitted on {info['rows']} rows" if "rows" in info else ""
        sh = info.get("shadow") or {}
        if sh.get("compared"):
            fit += (f"; shadow on {sh['compared']} jobs: accuracy {sh['candidate_accuracy']:.4f} vs "
                    f"{sh['live_accuracy']:.4f}, cost {sh['candidate_cost']:.6g} vs {sh['live_cost']:.6g}")
        click.echo(f"{r['version']:>3}  {r['state']:<9}  {r['source']:<9}  {r['policy']['name']} "
                   f"{short(r['policy'].get('params') or {})}{fit}")


@policy.command("add")
@_portfolio
@click.option("--file", "policy_file", required=True, type=click.Path(dir_okay=False),
              help="a policy file (`cascade tune --out`)")
def add_cmd(portfolio_path, policy_file) -> None:
    """Store a policy file as a candidate version (source: manual)."""
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        store = policy_store(get_settings())
        tuned = read_policy_file(policy_file)
        spec = {"name": tuned.name, "params": tuned.params, "fitted": tuned.fitted}
        try:
            build_policy(portfolio, spec)
        except Exception as e:  # noqa: BLE001 - a policy error names the problem; said with the file's name
            raise RetuneError(f"{policy_file}: does not fit this portfolio's tiers: {e}") from None
        v = store.add(portfolio.digest, spec, file_policy(portfolio), source="manual")
    click.echo(f"stored candidate version {v}: {tuned.name} {short(tuned.params)}")


@policy.command("shadow")
@click.argument("version", type=int)
@_portfolio
@click.option("--limit", type=click.IntRange(1), default=5000, show_default=True,
              help="the most recent finished jobs replayed")
@click.option("--max-calls", type=click.IntRange(0), default=0, show_default=True,
              help="tier calls allowed for answers a version needs that were never recorded")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@comparator_options
def shadow_cmd(version, portfolio_path, limit, max_calls, as_json, comparator, kind, similarity, unparsed) -> None:
    """Replay the recent labelled jobs' recorded attempts under VERSION and under the
    promoted version: accuracy and cost on the same jobs. Where a version needs a tier's
    answer the job never recorded, that tier is called (up to --max-calls calls, counted
    and costed); past that, or for a signal never recorded, the job is counted as not
    replayable."""
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        s = shadow(portfolio, get_settings(), version, make_comparator(comparator, kind=kind, similarity=similarity),
                   limit=limit, max_calls=max_calls)
    if as_json:
        click.echo(json.dumps(s.as_json()))
    else:
        for line in render_shadow(s):
            click.echo(line)


@policy.command("promote")
@click.argument("version", type=int)
@_portfolio
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="seconds to wait for a tier's server that is not reachable yet (the signal check)")
def promote_cmd(version, portfolio_path, wait) -> None:
    """Check that every tier gives the signals VERSION reads (`cascade check`), then make it
    the version the tier workers use: each takes it at its next message, no restart; jobs
    already started finish under their version."""
    settings = get_settings()
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        store = policy_store(settings)
        spec = version_policy(store, portfolio, version)
        _check_signals(portfolio, spec, version, wait)
        try:
            before = store.promote(portfolio.digest, version)
        except LookupError as e:
            raise RetuneError(str(e)) from None
    click.echo(f"promoted version {version} (was {before}): workers take it at their next message; "
               f"undo with `cascade policy rollback`")


@policy.command("rollback")
@_portfolio
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="seconds to wait for a tier's server that is not reachable yet (the signal check)")
def rollback_cmd(portfolio_path, wait) -> None:
    """Promote again the version promoted before the current one (its signals checked first)."""
    settings = get_settings()
    with user_errors():
        portfolio = load_portfolio_option(portfolio_path)
        store = policy_store(settings)
        try:
            _, to = store.rollback_target(portfolio.digest)
            _check_signals(portfolio, to["policy"], to["version"], wait)
            frm, to_v = store.rollback(portfolio.digest, expect=to["version"])
        except LookupError as e:
            raise RetuneError(str(e)) from None
    click.echo(f"rolled back: version {to_v} promoted again (was {frm})")


def _check_signals(portfolio, spec: dict, version: int, wait: float) -> None:
    """`cascade check` for the version's policy: refuse unless every tier gives what it reads."""
    try:
        candidate = with_policy(portfolio, spec)
    except Exception as e:  # noqa: BLE001 - a policy error names the problem
        raise RetuneError(f"version {version} does not fit this portfolio's tiers: {e}") from None
    probes = check_portfolio(candidate, wait=wait)
    bad = [p for p in probes if not p.ok]
    for p in probes:
        click.echo(f"check: {p.status:<11} {p.message()}", err=True)
    if bad:
        raise RetuneError(f"version {version} not promoted: " + "; ".join(p.message() for p in bad))
