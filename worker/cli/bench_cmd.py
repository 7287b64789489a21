"""`cascade bench ...`: measurements reported as ratios against a baseline run in the same command."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from router.lab.risk import PROCEDURES
from router.lab.risk_check import render
from worker.bench.api import ApiBenchConfig, run_api_bench
from worker.bench.faults import SCENARIOS, FaultConfig, run_faults
from worker.bench.llamacpp import LlamaBenchConfig, run_llamacpp_bench
from worker.bench.netfaults import NET_SCENARIOS, network_unavailable, run_network_faults
from worker.bench.pipeline import BenchConfig, HttpBenchConfig, run_http_bench, run_pipeline_bench
from worker.bench.risk import RiskBenchConfig, run_risk_bench
from worker.bench.shared import default_replay_data, shared_dir
from worker.bench.speculative import SpecBenchConfig, run_speculative_bench
from worker.bench.speculative import render as render_speculative
from worker.cli.common import user_errors


def _log(message: str) -> None:
    click.echo(message, err=True)


def _emit(result: dict, as_json: bool, width: int) -> None:
    """A bench's result: one JSON line, or one aligned `key: value` line per figure."""
    if as_json:
        click.echo(json.dumps(result))
    else:
        for k, v in result.items():
            click.echo(f"{k:>{width}}: {v}")


@click.group()
def bench() -> None:
    """Benchmarks (never asserted in tests: these machines are noisy)."""


@bench.command()
@click.option("--jobs", "-n", type=click.IntRange(min=10), default=2000, show_default=True)
@click.option("--chunk", type=click.IntRange(1, 1000), help="jobs per stage message (default: CASCADE_CHUNK_SIZE's)")
@click.option("--latency-jobs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="threads per worker process (both runs)")
@click.option("--processes", type=click.IntRange(1, 16), default=1, show_default=True, help="worker processes per tier")
@click.option("--count-ops", type=click.IntRange(min=0), default=1000, show_default=True,
              help="jobs of an extra run that counts Redis commands (MONITOR) and SQL statements; 0 = none")
@click.option("--events", is_flag=True, help="tier workers send task events (what Flower switches on)")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="replay file (default: shared rc-mmlu)")
@click.option("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", show_default=True,
              help="a PostgreSQL database to create the (temporary) benchmark database from")
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def pipeline(jobs, chunk, latency_jobs, concurrency, processes, count_ops, events, data, pg_admin_url, redis_url,
             as_json) -> None:
    """N replay jobs through Redis + PostgreSQL with a worker per tier vs N no-op Celery tasks."""
    data = Path(data) if data else default_replay_data()
    if not data.exists():
        raise click.ClickException(f"replay data {data} not found: pass --data FILE (benchmarks format)")
    cfg = BenchConfig(jobs=jobs, data=data.resolve(), chunk=chunk, latency_jobs=latency_jobs, concurrency=concurrency,
                      processes=processes, count_ops=count_ops, events=events, pg_admin=pg_admin_url, redis_url=redis_url, log=lambda m: click.echo(m, err=True))
    result = run_pipeline_bench(cfg)
    _emit(result, as_json, width=18)


@bench.command()
@click.option("--latency-ms", type=click.FloatRange(min=1), default=200.0, show_default=True,
              help="the server's time per request")
@click.option("--capacity", type=click.IntRange(min=1), default=32, show_default=True,
              help="requests the server serves at once")
@click.option("--seconds", type=click.FloatRange(min=1), default=15.0, show_default=True,
              help="jobs: what the server answers in this long at capacity")
@click.option("--concurrency", type=click.IntRange(1, 1024), help="the tier's requests in flight (default: capacity)")
@click.option("--chunk", type=click.IntRange(1, 1000), help="jobs per stage message (default: CASCADE_CHUNK_SIZE's)")
@click.option("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", show_default=True)
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def http(latency_ms, capacity, seconds, concurrency, chunk, pg_admin_url, redis_url, as_json) -> None:
    """One OpenAI-compatible tier against a local server of fixed latency and capacity,
    one worker process: jobs/s over the server's capacity (capacity / latency)."""
    cfg = HttpBenchConfig(latency=latency_ms / 1000, capacity=capacity, seconds=seconds, concurrency=concurrency,
                          chunk=chunk, pg_admin=pg_admin_url, redis_url=redis_url,
                          log=lambda m: click.echo(m, err=True))
    result = run_http_bench(cfg)
    _emit(result, as_json, width=22)


