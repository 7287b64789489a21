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
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import redis

from router.core.portfolio import load_portfolio
from router.core.records import load_dataset
from worker.bench.noop_app import NOOP_QUEUE, NOOP_TASK
from worker.client import Client
from worker.config.settings import Settings
from worker.ops.migrate import upgrade
from worker.ops.procs import stop_all
from worker.queue.batch import submit, wait_for
from worker.queue.dispatch import Dispatcher
from worker.queue.items import Item
from worker.queue.runtime import Runtime
from worker.queue.tasks import make_app
from worker.store.admin import commit_ms, create_database, drop_database
from worker.store.engine import dispose_all
from worker.store.notify import JOB_CHANNEL
from worker.store.schema import now

BENCH_MODELS = ("llama3.2-3b", "llama3.1-70b", "llama3.1-405b")
BENCH_THRESHOLDS = (-0.3, -0.2)


@dataclass
class BenchConfig:
    jobs: int
    data: Path
    chunk: int | None = None  # jobs per stage message (default: the settings' chunk_size)
    latency_jobs: int = 100
    concurrency: int = 1
    processes: int = 1  # worker processes per tier
    events: bool = False  # workers send task events, as Flower has them do
    count_ops: int = 1000  # jobs of the counting run (Redis MONITOR, statement counters); 0 = none
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


def _items(data: Path, n: int, tag: str = "") -> list[Item]:
    rows = load_dataset(data).split("test")
    return [Item(f"{tag}{rows[i % len(rows)].id}~{i}", i + 1,
                 {"id": f"{tag}{rows[i % len(rows)].id}~{i}", "prompt": rows[i % len(rows)].prompt}) for i in range(n)]


class _Workers:
    """`processes` worker processes per tier, each serving its metrics on a port of its own."""

    def __init__(self, portfolio_path: Path, tiers: list[str], env: dict, tmp: Path, processes: int, events: bool):
        self.ports = [_free_port() for _ in range(processes * len(tiers))]
        self.procs = [
            _spawn(["worker.cli", "worker", "--tier", t, "--portfolio", str(portfolio_path), "-l", "WARNING",
                    "--metrics-port", str(self.ports[i * len(tiers) + k]), *(["--events"] if events else [])],
                   env, tmp / f"{t}-{i}.log")
            for i in range(processes) for k, t in enumerate(tiers)]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        for port in self.ports:
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                    break
                except httpx.HTTPError:
                    if time.time() > deadline:
                        raise RuntimeError(f"a worker's metrics port {port} did not answer within {timeout}s") from None
                    time.sleep(0.2)

    def statements(self) -> dict[str, float]:
        """The workers' SQL statements so far, by kind (their cascade_db_statements counters)."""
        out: dict[str, float] = {}
        for port in self.ports:
            for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
                if line.startswith("cascade_db_statements_total{"):
                    kind = line.split('kind="', 1)[1].split('"', 1)[0]
                    out[kind] = out.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
        return out


def run_pipeline_bench(cfg: BenchConfig) -> dict:
    with _private(cfg.pg_admin, cfg.redis_url) as (db_url, prefix, tmp, r):
        settings = Settings(broker_url=cfg.redis_url, database_url=db_url, redis_prefix=prefix, home=tmp,
                            worker_concurrency=cfg.concurrency, **({"chunk_size": cfg.chunk} if cfg.chunk else {}))
        env = {**os.environ, "CASCADE_BROKER_URL": cfg.redis_url, "CASCADE_DATABASE_URL": db_url,
               "CASCADE_REDIS_PREFIX": prefix, "CASCADE_HOME": str(tmp),
               "CASCADE_WORKER_CONCURRENCY": str(cfg.concurrency), "CASCADE_CHUNK_SIZE": str(settings.chunk_size),
               "CASCADE_REMOTE_CONTROL": "flower"}  # the bench pings its workers
        with ExitStack() as stack:
            return _pipeline(cfg, settings, env, stack, prefix, tmp, r)


