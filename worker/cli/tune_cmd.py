"""`cascade tune`: fit a policy's knobs on the train split and write a policy file."""
from __future__ import annotations

import json

import click

from router.core.policies import make_policy
from router.core.policy import tier_infos
from router.core.policyfile import TunedPolicy, write_policy_file
from router.lab import drift
from router.lab.evaluate import VARIANTS
from router.lab.labelled import build_table, prepare
from router.lab.pseudo_labels import pseudo_reference
from router.lab.risk import PROCEDURES
from router.lab.simulate import simulate
from router.lab.tuners import RiskSpec, confirm, make_tuner
from router.lab.tuners.auto import describe as describe_auto
from router.lab.tuning import Target, TuningError
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


def rows_needed_line(rc: dict) -> str:
    """How many rows the bound needs, in words (shared with the evaluator's report)."""
    base = (f"rows: even a cascade with no loss needs {rc['zero_loss_rows']} calibration rows to certify "
            f"{rc['alpha']:g} at delta {rc['delta']:g}")
    need = rc.get("rows_needed")
    if need and need["calibration_rows"] is not None:
        return (base + f"; the cheapest tested cascade with loss rate {need['loss_rate']:.4f} would be certified "
                f"with about {need['calibration_rows']} calibration rows ({need['total_rows']} rows in all)")
    return base


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
    names = _mapping(tier_names)
    with user_errors():
        L = prepare(data, models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
                    signal=signal)
        unknown = [m for m in names if m not in L.models]
        if unknown:
            raise click.ClickException(f"--tier-names: model(s) {unknown} are not evaluated; models: {', '.join(L.models)}")
        if fit_split == "all":
            rows = list(L.records)
        else:
            rows = [r for r in L.records if r.split == fit_split]
            if not rows:
                present = sorted({str(r.split) for r in L.records})
                raise click.ClickException(
                    f"{L.name} has no {fit_split!r} rows to fit on (splits: {', '.join(present)}); "
                    f"use --fit-split with one of them, or --fit-split all to fit on every row")
        variant = VARIANTS.get(policy)
        name = variant.policy if variant else policy
        opts: dict = dict(variant.options) if variant else {}
        if name in ("threshold", "rational"):
            if L.signal is not None:
                opts["signal"] = L.signal
            if chain:
                opts = {"signal": opts.get("signal"), "chain": [c.strip() for c in chain.split(",") if c.strip()]}
            if min_tiers is not None:
                opts["min_tiers"] = min_tiers
            if max_tiers is not None:
                opts["max_tiers"] = max_tiers
            if no_prune:
                opts["prune"] = False
        elif chain or min_tiers or max_tiers or no_prune:
            raise click.UsageError("--chain, --min-tiers, --max-tiers and --no-prune apply to the threshold policy")
        if name == "random":
            opts["seed"] = seed
        if name == "auto":  # the family and its knobs chosen by nested cross-validation (router.lab.tuners.auto)
            opts["seed"] = seed
            if reference and risk_bound is None:
                opts["reference"] = names.get(reference, reference)
            if L.signal is not None:
                opts["signal"] = L.signal
        if risk_bound is not None:
            opts["risk"] = RiskSpec(risk_bound, delta, risk_procedure, learn_fraction, reference, seed)
        tiers = L.tiers(rows, names)
        table = build_table(rows, tiers)
        labels = next((r.labels for r in rows if r.labels), None)
        try:
            fitted = confirm(make_tuner(name, table, tier_infos(tiers), **opts).select(target), rows, tiers)
        except TuningError as e:
            raise click.ClickException(f"{L.name}: {policy}: {e}") from None
        acc, cost = table.accuracy(), table.mean_cost()
        b = max(range(len(tiers)), key=lambda i: (acc[i], -cost[i]))
        # what the tuned tiers saw on these rows, for `cascade status --drift`
        replayed = simulate(make_policy(fitted.policy, tier_infos(tiers), fitted.params), tiers, rows)
        tuned = TunedPolicy(
            name=fitted.policy,
            params=fitted.params,
            fitted={
                "data": L.path,
                "target": target.as_json() | ({"resolved_accuracy": fitted.target_accuracy}
                                              if target.kind == "match_best" else {}),
                "split": fit_split,
                "train_rows": fitted.train_rows,
                "train_accuracy": fitted.train_accuracy,
                "train_cost": fitted.train_cost,
                "cost_unit": L.cost_unit,
                "best_single_train": {"tier": tiers[b].name, "accuracy": float(acc[b]), "cost": float(cost[b])},
                "tiers": {t.name: t.model for t in tiers},
                "signal": L.signal,
                **({"labels": labels} if labels else {}),
                **({"search": fitted.search} if fitted.search else {}),
                **({"note": fitted.note} if fitted.note else {}),
                "reference": drift.profile(replayed, table, L.signal),
            },
        )
        write_policy_file(out, tuned)
        unit = "USD" if L.cost_unit == "usd" else "strong-call share"
        click.echo(f"{fitted.policy}: {json.dumps(fitted.params)}")
        if fitted.search and "auto" in fitted.search:
            click.echo(describe_auto(fitted.search["auto"]))
        click.echo(f"train ({fitted.train_rows} rows): accuracy {fitted.train_accuracy:.4f}, cost {fitted.train_cost:.6g} "
                   f"{unit} per query; best single on train: {tiers[b].name} {acc[b]:.4f} at {cost[b]:.6g}")
        top = pseudo_reference(labels)
        if labels:
            click.echo(f"labels: {labels}: every accuracy here is agreement with "
                       f"{names.get(top, top) if top else 'that model'}, not accuracy against the truth")
        rc = fitted.search.get("risk_control") if fitted.search else None
        if rc is not None:
            if top is not None and rc["reference"] == names.get(top, top) and "upper_bound" in rc:
                click.echo(f"guarantee: the cascade agrees with the top model {rc['reference']} on at least "
                           f"{1 - rc['alpha']:.4g} of traffic, with probability {1 - rc['delta']:g} (traffic "
                           f"exchangeable with the calibration rows)")
            click.echo(f"guarantee{' (as the tuner states it)' if top else ''}: {fitted.note}")
            click.echo(f"assumption: {rc['assumption']}")
            if "upper_bound" in rc:
                click.echo(f"calibration: {rc['calibration_losses']:g} losses in {rc['calibration_rows']} rows, "
                           f"p-value {rc['p_value']:.3g}, risk <= {rc['upper_bound']:.4f} at delta {rc['delta']:g}")
            click.echo(rows_needed_line(rc))
        click.echo(f"wrote {out}")
