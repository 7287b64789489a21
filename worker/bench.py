"""`cascade bench pipeline`: the pipeline's throughput against Celery's own.

In one run, on one machine and broker: N no-op Celery tasks through one worker
process (the baseline: Celery's per-message cost here), then N replay jobs
through Redis + PostgreSQL with one worker process per tier, every result
committed. Reported as a ratio, because these shared machines are noisy. Then
M jobs one at a time, for the time a job spends in the pipeline beyond the
backend's own time (commits, messages, queue hops).
"""
from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import redis
from sqlalchemy import create_engine, text

from router.core.portfolio import load_portfolio
from router.core.records import load_dataset

from .batch import submit, wait_for
from .bench_app import NOOP_QUEUE, NOOP_TASK
from .celery_app import make_app
from .dispatch import Dispatcher
from .items import Item
from .migrate import upgrade
from .runtime import Runtime
from .settings import Settings
from .store import dispose_all

BENCH_MODELS = ("llama3.2-3b", "llama3.1-70b", "llama3.1-405b")
BENCH_THRESHOLDS = (-0.3, -0.2)


@dataclass
class BenchConfig:
    jobs: int
    data: Path
    chunk: int = 16
    latency_jobs: int = 100
    concurrency: int = 1
    events: bool = False  # workers send task events, as Flower has them do
    pg_admin: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    log: Callable[[str], None] = print


