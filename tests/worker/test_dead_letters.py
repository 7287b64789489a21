"""Dead letters and expiry on real Redis + PostgreSQL with `cascade worker`
processes: a job that crashes its stage every time fails with its error after
`max_deliveries` runs while the rest of its message and batch complete; a job
still open at its deadline expires instead of being re-sent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.env import REPO
from helpers.faulty import KIND, register
from helpers.ping import wait_ready
from helpers.portfolios import write_portfolio

from router.core.portfolio import load_portfolio
from worker.job.codec import EXPIRED
from worker.queue.batch import job_results, wait_for
from worker.queue.items import read_items
from worker.queue.run import run_batch
from worker.store.batches import BatchStore
from worker.store.jobs import JobStore

pytestmark = [pytest.mark.services, pytest.mark.slow]  # drills: crashes, kills, deadlines

MODELS = ["llama3.2-3b", "llama3.1-405b"]


def faulty_portfolio(bench: Path, tmp_path: Path, fail_on: list[str], how: str) -> Path:
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    text = path.read_text().replace('kind = "replay"', f'kind = "{KIND}"', 1)
    text = text.replace('model = "llama3.2-3b" }', f'model = "llama3.2-3b", how = "{how}", fail_on = {fail_on!r} }}'.replace("'", '"'))
    path.write_text(text)
    return path


class Supervisor:
    """One worker process per tier, started again whenever it dies (a restart policy)."""

    def __init__(self, env: dict, portfolio: Path, logdir: Path):
        self.env = {**os.environ, **env, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
        self.portfolio, self.logdir = portfolio, logdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts = 0

    def start(self, tier: str) -> None:
        log = open(self.logdir / f"worker-{tier}-{self.starts}.log", "wb")
        self.starts += 1
        self.procs[tier] = subprocess.Popen(
            [sys.executable, "-m", "helpers.faulty", "worker", "--tier", tier, "--portfolio", str(self.portfolio),
             "-l", "WARNING"], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def restart_dead(self) -> int:
        dead = [t for t, p in self.procs.items() if p.poll() is not None]
        for t in dead:
            self.start(t)
        return len(dead)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}" for f in sorted(self.logdir.glob("worker-*.log")))


@pytest.fixture
def supervisor(distributed, tmp_path):
    made = []

    def factory(portfolio: Path, **env) -> Supervisor:
        s = Supervisor({**distributed[1], **env}, portfolio, tmp_path)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.stop()


def run_until_done(store: BatchStore, sup: Supervisor, batch_id: str, timeout: float) -> int:
    """Wait for the batch, restarting dead workers; returns the number of restarts."""
    restarts = 0
    end = time.time() + timeout
    while time.time() < end:
        restarts += sup.restart_dead()
        b = store.batch(batch_id)
        if b["done"] == b["total"]:
            return restarts
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not done: {store.batch(batch_id)}\n{sup.logs()}")


def check_only_culprits_failed_by_crash(store, batch_id, culprits, n, deliveries):
    jobs = {j["job_id"]: j for j in job_results(JobStore(store.url), batch_id)}
    assert len(jobs) == n
    for key in culprits:
        j = jobs[key]
        assert j["status"] == "failed", j
        assert j["error"].startswith(f"dead letter: its stage at tier t0 ran {deliveries} times without a result"), j
        assert j["attempts"] == []  # never recorded as called
    others = [j for k, j in jobs.items() if k not in culprits]
    # the rest of the batch (the culprits' message-mates included) completed normally
    assert all(j["status"] in ("succeeded", "failed") and j["attempts"] for j in others)
    assert not any((j["error"] or "").startswith("dead letter") for j in others)
    assert {a["tier"] for j in others for a in j["attempts"]} == {"t0", "t1"}
    b = store.batch(batch_id)
    assert (b["done"], b["total"]) == (n, n)
    return jobs


def test_a_job_that_raises_every_time_fails_alone_after_max_deliveries(bench, distributed, supervisor, tmp_path):
    settings, _ = distributed
    register()
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=40)
    culprits = [items[3].key, items[20].key]  # in the first and second message of 16
    path = faulty_portfolio(bench, tmp_path, culprits, "raise")
    sup = supervisor(path, CASCADE_MAX_DELIVERIES="3")
    for t in ("t0", "t1"):
        sup.start(t)
    store = BatchStore(settings.db_url)
    run_batch(items, load_portfolio(path), settings=settings, batch_id="poison", progress=False, wait=False)
    assert run_until_done(store, sup, "poison", timeout=120) == 0  # raising never kills the worker
    jobs = check_only_culprits_failed_by_crash(store, "poison", {f"poison:{k}" for k in culprits}, 40, 3)
    assert "RuntimeError: injected crash on" in jobs[f"poison:{culprits[0]}"]["error"]
    # the worker's JSON log lines name the job, batch, tier and tenant, and never the prompt
    logged = [json.loads(x) for f in sorted(tmp_path.glob("worker-t0-*.log"))
              for x in f.read_text().splitlines() if x.startswith("{")]
    crashed = [x for x in logged if x["event"] == "stage.job_crashed"]
    assert len(crashed) == 6  # two jobs, three deliveries each
    assert {(x["job"], x["batch"], x["tier"], x["tenant"]) for x in crashed} == {
        (f"poison:{k}", "poison", "t0", "default") for k in culprits}
    assert all(x["tier"] == "t0" for x in logged)
    assert not any(it.data["prompt"][:40] in json.dumps(logged) for it in items)


def test_a_job_that_kills_its_worker_every_time_fails_alone(bench, distributed, supervisor, tmp_path):
    settings, _ = distributed
    register()
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=24)
    culprit = items[5].key
    path = faulty_portfolio(bench, tmp_path, [culprit], "exit")
    # a dead worker's message comes back after the visibility timeout
    sup = supervisor(path, CASCADE_MAX_DELIVERIES="2", CASCADE_VISIBILITY_TIMEOUT="5")
    for t in ("t0", "t1"):
        sup.start(t)
    store = BatchStore(settings.db_url)
    run_batch(items, load_portfolio(path), settings=settings.model_copy(update={"chunk_size": 8}),
              batch_id="killer", progress=False, wait=False)
    restarts = run_until_done(store, sup, "killer", timeout=180)
    assert restarts == 2  # killed once per delivery, then failed without calling it again
    jobs = check_only_culprits_failed_by_crash(store, "killer", {f"killer:{culprit}"}, 24, 2)
    assert "the worker stopped while running it" in jobs[f"killer:{culprit}"]["error"]


def test_jobs_past_their_deadline_expire_instead_of_waiting_forever(bench, distributed, supervisor, tmp_path):
    settings, _ = distributed
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    # ping (the readiness check) needs remote control, which is off by default
    sup = supervisor(path, CASCADE_SWEEP_INTERVAL="1", CASCADE_REMOTE_CONTROL="flower")
    sup.start("t0")  # no worker for t1: escalated jobs make no progress
    wait_ready(settings, "t0")  # the deadline must not pass while the worker is still starting
    store = BatchStore(settings.db_url)
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=30)
    run_batch(items, load_portfolio(path), settings=settings.model_copy(update={"job_timeout": 6}),
              batch_id="late", progress=False, wait=False)
    b = wait_for(store, "late", progress=False, timeout=60)
    jobs = job_results(JobStore(store.url), "late")
    expired = [j for j in jobs if j["error"] == EXPIRED]
    assert expired and b["failed"] >= len(expired)
    assert all(j["status"] == "failed" and "t1" not in [a["tier"] for a in j["attempts"]] for j in expired), \
        [(j["id"], j["attempts"]) for j in expired]
    assert any(j["attempts"] for j in expired)  # escalated by t0, then stuck waiting for t1
    assert all(j["status"] == "succeeded" and j["final_tier"] == "t0" for j in jobs if j["error"] != EXPIRED)
    # their t1 messages, delivered late, change nothing
    sup.start("t1")
    time.sleep(3)
    again = job_results(JobStore(store.url), "late")
    assert [(j["status"], j["error"], len(j["attempts"])) for j in again] == \
        [(j["status"], j["error"], len(j["attempts"])) for j in jobs]

    # the runbook's replay: `cascade retry` queues the expired jobs again, and now t1 answers them
    p = subprocess.run([sys.executable, "-m", "worker.cli", "retry", "late", "--match", "expired"],
                       env=sup.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"batch late: {len(expired)} failed jobs queued again")
    b = wait_for(store, "late", progress=False, timeout=60)
    final = {j["job_id"]: j for j in job_results(JobStore(store.url), "late")}
    assert b["done"] == b["total"] == 30 and b["failed"] == sum(j["status"] == "failed" for j in final.values())
    for j in expired:
        assert [a["tier"] for a in final[j["job_id"]]["attempts"]] == [a["tier"] for a in j["attempts"]] + ["t1"]
        assert final[j["job_id"]]["error"] != EXPIRED