def _pipeline(cfg: BenchConfig, settings: Settings, env: dict, stack: ExitStack, prefix: str, tmp: Path, r) -> dict:
    runtime = Runtime(settings)
    stack.callback(runtime.close)
    app = make_app(settings, runtime)
    dispatcher = Dispatcher(app, settings.chunk_size, size_of=runtime.stage_size)

    # -- baseline: N no-op tasks through one worker process ----------------------
    cfg.log(f"baseline: {cfg.jobs} no-op Celery tasks")
    noop = _spawn(["celery", "-A", "worker.bench.noop_app:app", "worker", "-Q", NOOP_QUEUE, "-P", "threads",
                   "-c", str(cfg.concurrency), "--without-gossip", "--without-mingle", "-l", "WARNING",
                   "-n", f"noop-{prefix.strip(':')}@%h"], env, tmp / "noop.log")
    stack.callback(stop_all, [noop])
    _wait_ping(app, 1)
    key = f"{prefix}bench-noop-count"
    t0 = time.perf_counter()
    for _ in range(cfg.jobs):
        app.send_task(NOOP_TASK, args=[key], queue=NOOP_QUEUE, routing_key=NOOP_QUEUE)
    while int(r.get(key) or 0) < cfg.jobs:
        time.sleep(0.005)
    noop_s = time.perf_counter() - t0
    stop_all([noop])

    # -- the pipeline: worker processes per tier ----------------------------------
    path = _portfolio(tmp / "bench.toml", cfg.data)
    portfolio = load_portfolio(path)
    tiers = [t.name for t in portfolio.tiers]
    workers = _Workers(path, tiers, env, tmp, cfg.processes, cfg.events)
    stack.callback(stop_all, workers.procs)
    # the processes of one tier share a node name (so a ping reaches one of them): every tier answers,
    # and every process serves its metrics, i.e. has loaded its backend and is starting its consumer
    _wait_ping(app, len(tiers), timeout=max(60.0, 15.0 * len(workers.procs)))
    workers.wait_ready(timeout=max(60.0, 15.0 * len(workers.procs)))
    items = _items(cfg.data, cfg.jobs)
    cfg.log(f"pipeline: {cfg.jobs} replay jobs, {len(tiers)} tiers x {cfg.processes} process(es), chunks of "
            f"{settings.chunk_size}" + (", task events on" if cfg.events else ""))
    store = runtime.jobs
    t0 = time.perf_counter()
    submit(runtime, dispatcher, portfolio, items, "bench", source=str(cfg.data))
    b = wait_for(runtime.batches, "bench", progress=False, poll=0.01)
    pipe_s = time.perf_counter() - t0
    durable = store.durable("bench")
    if b["succeeded"] != cfg.jobs or durable["succeeded"] != cfg.jobs:
        errors = {j["error"] for j in store.batch_jobs("bench") if j["error"]}
        raise RuntimeError(f"{cfg.jobs - b['succeeded']} benchmark jobs did not succeed: {sorted(errors)[:3]}")

    # -- overhead: interactive jobs one at a time, each through `Client.run` as a client runs one
    cfg.log(f"overhead: {cfg.latency_jobs} interactive jobs one at a time")
    client = Client(settings, portfolio=portfolio, workers=False)
    stack.callback(client.close)
    parts: dict[str, list[float]] = {k: [] for k in ("overhead", "submit", "to_first_stage", "stage", "hop", "learn")}
    by_stages: dict[int, list[float]] = {}
    submitted = _timed(client.submitter)
    for it in _items(cfg.data, cfg.latency_jobs, "lat-"):
        t_sub = now()
        s0 = time.perf_counter()
        job_id = client.run(it.data["prompt"], timeout=60)["id"]  # the client's path: Client.run
        took_ms = (time.perf_counter() - s0) * 1000
        learned = now()
        s1 = s0 + submitted.pop()
        job = store.job(job_id)
        ats = store.attempts_of([job_id])[job_id]
        backend = [a["meta"].get("backend_ms", 0.0) for a in ats]
        parts["overhead"].append(took_ms - sum(backend))
        by_stages.setdefault(len(ats), []).append(parts["overhead"][-1])
        parts["submit"].append((s1 - s0) * 1000)
        parts["to_first_stage"].append(_ms(job["started_at"] - t_sub) - parts["submit"][-1])
        parts["stage"].append(_ms(ats[0]["created_at"] - job["started_at"]) - backend[0])
        parts["hop"] += [_ms(ats[i]["created_at"] - ats[i - 1]["created_at"]) - backend[i] for i in range(1, len(ats))]
        parts["learn"].append(_ms(learned - job["finished_at"]))
    overheads = parts.pop("overhead")
    commit = commit_ms(store.url)

    # -- what a job costs in round trips: a counting run ---------------------------
    ops = _count_ops(cfg, runtime, dispatcher, portfolio, workers, prefix) if cfg.count_ops else None
    stop_all(workers.procs)
    jobs_per_s = cfg.jobs / pipe_s
    noop_per_s = cfg.jobs / noop_s
    return {
        "jobs": cfg.jobs, "chunk": settings.chunk_size, "processes_per_tier": cfg.processes, "events": cfg.events,
        "pipeline_s": round(pipe_s, 2), "tiers": len(BENCH_MODELS),
        "stages_per_job": round(durable["attempts"] / cfg.jobs, 3), "durable_succeeded": durable["succeeded"],
        "jobs_per_s": round(jobs_per_s, 1), "celery_noop_per_s": round(noop_per_s, 1),
        "ratio": round(jobs_per_s / noop_per_s, 3),
        "p50_overhead_ms": round(statistics.median(overheads), 2),
        "p90_overhead_ms": round(statistics.quantiles(overheads, n=10)[-1], 2) if len(overheads) >= 10 else None,
        # where a single job's overhead goes (medians, ms): the submit (insert + send); from its return to
        # the first stage's start (queue, worker pickup, start statement); a stage from its start to its record
        # (beyond the call); an escalation, from one stage's record to the next's (record statement, send,
        # queue, pickup, start); from the final record's start to the client holding the job (commit, NOTIFY,
        # wake, the read of the job and its attempts)
        "p50_parts_ms": {k: round(statistics.median(v), 2) for k, v in parts.items() if v},
        # the same overhead by the stages a job ran (accepted at the first tier, escalated once, twice)
        "p50_overhead_by_stages_ms": {str(k): round(statistics.median(v), 2) for k, v in sorted(by_stages.items())},
        "jobs_by_stages": {str(k): len(v) for k, v in sorted(by_stages.items())},
        # a durable commit here and now (one row UPDATE, waiting for the disk) against one that does not wait:
        # an interactive job waits for a durable commit at submission and at each stage's record
        "p50_commit_ms": commit,
        "ops": ops,
    }


