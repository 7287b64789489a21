"""`cascade bench api`: what the task API adds to a job, over HTTP and through the
Python client, in one run on one machine.

A private PostgreSQL database and Redis prefix, one `cascade worker` per replay tier
and `cascade serve` (with an API key). Replay tiers answer at once (the recorded
latency is not slept), so a job's wall time is the API's and the pipeline's overhead:
submit, commit, queue hops, the stage, the notification, the read back.

1. HTTP: N chat completions one at a time (p50/p99 of the wall time), then N more
   from `concurrency` threads (requests/s); the same for the Python client
   (`Client.run`). p50/p99 are also given for the jobs the first tier answered.
2. Optionally a batch of M generated items streamed into POST /v1/batches (the tier
   workers stopped first, so only ingestion is measured): items/s and the API
   process's peak RSS (VmHWM).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx

from router.core.errors import UserError
from router.core.records import load_dataset
from worker.bench.pipeline import _portfolio, _private, _spawn, _wait_ping
from worker.client import Client
from worker.config.settings import Settings
from worker.ops.procs import stop_all
from worker.queue.tasks import make_app
from worker.service.tenants import Tenants
from worker.store.tenants import TenantStore


@dataclass
class ApiBenchConfig:
    data: Path
    requests: int = 200
    concurrency: int = 8
    batch_items: int = 0
    drain_jobs: int = 100_000  # after the upload: jobs of the batch the queue runs, timed (0: not run)
    pg_admin: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    port: int | None = None  # the API's port; None: a spare one
    log: Callable[[str], None] = print


class BenchPortError(UserError):
    pass


def _serve_port(port: int | None) -> int:
    """The port `cascade serve` will listen on: a spare one, or the one asked for if no
    other process holds it (a server already there would answer the bench's requests)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", port or 0))
        except OSError:
            raise BenchPortError(f"port {port} is in use by another process: the bench's own `cascade serve` could "
                                 f"not listen there; pass another --port, or none (a spare port is picked)") from None
        return s.getsockname()[1]


def _wait_ready(url: str, serve, log: Path) -> None:
    """Until our `cascade serve` answers /readyz: the process must be alive and the answer its own."""
    deadline = time.time() + 60
    while True:
        if serve.poll() is not None:
            raise RuntimeError(f"cascade serve did not start: {log.read_text()[-2000:]}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200 and r.json().get("mode") == "distributed":
                return
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"cascade serve did not become ready at {url}: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2)


def _summary(walls: list[tuple[float, str]], rate: float) -> dict:
    all_ms = [w for w, _ in walls]
    first = [w for w, tier in walls if tier == "t0"]
    return {"p50_overhead_ms": round(statistics.median(all_ms), 2), "p99_overhead_ms": _pct(all_ms, 0.99),
            "first_tier_p50_overhead_ms": round(statistics.median(first), 2) if first else None,
            "first_tier_p99_overhead_ms": _pct(first, 0.99), "first_tier_share": round(len(first) / len(all_ms), 3),
            "requests_per_s": round(rate, 1)}


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM")


def _timed(prompts: list[str], call: Callable[[str], str], concurrency: int) -> tuple[list[tuple[float, str]], float]:
    walls = []
    for p in prompts:
        t = time.perf_counter()
        tier = call(p)
        walls.append(((time.perf_counter() - t) * 1000, tier))
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(call, prompts))
    return walls, len(prompts) / (time.perf_counter() - t)


def _batch_body(n: int, prompts: list[str]) -> Iterator[bytes]:
    buf = []
    for i in range(n):
        buf.append(json.dumps({"id": f"i{i}", "prompt": prompts[i % len(prompts)]}))
        if len(buf) == 1000:
            yield ("\n".join(buf) + "\n").encode()
            buf = []
    if buf:
        yield ("\n".join(buf) + "\n").encode()


def _drain(http: httpx.Client, batch_id: str, total: int, n: int, procs: list, spawns: list,
           log: Callable[[str], None]) -> dict:
    """The tier workers started again on the batch's waiting messages, timed from their
    start (their start-up, a second or two, counts: a small batch would be done before
    they answer a ping) until `n` more of its jobs are final."""
    def done() -> int:
        return http.get(f"/v1/batches/{batch_id}").json()["cascade"]["counts"]["done"]

    first = now = done()
    n = min(n, total - first)  # jobs already final (lines that failed at submission) are not the queue's
    log(f"batch: tier workers started again; timing the queue until {n} of its jobs are final")
    t = time.perf_counter()
    procs.extend(_spawn(*args) for args in spawns)  # the bench's cleanup stops them with the others
    while now - first < n:
        time.sleep(0.2)
        now = done()
    secs = time.perf_counter() - t
    return {"drain_jobs": now - first, "drain_seconds": round(secs, 1),
            "drain_jobs_per_s": round((now - first) / secs, 1)}


def run_api_bench(cfg: ApiBenchConfig) -> dict:
    out: dict = {}
    port = _serve_port(cfg.port)  # before anything starts: a port someone else holds is refused
    with _private(cfg.pg_admin, cfg.redis_url) as (db_url, prefix, tmp, _), ExitStack() as stack:
        settings = Settings(broker_url=cfg.redis_url, database_url=db_url, redis_prefix=prefix, home=tmp)
        env = {**os.environ, "CASCADE_BROKER_URL": cfg.redis_url, "CASCADE_DATABASE_URL": db_url,
               "CASCADE_REDIS_PREFIX": prefix, "CASCADE_HOME": str(tmp),
               "CASCADE_REMOTE_CONTROL": "flower"}  # the bench pings its workers
        path = _portfolio(tmp / "bench.toml", cfg.data)
        tiers = [f"t{i}" for i in range(3)]
        procs = [_spawn(["worker.cli", "worker", "--tier", t, "--portfolio", str(path), "-l", "WARNING"], env,
                        tmp / f"{t}.log") for t in tiers]
        stack.callback(stop_all, procs)
        _wait_ping(make_app(settings), len(procs))
        tenants = Tenants(TenantStore(db_url), settings)
        key = tenants.create_key("bench")[1]
        tenants.close()
        serve = _spawn(["worker.cli", "serve", "--portfolio", str(path), "--port", str(port)], env,
                       tmp / "serve.log")
        stack.callback(stop_all, [serve])
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, serve, tmp / "serve.log")
        prompts = [row.prompt for row in load_dataset(cfg.data).split("test")[: cfg.requests]]
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                            limits=httpx.Limits(max_connections=cfg.concurrency * 2))
        stack.callback(http.close)

        def over_http(prompt: str) -> str:
            resp = http.post("/v1/chat/completions", json={"model": "cascade/default",
                                                           "messages": [{"role": "user", "content": prompt}]})
            resp.raise_for_status()
            body = resp.json()
            if "cascade" not in body:
                raise RuntimeError(f"{url} answered a chat completion without the `cascade` field: not the bench's "
                                   f"own `cascade serve`: {resp.text[:200]}")
            return body["cascade"]["tier"]

        client = Client(settings, portfolio=path, tenant="bench", workers=False)
        stack.callback(client.close)

        def through_client(prompt: str) -> str:
            return client.run(prompt, timeout=120)["tier"]

        over_http(prompts[0])  # warm both paths (connections, the portfolio row, the listener)
        through_client(prompts[0])
        cfg.log(f"http: {len(prompts)} chat completions one at a time, then from {cfg.concurrency} threads")
        out["http"] = _summary(*_timed(prompts, over_http, cfg.concurrency))
        cfg.log(f"client: {len(prompts)} jobs one at a time, then from {cfg.concurrency} threads")
        out["client"] = _summary(*_timed(prompts, through_client, cfg.concurrency))
        if cfg.batch_items:
            stop_all(procs)
            cfg.log(f"batch: {cfg.batch_items} items streamed into POST /v1/batches (tier workers stopped)")
            t = time.perf_counter()
            resp = http.post("/v1/batches", content=_batch_body(cfg.batch_items, prompts), timeout=None,
                             headers={"Content-Type": "application/x-ndjson"})  # JSONL: the streamed upload
            resp.raise_for_status()
            secs = time.perf_counter() - t
            total = resp.json()["cascade"]["counts"]["total"]
            batch_id = resp.json()["id"]
            out["batch"] = {"items": total, "seconds": round(secs, 1), "items_per_s": round(total / secs, 1),
                            "api_peak_rss_mb": _rss_peak_mb(serve.pid)}
            if cfg.drain_jobs:
                # the rate the queue then runs that batch at, in the same command: the tier workers started
                # again on the messages the upload sent, timed until `drain_jobs` of its jobs are final
                out["batch"].update(_drain(http, batch_id, total, cfg.drain_jobs, procs,
                                           [(["worker.cli", "worker", "--tier", t, "--portfolio", str(path), "-l",
                                              "WARNING"], env, tmp / f"{t}-drain.log") for t in tiers], cfg.log))
                out["batch"]["ingest_to_pipeline_ratio"] = round(
                    out["batch"]["items_per_s"] / out["batch"]["drain_jobs_per_s"], 3)
            http.post(f"/v1/batches/{batch_id}/cancel", timeout=None)
        out["api_peak_rss_mb"] = _rss_peak_mb(serve.pid)
        out["load_average_1m"] = round(os.getloadavg()[0], 1)
    return out