@bench.command("risk")
@click.option("--data", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="labelled files (repeatable; default: the shared rc-mmlu, rc-triviaqa and rc-gsm8k)")
@click.option("--risk-bound", type=float, default=0.03, show_default=True,
              help="the loss bound against the reference model the tuner certifies")
@click.option("--delta", type=float, default=0.1, show_default=True, help="failure probability")
@click.option("--risk-procedure", type=click.Choice(list(PROCEDURES)),
              default="fixed-sequence", show_default=True)
@click.option("--resplits", type=click.IntRange(min=10), default=200, show_default=True)
@click.option("--train-rows", type=click.IntRange(min=1), default=None,
              help="rows tuned on per re-split (default: the file's train split size, or half the rows)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def risk(files, risk_bound, delta, risk_procedure, resplits, train_rows, seed, as_json) -> None:
    """Coverage of the risk-controlled threshold tuner: over random train/test
    re-splits, the share whose test loss against the reference exceeds the bound
    (it should stay <= delta), with the cost ratio achieved."""
    cfg = RiskBenchConfig(files=[Path(f) for f in files], risk_bound=risk_bound, delta=delta,
                          procedure=risk_procedure, resplits=resplits, train_rows=train_rows, seed=seed, log=_log)
    with user_errors():
        results = run_risk_bench(cfg)
    click.echo(render(results))
    if as_json:
        click.echo(json.dumps({"results": results}))


@bench.command()
@click.option("--requests", "-n", type=click.IntRange(min=10), default=200, show_default=True,
              help="chat completions (and client jobs) to time")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="threads for the requests/s run")
@click.option("--batch-items", type=click.IntRange(min=0), default=0, show_default=True,
              help="also stream a batch of this many items into POST /v1/batches (e.g. 1000000), timed until "
                   "every line is committed and its first stage sent")
@click.option("--drain-jobs", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="then time the queue running that batch until this many of its jobs are final: "
                   "ingest_to_pipeline_ratio is the upload's items/s over that jobs/s (0: skip)")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="the API's port (default: a spare one); refused if another process holds it")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="replay file (default: shared rc-mmlu)")
@click.option("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", show_default=True)
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def api(requests, concurrency, batch_items, drain_jobs, port, data, pg_admin_url, redis_url, as_json) -> None:
    """The task API's overhead per job over HTTP and through the Python client (replay tiers)."""
    data = Path(data) if data else default_replay_data()
    if not data.exists():
        raise click.ClickException(f"replay data {data} not found: pass --data FILE (benchmarks format)")
    cfg = ApiBenchConfig(data=data.resolve(), requests=requests, concurrency=concurrency, batch_items=batch_items,
                         drain_jobs=drain_jobs, port=port, pg_admin=pg_admin_url, redis_url=redis_url, log=lambda m: click.echo(m, err=True))
    result = run_api_bench(cfg)
    click.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench.command()
@click.option("--scenario", "scenarios", multiple=True, help="run only these (repeatable; default: all)")
@click.option("--jobs", "-n", type=click.IntRange(min=10), default=300, show_default=True, help="jobs per scenario")
@click.option("--threads", type=click.IntRange(min=1), default=4, show_default=True, help="threads per tier worker")
@click.option("--short-outage", type=float, help="seconds of a short outage (PostgreSQL down: 20; --network: "
                                                 "a cut, 30)")
@click.option("--long-outage", type=float, help="seconds of a long outage (PostgreSQL down: 180; --network "
                                                "--long: a cut, 300)")
@click.option("--budget", type=float, default=120.0, show_default=True, help="seconds allowed beyond each fault")
@click.option("--network", is_flag=True, help="every part on a host of its own (Linux network namespaces; root): "
                                              "partitions, slow and lossy links, a host gone")