def _timed(submitter) -> list[float]:
    """How long each `submitter.submit` took (s), appended as it returns: the submit part
    of `Client.run`, timed without a path of the bench's own."""
    took: list[float] = []
    submit = submitter.submit

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return submit(*a, **kw)
        finally:
            took.append(time.perf_counter() - t0)
    submitter.submit = timed
    return took


def _ms(d) -> float:
    return d.total_seconds() * 1000


def _count_ops(cfg: BenchConfig, runtime: Runtime, dispatcher: Dispatcher, portfolio, workers: _Workers,
               prefix: str) -> dict:
    """A separate run of `count_ops` jobs (MONITOR slows Redis: never during the timed runs), counting
    the Redis commands of every connection that touched this bench's keys and the workers' SQL
    statements; then one interactive job, counted the same way."""
    cfg.log(f"counting: {cfg.count_ops} jobs, then 1 interactive job, under Redis MONITOR")
    out = {}
    for name, n in (("batch", cfg.count_ops), ("single", 1)):
        before = workers.statements()
        with _RedisMonitor(cfg.redis_url, prefix) as mon:
            if name == "batch":
                submit(runtime, dispatcher, portfolio, _items(cfg.data, n, "ops-"), "ops", source=None)
                wait_for(runtime.batches, "ops", progress=False, poll=0.05)
                stages = runtime.jobs.durable("ops")["attempts"]
            else:
                client = Client(runtime.settings, portfolio=portfolio, workers=False)
                job_id = client.submit(_items(cfg.data, 1, "one-")[0].data["prompt"])
                client.waiter.wait(JOB_CHANNEL, job_id, lambda: client._final(job_id), 60)
                stages = len(runtime.jobs.attempts_of([job_id])[job_id])
                client.close()
            time.sleep(1.0)  # the last acks land
        after = workers.statements()
        sql = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        total = sum(sql.values())
        out[name] = {"jobs": n, "stages": stages, "redis_commands": mon.count, "redis_per_job": round(mon.count / n, 2),
                     "redis_by_command": mon.by_command, "worker_sql_statements": round(total),
                     "worker_sql_per_job": round(total / n, 3), "worker_sql_by_kind": {k: round(v) for k, v in sql.items() if v}}
    return out