def _portfolio(path: Path, data: Path) -> Path:
    lines = ['[policy]\nname = "threshold"\nsignal = "logprob"\n']
    for i, model in enumerate(BENCH_MODELS):
        th = f"threshold = {BENCH_THRESHOLDS[i]}\n" if i < len(BENCH_THRESHOLDS) else ""
        lines.append(f'[[tiers]]\nname = "t{i}"\n{th}backend = {{ kind = "replay", file = "{data}", model = "{model}" }}\n')
    path.write_text("\n".join(lines))
    return path


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _wait_ping(app, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(app.control.ping(timeout=0.5) or []) >= n:
            return
    raise RuntimeError(f"fewer than {n} workers answered within {timeout}s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def run_pipeline_bench(cfg: BenchConfig) -> dict:
    tag = uuid.uuid4().hex[:10]
    dbname = f"cascade_bench_{tag}"
    prefix = f"cascade-bench-{tag}:"
    admin = create_engine(cfg.pg_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    db_url = cfg.pg_admin.rsplit("/", 1)[0] + f"/{dbname}"
    tmp = Path(tempfile.mkdtemp(prefix="cascade-bench-"))
    settings = Settings(broker_url=cfg.redis_url, database_url=db_url, redis_prefix=prefix, home=tmp,
                        chunk_size=cfg.chunk, worker_concurrency=cfg.concurrency)
    env = {**os.environ, "CASCADE_BROKER_URL": cfg.redis_url, "CASCADE_DATABASE_URL": db_url,
           "CASCADE_REDIS_PREFIX": prefix, "CASCADE_HOME": str(tmp), "CASCADE_WORKER_CONCURRENCY": str(cfg.concurrency),
           "CASCADE_REMOTE_CONTROL": "flower"}  # the bench pings its workers
    r = redis.Redis.from_url(cfg.redis_url)
    with ExitStack() as stack:
        stack.callback(_drop, admin, dbname)
        stack.callback(_clear_prefix, r, prefix)
        upgrade(db_url)
        runtime = Runtime(settings)
        app = make_app(settings, runtime)
        dispatcher = Dispatcher(app, cfg.chunk)

        # -- baseline: N no-op tasks through one worker process ------------------
        cfg.log(f"baseline: {cfg.jobs} no-op Celery tasks")
        noop = _spawn(["celery", "-A", "worker.bench_app:app", "worker", "-Q", NOOP_QUEUE, "-P", "threads",
                       "-c", str(cfg.concurrency), "--without-gossip", "--without-mingle", "-l", "WARNING",
                       "-n", f"noop-{tag}@%h"], env, tmp / "noop.log")
        stack.callback(_stop, [noop])
        _wait_ping(app, 1)
        key = f"{prefix}bench-noop-count"
        t0 = time.perf_counter()
        for _ in range(cfg.jobs):
            app.send_task(NOOP_TASK, args=[key], queue=NOOP_QUEUE, routing_key=NOOP_QUEUE)
        while int(r.get(key) or 0) < cfg.jobs:
            time.sleep(0.005)
        noop_s = time.perf_counter() - t0
        _stop([noop])

        # -- the pipeline: one worker process per tier --------------------------
        path = _portfolio(tmp / "bench.toml", cfg.data)
        portfolio = load_portfolio(path)
        procs = [_spawn(["worker.cli", "worker", "--tier", t.name, "--portfolio", str(path), "-l", "WARNING",
                         *(["--events"] if cfg.events else [])], env, tmp / f"{t.name}.log") for t in portfolio.tiers]
        stack.callback(_stop, procs)
        _wait_ping(app, len(procs))
        rows = load_dataset(cfg.data).split("test")
        items = [Item(f"{rows[i % len(rows)].id}~{i}", i + 1,
                      {"id": f"{rows[i % len(rows)].id}~{i}", "prompt": rows[i % len(rows)].prompt})
                 for i in range(cfg.jobs)]
        cfg.log(f"pipeline: {cfg.jobs} replay jobs, {len(procs)} tiers, chunks of {cfg.chunk}"
                + (", task events on" if cfg.events else ""))
        store = runtime.store
        t0 = time.perf_counter()
        submit(runtime, dispatcher, portfolio, items, "bench", source=str(cfg.data))
        b = wait_for(store, "bench", progress=False, poll=0.01)
        pipe_s = time.perf_counter() - t0
        if b["succeeded"] != cfg.jobs:
            errors = {j["error"] for j in store.batch_jobs("bench") if j["error"]}
            raise RuntimeError(f"{cfg.jobs - b['succeeded']} benchmark jobs did not succeed: {sorted(errors)[:3]}")
        with store.engine.connect() as c:
            stages = c.execute(text("SELECT count(*) FROM attempts")).scalar()

        # -- overhead: jobs one at a time ----------------------------------------
        cfg.log(f"overhead: {cfg.latency_jobs} jobs one at a time")
        overheads = []
        single_sender = Dispatcher(app, 1)
        for i in range(cfg.latency_jobs):
            it = items[i]
            single = Item(f"lat-{i}", i + 1, {**it.data, "id": it.data["id"]})
            submit(runtime, single_sender, portfolio, [single], f"lat-{i}", source=None)
            while store.batch(f"lat-{i}")["done"] < 1:
                time.sleep(0.001)
            job = store.batch_jobs(f"lat-{i}")[0]
            backend_ms = sum(a["meta"].get("backend_ms", 0.0) for a in store.attempts_of([job["id"]])[job["id"]])
            overheads.append((job["finished_at"] - job["created_at"]).total_seconds() * 1000 - backend_ms)
        _stop(procs)
    jobs_per_s = cfg.jobs / pipe_s
    noop_per_s = cfg.jobs / noop_s
    return {
        "jobs": cfg.jobs, "chunk": cfg.chunk, "events": cfg.events, "pipeline_s": round(pipe_s, 2), "tiers": len(BENCH_MODELS), "stages_per_job": round(stages / cfg.jobs, 3),
        "jobs_per_s": round(jobs_per_s, 1), "celery_noop_per_s": round(noop_per_s, 1),
        "ratio": round(jobs_per_s / noop_per_s, 3),
        "p50_overhead_ms": round(statistics.median(overheads), 2),
        "p90_overhead_ms": round(statistics.quantiles(overheads, n=10)[-1], 2) if len(overheads) >= 10 else None,
    }


@dataclass
class HttpBenchConfig:
    latency: float = 0.2  # seconds the server takes per request
    capacity: int = 32  # requests it serves at once
    seconds: float = 15.0  # jobs: what the server could answer in this long at capacity
    concurrency: int | None = None  # the tier's backend option (default: the server's capacity)
    chunk: int | None = None  # jobs per stage message (default: the settings' chunk_size)
    pg_admin: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    log: Callable[[str], None] = print


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the fake model server did not listen on port {port} within {timeout}s")


def run_http_bench(cfg: HttpBenchConfig) -> dict:
    """One openai tier against a local server answering after `latency` with `capacity`
    requests at once, one worker process (default settings): jobs/s against the
    server's capacity (capacity / latency)."""
    capacity_per_s = cfg.capacity / cfg.latency
    n = max(10, int(capacity_per_s * cfg.seconds))
    concurrency = cfg.concurrency or cfg.capacity
    with _private(cfg.pg_admin, cfg.redis_url) as (db_url, prefix, tmp, r):
        settings = Settings(broker_url=cfg.redis_url, database_url=db_url, redis_prefix=prefix, home=tmp,
                            **({"chunk_size": cfg.chunk} if cfg.chunk else {}))
        env = {**os.environ, "CASCADE_BROKER_URL": cfg.redis_url, "CASCADE_DATABASE_URL": db_url,
               "CASCADE_REDIS_PREFIX": prefix, "CASCADE_HOME": str(tmp), "CASCADE_REMOTE_CONTROL": "flower",
               **({"CASCADE_CHUNK_SIZE": str(cfg.chunk)} if cfg.chunk else {})}
        with ExitStack() as stack:
            port = _free_port()
            server = _spawn(["worker.fakeserver", "--port", str(port), "--latency", str(cfg.latency),
                             "--capacity", str(cfg.capacity)], env, tmp / "server.log")
            stack.callback(_stop, [server])
            _wait_port(port)
            path = tmp / "http.toml"
            path.write_text('[policy]\nname = "threshold"\nsignal = "mean_logprob"\n\n[[tiers]]\nname = "t0"\n'
                            f'backend = {{ kind = "openai", base_url = "http://127.0.0.1:{port}/v1", model = "fake", '
                            f'max_tokens = 8, concurrency = {concurrency} }}\n')
            portfolio = load_portfolio(path)
            runtime = Runtime(settings)
            app = make_app(settings, runtime)
            dispatcher = Dispatcher(app, settings.chunk_size)
            worker = _spawn(["worker.cli", "worker", "--tier", "t0", "--portfolio", str(path), "-l", "WARNING"],
                            env, tmp / "t0.log")
            stack.callback(_stop, [worker])
            _wait_ping(app, 1)
            items = [Item(f"q{i}", i + 1, {"id": f"q{i}", "prompt": f"question {i}: what is {i} + {i}?"})
                     for i in range(n)]
            cfg.log(f"http: {n} jobs, one openai tier, server {cfg.latency * 1000:.0f} ms x {cfg.capacity} at once "
                    f"({capacity_per_s:.0f}/s), concurrency {concurrency}, chunks of {settings.chunk_size}")
            t0 = time.perf_counter()
            submit(runtime, dispatcher, portfolio, items, "http", source=None)
            b = wait_for(runtime.store, "http", progress=False, poll=0.02)
            took = time.perf_counter() - t0
            if b["succeeded"] != n:
                errors = {j["error"] for j in runtime.store.batch_jobs("http") if j["error"]}
                raise RuntimeError(f"{n - b['succeeded']} jobs did not succeed: {sorted(errors)[:3]}")
            stats = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=5).json()
            runtime.close()
    jobs_per_s = n / took
    return {"jobs": n, "latency_ms": cfg.latency * 1000, "capacity": cfg.capacity, "concurrency": concurrency,
            "chunk": settings.chunk_size, "seconds": round(took, 2), "server_requests": stats["served"],
            "peak_in_flight": stats["peak_in_flight"], "jobs_per_s": round(jobs_per_s, 1),
            "server_capacity_per_s": round(capacity_per_s, 1), "ratio": round(jobs_per_s / capacity_per_s, 3)}


@contextlib.contextmanager
def _private(pg_admin: str, redis_url: str):
    """A database and a Redis key prefix of the bench's own, dropped afterwards."""
    tag = uuid.uuid4().hex[:10]
    dbname = f"cascade_bench_{tag}"
    prefix = f"cascade-bench-{tag}:"
    admin = create_engine(pg_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    db_url = pg_admin.rsplit("/", 1)[0] + f"/{dbname}"
    r = redis.Redis.from_url(redis_url)
    try:
        upgrade(db_url)
        yield db_url, prefix, Path(tempfile.mkdtemp(prefix="cascade-bench-")), r
    finally:
        _clear_prefix(r, prefix)
        _drop(admin, dbname)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drop(admin, dbname: str) -> None:
    dispose_all()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
    admin.dispose()


def _clear_prefix(r, prefix: str) -> None:
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        r.delete(*keys)
