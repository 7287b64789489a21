"""`cascade tune`: fit a policy's knobs on the train split and write a policy file
(the work is router.lab.tune's; this module reads the options and prints)."""
from __future__ import annotations

import click

from router.lab.risk import PROCEDURES
from router.lab.tune import CHAIN_SEARCH, policy_name, render
from router.lab.tune import tune as fit_policy
from router.lab.tuners import RiskSpec
from router.lab.tuning import Target
from worker.cli.common import user_errors


def _mapping(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        model, sep, tier = part.partition("=")
        if not sep or not model.strip() or not tier.strip():
            raise click.BadParameter(f"expected model=tier, got {part!r}", param_hint="--tier-names")
        out[model.strip()] = tier.strip()
    return out


@click.command("tune")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="labelled traffic in the benchmarks format (.jsonl or .jsonl.gz)")
@click.option("--policy", required=True,
              help="policy name (threshold, single, random, ...), a threshold variant, or auto (the family and its "
                   "knobs chosen by nested cross-validation on the rows fitted on)")
@click.option("--budget", type=float, default=None,
              help="mean cost per query to stay within (USD; share of strong calls if the file has no costs)")
@click.option("--target-accuracy", type=float, default=None, help="train accuracy to reach at the lowest cost")
@click.option("--match-best", is_flag=True, help="target = the train accuracy of the best single model")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="policy file to write (JSON)")
@click.option("--fit-split", default="train", show_default=True,
              help="rows to fit on: a split name, or 'all' for every row (files without a train split)")
@click.option("--models", default=None, help="comma-separated subset of the file's models (default: all)")
@click.option("--signal", type=click.Choice(["logprob", "p_true"]), default=None,
              help="confidence signal (default: the one the file records)")
@click.option("--tier-names", default=None,
              help="model=tier,... : name the tiers as in your portfolio (default: tier name = model id)")
@click.option("--chain", default=None, help="threshold: fix the chain (comma-separated tiers), fit only the thresholds")
@click.option("--min-tiers", type=click.IntRange(1, 4), default=None, help="threshold: shortest chain searched (default 2)")
@click.option("--max-tiers", type=click.IntRange(1, 4), default=None, help="threshold: longest chain searched (default 4)")
@click.option("--no-prune", is_flag=True, help="threshold: also search models dominated on train")
@click.option("--seed", default=0, show_default=True, type=int, help="random: seed of the per-query draw")
@click.option("--risk-bound", type=float, default=None,
              help="certify the knobs (Learn then Test): the share of queries the reference model answers right "
                   "and the cascade wrong stays <= this, with probability >= 1 - delta (threshold policy)")
@click.option("--delta", type=float, default=0.1, show_default=True, help="with --risk-bound: failure probability")
@click.option("--risk-procedure", type=click.Choice(list(PROCEDURES)), default="fixed-sequence", show_default=True,
              help="with --risk-bound: the family-wise testing procedure")
@click.option("--reference", default=None,
              help="with --risk-bound: the reference tier (default: the most accurate on the learn part); with "
                   "--policy auto: the model to reach parity with (default: the best on the rows fitted on)")
@click.option("--learn-fraction", type=float, default=1 / 3, show_default=True,
              help="with --risk-bound: share of the rows that learns the order of the tested configurations")
def tune(data, policy, budget, target_accuracy, match_best, out, fit_split, models, signal, tier_names, chain,
         min_tiers, max_tiers, no_prune, seed, risk_bound, delta, risk_procedure, reference, learn_fraction):
    """Fit POLICY on the train rows of DATA to a budget, a target accuracy or the
    best single model (or, with --risk-bound, to a certified loss bound against a
    reference model), and write {"name", "params", "fitted"} to OUT; point a
    portfolio at it with `[policy] file = "OUT"`."""
    given = [x is not None for x in (budget, target_accuracy)] + [match_best]
    if risk_bound is not None and not any(given):
        match_best = True  # the bound is the quality target; among certified knobs the cheapest wins
        given = [False, False, True]
    if sum(given) != 1:
        raise click.UsageError("give exactly one of --budget, --target-accuracy, --match-best (or --risk-bound)")
    if risk_bound is None and (risk_procedure != "fixed-sequence" or (reference and policy != "auto")):
        raise click.UsageError("--reference and --risk-procedure apply with --risk-bound (--reference also with "
                               "--policy auto: parity with that model)")
    target = (Target.budget(budget) if budget is not None else
              Target.accuracy(target_accuracy) if target_accuracy is not None else Target.match_best())
    if target_accuracy is not None and not 0.0 <= target_accuracy <= 1.0:
        raise click.BadParameter("must lie in [0, 1]", param_hint="--target-accuracy")
    if budget is not None and budget < 0:
        raise click.BadParameter("must be >= 0", param_hint="--budget")
    if policy_name(policy) not in CHAIN_SEARCH and (chain or min_tiers or max_tiers or no_prune):
        raise click.UsageError("--chain, --min-tiers, --max-tiers and --no-prune apply to the threshold policy")
    names = _mapping(tier_names)
    with user_errors():
        risk = (RiskSpec(risk_bound, delta, risk_procedure, learn_fraction, reference, seed)
                if risk_bound is not None else None)
        tuned = fit_policy(data, policy, target, out, fit_split=fit_split,
                           models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
                           signal=signal, tier_names=names,
                           chain=[c.strip() for c in chain.split(",") if c.strip()] if chain else None,
                           min_tiers=min_tiers, max_tiers=max_tiers, prune=not no_prune, seed=seed, risk=risk,
                           reference=reference)
    click.echo(render(tuned))
    click.echo(f"wrote {out}")