class _RedisMonitor:
    """Counts the commands Redis receives from the connections that use keys under `prefix`
    (MONITOR shows every client's commands; a connection is this bench's once one of its
    commands names such a key, and then all its commands count, the MULTI/EXEC around them too)."""

    def __init__(self, url: str, prefix: str):
        self.r = redis.Redis.from_url(url)
        self.prefix = prefix
        self.per_client: dict[str, dict[str, int]] = {}
        self.ours: set[str] = set()
        self._stop = threading.Event()
        self.by_command: dict[str, int] = {}
        self.count = 0

    def __enter__(self):
        self.mon = self.r.monitor().__enter__()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = self.mon.next_command()
            except Exception:  # noqa: BLE001 - the monitor connection closed
                return
            client = f"{m.get('client_address')}:{m.get('client_port')}"
            cmd = str(m.get("command", ""))
            if f"{self.prefix}monitor-stop" in cmd:
                return
            name = cmd.split(" ", 1)[0].upper()
            self.per_client.setdefault(client, {})
            self.per_client[client][name] = self.per_client[client].get(name, 0) + 1
            if self.prefix in cmd:
                self.ours.add(client)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.r.set(f"{self.prefix}monitor-stop", 1)  # one more command: the reader wakes and stops
        self.thread.join(5)
        try:
            self.mon.__exit__(*exc)
        except Exception:  # noqa: BLE001 - the monitor connection is only closed
            pass
        by: dict[str, int] = {}
        for c in self.ours:
            for k, v in self.per_client.get(c, {}).items():
                by[k] = by.get(k, 0) + v
        self.by_command = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        self.count = sum(by.values())


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
            server = _spawn(["worker.bench.fakeserver", "--port", str(port), "--latency", str(cfg.latency),
                             "--capacity", str(cfg.capacity)], env, tmp / "server.log")
            stack.callback(stop_all, [server])
            _wait_port(port)
            path = tmp / "http.toml"
            path.write_text('[policy]\nname = "threshold"\nsignal = "mean_logprob"\n\n[[tiers]]\nname = "t0"\n'
                            f'backend = {{ kind = "openai", base_url = "http://127.0.0.1:{port}/v1", model = "fake", '
                            f'max_tokens = 8, concurrency = {concurrency} }}\n')
            portfolio = load_portfolio(path)
            runtime = Runtime(settings)
            runtime.add_portfolio(portfolio)
            chunk = runtime.stage_size("t0", portfolio.tier("t0").queue_name, settings.chunk_size)
            app = make_app(settings, runtime)
            dispatcher = Dispatcher(app, settings.chunk_size, size_of=runtime.stage_size)
            worker = _spawn(["worker.cli", "worker", "--tier", "t0", "--portfolio", str(path), "-l", "WARNING"],
                            env, tmp / "t0.log")
            stack.callback(stop_all, [worker])
            _wait_ping(app, 1)
            items = [Item(f"q{i}", i + 1, {"id": f"q{i}", "prompt": f"question {i}: what is {i} + {i}?"})
                     for i in range(n)]
            cfg.log(f"http: {n} jobs, one openai tier, server {cfg.latency * 1000:.0f} ms x {cfg.capacity} at once "
                    f"({capacity_per_s:.0f}/s), concurrency {concurrency}, chunks of {chunk}")
            t0 = time.perf_counter()
            submit(runtime, dispatcher, portfolio, items, "http", source=None)
            b = wait_for(runtime.batches, "http", progress=False, poll=0.02)
            took = time.perf_counter() - t0
            if b["succeeded"] != n:
                errors = {j["error"] for j in runtime.jobs.batch_jobs("http") if j["error"]}
                raise RuntimeError(f"{n - b['succeeded']} jobs did not succeed: {sorted(errors)[:3]}")
            stats = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=5).json()
            runtime.close()
    jobs_per_s = n / took
    return {"jobs": n, "latency_ms": cfg.latency * 1000, "capacity": cfg.capacity, "concurrency": concurrency,
            "chunk": chunk, "seconds": round(took, 2), "server_requests": stats["served"],
            "peak_in_flight": stats["peak_in_flight"], "jobs_per_s": round(jobs_per_s, 1),
            "server_capacity_per_s": round(capacity_per_s, 1), "ratio": round(jobs_per_s / capacity_per_s, 3)}


@contextlib.contextmanager
def _private(pg_admin: str, redis_url: str):
    """A database and a Redis key prefix of the bench's own, dropped afterwards."""
    tag = uuid.uuid4().hex[:10]
    dbname = f"cascade_bench_{tag}"
    prefix = f"cascade-bench-{tag}:"
    create_database(pg_admin, dbname)
    db_url = pg_admin.rsplit("/", 1)[0] + f"/{dbname}"
    r = redis.Redis.from_url(redis_url)
    try:
        upgrade(db_url)
        yield db_url, prefix, Path(tempfile.mkdtemp(prefix="cascade-bench-")), r
    finally:
        _clear_prefix(r, prefix)
        _drop(pg_admin, dbname)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drop(pg_admin: str, dbname: str) -> None:
    dispose_all()
    drop_database(pg_admin, dbname)


def _clear_prefix(r, prefix: str) -> None:
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        r.delete(*keys)
