"""Retention on real Redis + PostgreSQL: `cascade purge --older-than` deletes
finished batches and jobs with their attempts and never open work; with
CASCADE_STORE_CONTENT=false prompts and answers leave the database as jobs finish
and results are collected."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers.env import REPO
from helpers.portfolios import write_portfolio
from sqlalchemy import func, select

from router.core.portfolio import load_portfolio
from worker.job.codec import OPEN
from worker.queue.batch import wait_for
from worker.queue.items import read_items
from worker.queue.run import run_batch
from worker.store.batches import BatchStore
from worker.store.jobs import ERASED_INPUT, JobStore
from worker.store.schema import attempts, batches, jobs, model_calls

pytestmark = pytest.mark.services

MODELS = ["llama3.2-3b", "llama3.1-405b"]


def cascade(env, *args):
    p = subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**os.environ, **env}, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def counts(store: JobStore) -> tuple[int, int, int]:
    with store.engine.connect() as c:
        return tuple(c.execute(select(func.count()).select_from(t)).scalar() for t in (batches, jobs, attempts))


def calls_of(store: JobStore, job_ids_like: str) -> int:
    with store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(model_calls)
                         .where(model_calls.c.job_id.like(job_ids_like))).scalar()


def wait_until_none_at(store: JobStore, batch_id: str, tier: str, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if not [j for j, t in store.open_jobs(batch_id) if t == tier]:
            return
        time.sleep(0.05)
    raise AssertionError(f"jobs of {batch_id} still waiting at {tier}")


def test_purge_deletes_finished_work_and_never_open_work(bench, distributed, workers, tmp_path):
    settings, env = distributed
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    portfolio = load_portfolio(path)
    w = workers(path)
    w.start("t0")
    w.start("t1")
    store, batch_store = JobStore(settings.db_url), BatchStore(settings.db_url)
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=40)
    run_batch(items[:20], portfolio, settings=settings, batch_id="old", progress=False, timeout=120)
    w.stop("t1")  # t1 is down: the batch "open" keeps jobs waiting there, next to finished ones
    run_batch(items[20:], portfolio, settings=settings, batch_id="open", progress=False, wait=False)
    wait_until_none_at(store, "open", "t0")
    open_batch = batch_store.batch("open")
    assert 0 < open_batch["done"] < 20  # partly finished, partly open
    store.add_jobs(None, [{"id": "loose-1", "portfolio": portfolio.digest, "input": {"line": 1},
                           "status": "failed", "error": "bad line"}])
    before = counts(store)

    out = cascade(env, "purge", "--older-than", "0s", "--dry-run")
    assert out.startswith("would delete 1 batches, 21 jobs, ")
    assert counts(store) == before
    out = cascade(env, "purge", "--older-than", "1h")
    assert out.startswith("deleted 0 batches, 0 jobs, 0 attempts")
    assert counts(store) == before

    old_attempts = sum(len(a) for a in store.attempts_of([f"old:{it.key}" for it in items[:20]]).values())
    assert calls_of(store, "old:%") > 0
    out = cascade(env, "purge", "--older-than", "0s")
    assert out.startswith(f"deleted 1 batches, 21 jobs, {old_attempts} attempts")
    assert batch_store.batch("old") is None and store.job("loose-1") is None
    assert store.attempts_of([f"old:{it.key}" for it in items[:20]]) == {f"old:{it.key}": [] for it in items[:20]}
    assert calls_of(store, "old:%") == 0  # the calls of its jobs with them: no foreign key deletes them
    assert batch_store.batch("open") == open_batch  # untouched, finished jobs included
    assert calls_of(store, "open:%") > 0
    assert len(store.batch_jobs("open")) == 20
    # and its open jobs still finish
    w.start("t1")
    b = wait_for(batch_store, "open", progress=False, timeout=120)
    assert b["done"] == 20 and all(j["status"] not in OPEN for j in store.batch_jobs("open"))


def test_without_stored_content_prompts_and_answers_leave_the_database(bench, distributed, workers, tmp_path):
    settings, env = distributed
    settings = settings.model_copy(update={"store_content": False})
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    portfolio = load_portfolio(path)
    w = workers(path)
    w.env["CASCADE_STORE_CONTENT"] = "false"
    w.start("t0")
    store = JobStore(settings.db_url)
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=30)
    run_batch(items, portfolio, settings=settings, batch_id="private", progress=False, wait=False)
    wait_until_none_at(store, "private", "t0")
    rows = store.batch_jobs("private")
    ats = store.attempts_of([j["id"] for j in rows])
    finished = [j for j in rows if j["status"] not in OPEN]
    waiting = [j for j in rows if j["status"] in OPEN]
    assert finished and waiting
    for j in finished:  # finished: the prompt and the tiers' answers are gone, the final answer not yet
        assert j["input"] == ERASED_INPUT and all(a["answer"] is None for a in ats[j["id"]])
        assert j["final_answer"]
    for j in waiting:  # still open: what the next tier needs is there
        assert j["input"]["prompt"] and ats[j["id"]][0]["answer"] is not None
    w.start("t1")
    # collecting the results (a re-run resumes the batch and waits) hands the answers over, then erases them
    report = run_batch(items, portfolio, settings=settings, batch_id="private", progress=False, timeout=120)
    assert all(j["answer"] for j in report.jobs if j["status"] == "succeeded")
    with store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(jobs).where(jobs.c.final_answer.is_not(None))).scalar() == 0
        assert c.execute(select(func.count()).select_from(attempts).where(attempts.c.answer.is_not(None))).scalar() == 0
        assert c.execute(select(func.count()).select_from(jobs).where(jobs.c.input != ERASED_INPUT)).scalar() == 0
