"""The cluster demo (`cascade demo --cluster`, `make demo-cluster`): the demo's questions
through the distributed mode as a team runs it, on this one machine.

Every part is a process of its own, started with the project's own commands: one
llama-cpp-python server per local model (`cascade models serve`), the machine's Redis
and PostgreSQL (a database and a Redis key prefix of the demo's own, removed at the
end), one `cascade worker` per tier, `cascade serve` and `cascade flower`. The
questions go in as an OpenAI batch through the official SDK (upload the JSONL,
create the batch, poll, download the output file); each output line names its job,
whose attempts the task API gives (`GET /v1/jobs/{id}`), and the table is the one
`cascade demo` prints. The same questions then go through `cascade/always-<top>`, a
portfolio of the last tier alone served by the same workers. Everything started is
stopped at the end, also on an error or Ctrl-C."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

from router.core.errors import UserError
from router.lab import demo_questions as dq
from worker.config.settings import Settings
from worker.labwork.demo import MIXES, PRICES, TIERS, DemoRun, Setup, check_models, mix_text
from worker.labwork.demo_report import render, summarise
from worker.models import modelpack
from worker.ops.migrate import upgrade
from worker.store.admin import create_database, drop_database

TERMINAL = ("completed", "failed", "expired", "cancelled")


class ClusterError(UserError):
    """A part of the cluster that did not start or a batch that did not finish."""


@dataclass
class ClusterOptions:
    postgres: str = "postgresql+psycopg://127.0.0.1:5432"  # the server; the demo makes its own database there
    redis: str = "redis://127.0.0.1:6379/0"
    database: str = "cascade_demo_cluster"
    api_port: int = 0  # 0: a spare port
    flower_port: int = 0
    hold: float = 0.0  # seconds to keep everything up after the table (to look around in Flower)
    timeout: float = 1800.0  # seconds a batch may take


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Named child processes, each logging to a file of `folder`; all stopped on exit."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = folder, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def log_tail(self, name: str, chars: int = 2500) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-chars:]

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ClusterError(f"{name} exited with code {p.returncode}; the end of its log "
                                   f"({self.folder / (name + '.log')}):\n{self.log_tail(name)}")

    def wait_http(self, name: str, url: str, timeout: float, ok: Callable[[httpx.Response], bool] | None = None,
                  **kw) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                r = httpx.get(url, timeout=2.0, **kw)
                if (ok or (lambda r: r.status_code == 200))(r):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ClusterError(f"{name} did not answer at {url} within {timeout:.0f}s; the end of its log:\n"
                           f"{self.log_tail(name)}")

    def stop_all(self, grace: float = 20.0) -> None:
        # in reverse: the API and the workers before the model servers they call
        procs = list(reversed(self.procs.values()))
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def tier_spec(name: str, base_url: str) -> dict[str, Any]:
    """A demo tier as an `openai` tier of its model server: the demo's prompt on the
    completions endpoint, one request at a time per worker (an attempt's latency is then
    the model's own time, as in `cascade demo`)."""
    return {
        "name": name,
        "backend": {"kind": "openai", "base_url": base_url, "model": name, "endpoint": "completions",
                    "prompt_template": dq.FEW_SHOT_TINY if name == "tiny" else dq.FEW_SHOT,
                    "max_tokens": 8, "stop": list(dq.STOP), "concurrency": 1, "read_timeout": 300},
        "price": {"input_per_mtok": PRICES[name], "output_per_mtok": PRICES[name]},
    }


def portfolios(setup: Setup, urls: dict[str, str]) -> tuple[dict, dict]:
    """(the cascade's portfolio, the last tier's alone) as raw specs."""
    chain = setup.chain
    params: dict[str, Any] = {"signal": setup.signal, "chain": list(chain),
                              "thresholds": {t: setup.thresholds[t] for t in chain[:-1]}}
    if setup.router is not None:
        params["router"] = setup.router
    cascade = {"tiers": [tier_spec(t, urls[t]) for t in chain],
               "policy": {"name": "routed-threshold" if setup.router is not None else "threshold",
                          "params": params}}
    top = {"tiers": [tier_spec(chain[-1], urls[chain[-1]])],
           "policy": {"name": "threshold", "params": {"signal": setup.signal, "chain": [chain[-1]], "thresholds": {}}}}
    return cascade, top


def batch_lines(items: list[dict], model: str) -> bytes:
    return "".join(json.dumps({"custom_id": it["id"], "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "messages": [{"role": "user", "content": it["prompt"]}]}})
                   + "\n" for it in items).encode()


class Cluster:
    """The processes of one cluster demo, started in order, each waited for."""

    def __init__(self, setup: Setup, opts: ClusterOptions, base: Settings, folder: Path,
                 log: Callable[[str], None]):
        self.setup, self.opts, self.log, self.folder = setup, opts, log, folder
        self.prefix = f"cascade-demo-{uuid.uuid4().hex[:8]}:"
        self.db_url = f"{opts.postgres}/{opts.database}"
        self.admin_url = f"{opts.postgres}/postgres"
        self.threads = setup.threads
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        for keep in ("CASCADE_MODEL_CACHE", "CASCADE_LLAMA_EXTRA_BUFFERS"):
            if keep in os.environ:
                env[keep] = os.environ[keep]
        env.setdefault("CASCADE_MODEL_CACHE", str(base.model_cache))
        (folder / "portfolios").mkdir()
        env.update(CASCADE_BROKER_URL=opts.redis, CASCADE_DATABASE_URL=self.db_url, CASCADE_REDIS_PREFIX=self.prefix,
                   CASCADE_PORTFOLIO=str(folder / "cascade.yaml"), CASCADE_PORTFOLIO_DIR=str(folder / "portfolios"),
                   CASCADE_HOME=str(folder / "home"), PYTHONUNBUFFERED="1")
        self.env = env
        self.procs = Processes(folder, env)
        self.api_url = self.flower_url = ""
        self.flower_auth = ("demo", secrets.token_urlsafe(9))
        self.key = ""

    def start(self) -> None:
        chain, opts = self.setup.chain, self.opts
        ports = {t: spare_port() for t in chain}
        urls = {t: f"http://127.0.0.1:{p}/v1" for t, p in ports.items()}
        for t in chain:
            self.procs.start(f"model-{t}", "models", "serve", t, "--port", str(ports[t]),
                             "--threads", str(self.threads), "--n-ctx", "1024")
        cascade, top = portfolios(self.setup, urls)
        (self.folder / "cascade.yaml").write_text(yaml.safe_dump(cascade, sort_keys=False))
        (self.folder / "portfolios" / f"always-{chain[-1]}.yaml").write_text(yaml.safe_dump(top, sort_keys=False))
        create_database(self.admin_url, opts.database, replace=True)
        upgrade(self.db_url)
        for t in chain:
            self.procs.wait_http(f"model-{t}", f"{urls[t]}/models", timeout=300)
        self.log("model servers: " + ", ".join(f"{t} {urls[t]}" for t in chain))
        for t in chain:
            self.procs.start(f"worker-{t}", "worker", "--tier", t, "-l", "WARNING")
        made = subprocess.run([sys.executable, "-m", "worker.cli", "keys", "create", "--tenant", "demo",
                               "--name", "cluster-demo"], env=self.env, capture_output=True, text=True, timeout=120)
        if made.returncode != 0:
            raise ClusterError(f"cascade keys create failed: {made.stderr.strip()[-2000:]}")
        self.key = made.stdout.strip().splitlines()[-1]
        api_port = opts.api_port or spare_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.procs.start("api", "serve", "--port", str(api_port))
        flower_port = opts.flower_port or spare_port()
        self.flower_url = f"http://127.0.0.1:{flower_port}"
        self.procs.env = {**self.env, "CASCADE_FLOWER_BASIC_AUTH": ":".join(self.flower_auth)}
        self.procs.start("flower", "flower", "--port", str(flower_port))
        self.procs.env = self.env
        self.procs.wait_http("api", f"{self.api_url}/readyz", timeout=120)
        self.procs.wait_http("flower", f"{self.flower_url}/api/workers", timeout=120, auth=self.flower_auth)
        self.wait_workers(timeout=300)
        self.log(f"API {self.api_url} (key for tenant demo: {self.key}); Flower {self.flower_url} "
                 f"(user {self.flower_auth[0]}, password {self.flower_auth[1]})")

    def wait_workers(self, timeout: float) -> None:
        """Until Flower lists every tier's worker online: each has passed its preflight probe."""
        want = {f"{t}@" for t in self.setup.chain}
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            self.procs.check()
            try:
                r = httpx.get(f"{self.flower_url}/api/workers", params={"refresh": "1", "status": "1"},
                              auth=self.flower_auth, timeout=10)
                seen = {name.split("@")[0] + "@" for name, up in r.json().items() if up} if r.status_code == 200 else set()
            except (httpx.HTTPError, ValueError):
                pass
            if want <= seen:
                return
            time.sleep(1.0)
        raise ClusterError(f"tier workers not all up within {timeout:.0f}s (Flower sees {sorted(seen) or 'none'})")

    def run_batch(self, items: list[dict], model: str, timeout: float) -> tuple[list[dict], float, dict]:
        """The items as one OpenAI batch through the official SDK; (jobs as `cascade demo`
        summarises them, seconds from batch creation to completion, the final batch object)."""
        from openai import OpenAI  # deferred: the SDK is a client's dependency, only this demo uses it here

        client = OpenAI(base_url=f"{self.api_url}/v1", api_key=self.key, max_retries=5)
        up = client.files.create(file=(f"{model.split('/')[-1]}.jsonl", batch_lines(items, model)), purpose="batch")
        t0 = time.monotonic()
        batch = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions", completion_window="24h",
                                      metadata={"demo": model})
        while batch.status not in TERMINAL:
            if time.monotonic() - t0 > timeout:
                client.batches.cancel(batch.id)
                raise ClusterError(f"batch {batch.id} not finished within {timeout:.0f}s "
                                   f"({batch.request_counts}); cancelled")
            self.procs.check()
            time.sleep(0.25)
            batch = client.batches.retrieve(batch.id)
        took = time.monotonic() - t0
        if batch.status != "completed" or not batch.output_file_id:
            raise ClusterError(f"batch {batch.id} ended {batch.status}: {batch.errors or batch.request_counts}")
        by_id = {it["id"]: it for it in items}
        jobs = []
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.api_url, headers=headers, timeout=30) as http:
            for line in client.files.content(batch.output_file_id).text.splitlines():
                out = json.loads(line)
                job_id = out["response"]["body"]["cascade"]["job_id"]
                view = http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                jobs.append({"id": out["custom_id"], "status": view["status"], "answer": view["answer"],
                             "final_tier": view["tier"], "input": by_id[out["custom_id"]],
                             "attempts": view["attempts"]})
        if batch.error_file_id:
            for line in client.files.content(batch.error_file_id).text.splitlines():
                out = json.loads(line)
                jobs.append({"id": out["custom_id"], "status": "failed", "answer": None, "final_tier": None,
                             "input": by_id[out["custom_id"]], "attempts": []})
        return jobs, took, batch.model_dump()

    def close(self) -> None:
        self.procs.stop_all()
        try:
            drop_database(self.admin_url, self.opts.database)
        except Exception as e:  # noqa: BLE001 - the demo's result stands; say what is left behind
            self.log(f"could not drop database {self.opts.database}: {e}")
        try:
            import redis  # deferred: the broker's client, only for removing the demo's own keys

            r = redis.Redis.from_url(self.opts.redis)
            keys = list(r.scan_iter(match=f"{self.prefix}*", count=1000))
            if keys:
                r.delete(*keys)
        except Exception as e:  # noqa: BLE001
            self.log(f"could not remove Redis keys {self.prefix}*: {e}")


def run_cluster_demo(setup: Setup, n: int, seed: int, mix: str, *, base: Settings, opts: ClusterOptions,
                     baseline: bool = True, log: Callable[[str], None] = print) -> DemoRun:
    chain = setup.chain
    check_models(chain)
    items = [q.item() for q in dq.generate(n, seed=seed, weights=MIXES[mix], part="demo")]
    models = {t: modelpack.spec(t).model for t in TIERS}
    wall: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cascade-cluster-")))
        cluster = Cluster(setup, opts, base, folder, log)
        stack.callback(cluster.close)
        t0 = time.monotonic()
        log(f"cluster: starting {len(chain)} model servers, {len(chain)} tier workers, the API and Flower "
            f"(Redis {opts.redis} prefix {cluster.prefix}, PostgreSQL database {opts.database})")
        cluster.start()
        start_s = time.monotonic() - t0
        log(f"cascade: {n} questions as an OpenAI batch through {' -> '.join(chain)}; watch it in Flower at "
            f"{cluster.flower_url}")
        jobs, took, batch = cluster.run_batch(items, "cascade/default", opts.timeout)
        wall["cascade"] = {"serve": took, "start": start_s}
        top_jobs = None
        if baseline and len(chain) > 1:
            log(f"always {chain[-1]}: the same {n} questions as a second batch (cascade/always-{chain[-1]})")
            top_jobs, took_top, _ = cluster.run_batch(items, f"cascade/always-{chain[-1]}", opts.timeout)
            wall["top"] = {"serve": took_top}
        if opts.hold > 0:
            log(f"holding the cluster for {opts.hold:.0f}s: Flower {cluster.flower_url} "
                f"(user {cluster.flower_auth[0]}, password {cluster.flower_auth[1]})")
            time.sleep(opts.hold)
    c_sum = summarise(jobs, chain)
    m_sum = summarise(top_jobs, chain[-1:]) if top_jobs is not None else None
    where = ("distributed: Redis and PostgreSQL, one `cascade worker` per tier, llama-cpp-python servers, "
             "submitted as an OpenAI batch through the openai SDK")
    text = render(c_sum, m_sum, chain=chain, models=models, policy=setup.describe(), n=n, seed=seed,
                  mix=mix_text(mix), wall=wall, threads=setup.threads, prices=PRICES, where=where)
    return DemoRun(setup, None, None, wall, c_sum, m_sum, text, jobs={"cascade": jobs, "top": top_jobs},
                   batch=batch)
