"""`cascade bench ...`: measurements reported as ratios against a baseline run in the same command."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from worker.bench import BenchConfig, run_pipeline_bench


def _default_data() -> Path:
    shared = os.environ.get("CASCADE_SHARED")
    base = Path(shared) if shared else Path(__file__).resolve().parents[2].parent / "shared"
    return base / "benchmarks" / "rc-mmlu.jsonl.gz"


@click.group()
def bench() -> None:
    """Benchmarks (never asserted in tests: these machines are noisy)."""


@bench.command()
@click.option("--jobs", "-n", type=click.IntRange(min=10), default=2000, show_default=True)
@click.option("--chunk", type=click.IntRange(1, 1000), default=16, show_default=True, help="jobs per stage message")
@click.option("--latency-jobs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="threads per worker process (both runs)")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="replay file (default: shared rc-mmlu)")
@click.option("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", show_default=True,
              help="a PostgreSQL database to create the (temporary) benchmark database from")
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def pipeline(jobs, chunk, latency_jobs, concurrency, data, pg_admin_url, redis_url, as_json) -> None:
    """N replay jobs through Redis + PostgreSQL with a worker per tier vs N no-op Celery tasks."""
    data = Path(data) if data else _default_data()
    if not data.exists():
        raise click.ClickException(f"replay data {data} not found: pass --data FILE (benchmarks format)")
    cfg = BenchConfig(jobs=jobs, data=data.resolve(), chunk=chunk, latency_jobs=latency_jobs, concurrency=concurrency,
                      pg_admin=pg_admin_url, redis_url=redis_url, log=lambda m: click.echo(m, err=True))
    result = run_pipeline_bench(cfg)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for k, v in result.items():
            click.echo(f"{k:>18}: {v}")