@click.option("--long", "long_", is_flag=True, help="with --network: the 5-minute cuts too")
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def faults(scenarios, jobs, threads, short_outage, long_outage, budget, network, long_, as_json) -> None:
    """Faults injected mid-batch on a private Redis and PostgreSQL: workers killed, the
    broker restarted or emptied, the database stopped, backends hanging or failing, a
    poison item, the submitter killed; with --network, faults between hosts. Each is
    reconciled against the model server."""
    known = NET_SCENARIOS if network else SCENARIOS
    unknown = [s for s in scenarios if s not in known]
    if unknown:
        raise click.ClickException(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if network:
        why = network_unavailable()
        if why:
            raise click.ClickException(f"--network cannot run here: {why}")
    short = short_outage if short_outage is not None else (30.0 if network else 20.0)
    long_s = long_outage if long_outage is not None else (300.0 if network else 180.0)
    cfg = FaultConfig(jobs=jobs, threads=threads, outage_short=short, outage_long=long_s, budget=budget,
                      log=lambda m: click.echo(m, err=True))
    load_before = os.getloadavg()
    if network:
        result = run_network_faults(cfg, list(scenarios) or None, long=long_)
    else:
        result = run_faults(cfg, list(scenarios) or None)
    result["load_average"] = {"start": [round(x, 2) for x in load_before],
                              "end": [round(x, 2) for x in os.getloadavg()]}
    if as_json:
        click.echo(json.dumps(result))
    else:
        for name, r in result["network_faults" if network else "faults"].items():
            click.echo(f"{name:>26}: {r}")
        click.echo(f"{'load average':>26}: {result['load_average']}")


@bench.command("llamacpp")
@click.option("--model", default="medium", show_default=True, help="pack model (tiny | small | medium)")
@click.option("--jobs", "-n", type=click.IntRange(1, 256), default=8, show_default=True, help="jobs in the message")
@click.option("--max-tokens", type=click.IntRange(1, 400), default=64, show_default=True, help="tokens per answer")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="llama.cpp threads")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True, help="alternating rounds")
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def llamacpp(model, jobs, max_tokens, threads, rounds, as_json) -> None:
    """A local tier's tokens/s: a message's jobs decoded together vs one at a time vs bare
    llama-cpp-python (create_completion), same model, prompts and greedy answers."""
    cfg = LlamaBenchConfig(model=model, jobs=jobs, max_tokens=max_tokens, threads=threads, rounds=rounds,
                           log=lambda m: click.echo(m, err=True))
    with user_errors():
        result = run_llamacpp_bench(cfg)
    _emit(result, as_json, width=18)


@bench.command()
@click.option("--n", "n", type=click.IntRange(min=1), default=30, show_default=True, help="GSM8K test questions")
@click.option("--seed", type=int, default=0, show_default=True, help="which questions are drawn")
@click.option("--spec", "specs", multiple=True, metavar="RULE[:ALPHA]",
              help="a speculative tier to run (repeatable; rules chow, diff, opt, always, never; default opt:0.3)")
@click.option("--gamma", type=click.IntRange(1, 32), default=4, show_default=True, help="tokens drafted per block")
@click.option("--max-tokens", type=click.IntRange(min=1), default=160, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="llama.cpp threads (default: all cores)")
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def speculative(n, seed, specs, gamma, max_tokens, threads, as_json) -> None:
    """A speculative cascade (drafter Qwen2.5-Coder-0.5B, verifier 1.5B) against the
    1.5B alone and the 0.5B alone: accuracy and tokens/s on GSM8K test questions."""
    cfg = SpecBenchConfig(shared=shared_dir(), n=n, seed=seed, specs=tuple(specs) or ("opt:0.3",), gamma=gamma,
                          max_tokens=max_tokens, threads=threads, log=lambda m: click.echo(m, err=True))
    with user_errors():
        result = run_speculative_bench(cfg)
    click.echo(render_speculative(result))
    if as_json:
        click.echo(json.dumps(result))
