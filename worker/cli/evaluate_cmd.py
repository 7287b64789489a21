"""`cascade evaluate`: offline cost/quality evaluation of policies on labelled data."""
from __future__ import annotations

import json

import click

from router.lab import online as online_eval
from router.lab.evaluate import evaluate as run
from router.lab.evaluate import render
from router.lab.report import write, write_online
from router.lab.risk import PROCEDURES
from router.lab.tuners import RiskSpec
from worker.cli.common import user_errors


@click.command("evaluate")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="labelled traffic in the benchmarks format (.jsonl or .jsonl.gz)")
@click.option("--policy", default="all", show_default=True,
              help="a policy name, a variant (threshold-2tier, threshold-3plus), 'auto' (chosen by nested "
                   "cross-validation on train) or 'all'")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object on the last line")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="write <data>.png (cost-accuracy plot) and <data>.html into this folder")
@click.option("--models", default=None, help="comma-separated subset of the file's models (default: all)")
@click.option("--signal", type=click.Choice(["logprob", "p_true"]), default=None,
              help="confidence signal (default: the one the file records)")
@click.option("--points", default=24, show_default=True, type=click.IntRange(20, 200),
              help="budgets on the frontier, from the cheapest to the most expensive single model")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2, 20),
              help="folds of the cross-fitting, for files without both a train and a test split")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the folds and of random routing")
@click.option("--risk-bound", type=float, default=None,
              help="also evaluate <policy>-ltt: knobs certified (Learn then Test) to lose at most this share of "
                   "queries against the reference model, with probability >= 1 - delta")
@click.option("--delta", type=float, default=0.1, show_default=True, help="with --risk-bound: failure probability")
@click.option("--risk-procedure", type=click.Choice(list(PROCEDURES)), default="fixed-sequence", show_default=True,
              help="with --risk-bound: the family-wise testing procedure")
@click.option("--online", is_flag=True,
              help="prequential: replay the file as a stream in a seeded order, re-tuning --policy (default auto) "
                   "every --retune-every rows on the rows seen so far")
@click.option("--start-labels", default=0, show_default=True, type=int, help="with --online: rows labelled before the stream")
@click.option("--retune-every", default=100, show_default=True, type=int, help="with --online: rows between re-tunes")
def evaluate(data, policy, as_json, report_dir, models, signal, points, folds, seed, risk_bound, delta,
             risk_procedure, online, start_labels, retune_every):
    """Fit each policy on the train split, replay it on the test split with the
    workers' decision code, and compare it with the single models, random routing
    at matched cost, a two-tier threshold cascade and the oracle."""
    if online:
        with user_errors():
            res = online_eval.prequential(data, "auto" if policy == "all" else policy, start=start_labels,
                                          every=retune_every, seed=seed, signal=signal,
                                          models=[m.strip() for m in models.split(",") if m.strip()] if models else None)
            text = online_eval.render(res)
            click.echo(text)
            if report_dir:
                png = write_online(res, report_dir)
                click.echo(f"report: {png}")
            if as_json:
                click.echo(json.dumps(res, separators=(",", ":"), allow_nan=False))
        return
    with user_errors():
        risk = RiskSpec(risk_bound, delta, risk_procedure, seed=seed) if risk_bound is not None else None
        res = run(data, policy, folds=folds, seed=seed, points=points,
                  models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
                  signal=signal, risk=risk)
        text = render(res)
        click.echo(text)
        if report_dir:
            png, page = write(res, report_dir, text)
            click.echo(f"report: {page} (plot {png})")
        if as_json:
            click.echo(json.dumps(res, separators=(",", ":"), allow_nan=False))
