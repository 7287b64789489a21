"""The pipeline on real Redis + PostgreSQL with one `cascade worker` process per
tier: results equal the offline simulation exactly, and a killed worker loses
and duplicates nothing."""
from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
from helpers.portfolios import write_portfolio
from sqlalchemy import func, select, text

from router.core.portfolio import load_portfolio
from router.core.records import load_dataset
from router.lab.simulate import simulate, tiers_of
from worker.queue.batch import job_results, wait_for
from worker.queue.dispatch import Dispatcher
from worker.queue.items import read_items
from worker.queue.run import run_batch
from worker.queue.tasks import make_app
from worker.store.batches import BatchStore
from worker.store.jobs import JobStore
from worker.store.schema import attempts, jobs

pytestmark = pytest.mark.services

MODELS = ["llama3.2-3b", "llama3.1-70b", "llama3.1-405b"]


def offline(portfolio, bench, split, n):
    ds = load_dataset(bench / "rc-mmlu.jsonl.gz")
    rows = ds.split(split)[:n]
    return rows, simulate(portfolio.built_policy, tiers_of(portfolio), rows)


def lost_calls(store) -> dict[str, float]:
    """job id -> the estimated spend of its calls a killed worker started and never finished
    (model_calls rows `lost`): in the job's cost, beside what the offline replay gives."""
    with store.engine.connect() as c:
        return {r.job_id: r.est for r in c.execute(text(
            "SELECT job_id, sum(est_cost_usd) AS est FROM model_calls WHERE state = 'lost' GROUP BY job_id"))}


def assert_matches_offline(db_jobs, outcomes, lost: dict[str, float] | None = None):
    lost = lost or {}
    assert [j["id"] for j in db_jobs] == [o.id for o in outcomes]
    for j, o in zip(db_jobs, outcomes):
        assert (j["status"], j["final_tier"], j["answer"], j["correct"]) == (
            o.status, o.final_tier, o.answer, o.correct), j["id"]
        assert j["cost_usd"] == pytest.approx(o.cost_usd + lost.get(j["job_id"], 0.0)), j["id"]
        assert [a["tier"] for a in j["attempts"]] == o.calls
    db_counts = Counter(j["final_tier"] for j in db_jobs)
    assert db_counts == Counter(o.final_tier for o in outcomes)
    db_cost = sum(j["cost_usd"] for j in db_jobs)
    assert db_cost == pytest.approx(sum(o.cost_usd for o in outcomes) + sum(lost.values()))
    assert sum(j["correct"] for j in db_jobs) == sum(o.correct for o in outcomes)


def assert_exactly_once(store: BatchStore, batch_id: str, n: int, lost: dict[str, float] | None = None):
    b = store.batch(batch_id)
    assert (b["total"], b["done"]) == (n, n)
    with store.engine.connect() as c:
        statuses = Counter(dict(c.execute(select(jobs.c.status, func.count()).where(jobs.c.batch_id == batch_id)
                                          .group_by(jobs.c.status)).all()))
        assert statuses["succeeded"] == b["succeeded"] and statuses["failed"] == b["failed"]
        assert sum(statuses.values()) == n
        # one accepting attempt per succeeded job, never two
        accepts = c.execute(select(attempts.c.job_id, func.count()).where(attempts.c.decision == "accept")
                            .group_by(attempts.c.job_id).having(func.count() > 1)).all()
        assert accepts == []
        # each job's cost is the sum of its attempts, counted once (and of its lost calls' estimates)
        per_job = dict(c.execute(select(attempts.c.job_id, func.sum(attempts.c.cost_usd)).group_by(attempts.c.job_id)).all())
        for jid, est in (lost or {}).items():
            per_job[jid] = per_job.get(jid, 0.0) + est
        for jid, cost in c.execute(select(jobs.c.id, jobs.c.total_cost).where(jobs.c.batch_id == batch_id)).all():
            assert cost == pytest.approx(per_job[jid], rel=1e-12, abs=1e-15)
        assert b["total_cost"] == pytest.approx(sum(per_job.values()), rel=1e-9)


def three_tiers(bench, tmp_path, workers, *worker_args, slow_middle=False, tier_args=None):
    """A 3-tier replay portfolio (the middle tier waiting its recorded latency if
    slow_middle) and one worker process per tier (`tier_args`: more arguments of some)."""
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    if slow_middle:
        path.write_text(path.read_text().replace('model = "llama3.1-70b" }', 'model = "llama3.1-70b", sleep = true }'))
    portfolio = load_portfolio(path)
    w = workers(path)
    procs = {t.name: w.start(t.name, *worker_args, *(tier_args or {}).get(t.name, ())) for t in portfolio.tiers}
    return portfolio, w, procs


@pytest.mark.slow
def test_1000_rows_three_tiers_equal_offline(bench, distributed, workers, tmp_path):
    settings, _ = distributed
    portfolio, w, _ = three_tiers(bench, tmp_path, workers)
    batch_equals_offline(settings, portfolio, w, bench, "it-1000", 1000, timeout=300)


def batch_equals_offline(settings, portfolio, w, bench, batch_id: str, n: int, timeout: float) -> None:
    """n test rows of rc-mmlu as one batch through the workers `w`: every tier answers
    some, each job's outcome is the offline one, and each is recorded exactly once."""
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=n)
    try:
        report = run_batch(items, portfolio, settings=settings, batch_id=batch_id, progress=False, timeout=timeout)
    except Exception:
        print(w.logs())
        raise
    _, outcomes = offline(portfolio, bench, "test", n)
    assert len(report.jobs) == n
    # the cascade really cascades here: every tier answers some
    assert set(Counter(o.final_tier for o in outcomes)) == {"t0", "t1", "t2"}
    assert_matches_offline(report.jobs, outcomes)
    assert_exactly_once(BatchStore(settings.db_url), batch_id, n)


@pytest.mark.slow
def test_kill9_worker_mid_batch_then_another_finishes(bench, distributed, workers, tmp_path):
    settings, _ = distributed
    settings = settings.model_copy(update={"chunk_size": 2})
    # the middle tier waits the recorded latency, so the kill lands mid-batch
    portfolio, w, procs = three_tiers(bench, tmp_path, workers, slow_middle=True)
    victim = procs["t1"]
    n = 60
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=n)
    run_batch(items, portfolio, settings=settings, batch_id="crash", progress=False, wait=False)
    store = BatchStore(settings.db_url)
    deadline = time.time() + 120
    while time.time() < deadline:
        with store.engine.connect() as c:
            done_t1 = c.execute(select(func.count()).select_from(attempts).where(attempts.c.tier == "t1")).scalar()
        if done_t1 >= 4:
            break
        time.sleep(0.05)
    assert done_t1 >= 4, w.logs()
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert store.batch("crash")["done"] < n  # the kill really was mid-batch
    w.start("t1")
    wait_for(store, "crash", progress=False, timeout=300)
    _, outcomes = offline(portfolio, bench, "test", n)
    # the killed worker's calls in flight are known (started, never finished) and priced at their estimate
    lost = lost_calls(store)
    assert_matches_offline(job_results(JobStore(store.url), "crash"), outcomes, lost)
    assert_exactly_once(store, "crash", n, lost)


@pytest.mark.slow
def test_duplicated_messages_change_nothing(bench, distributed, workers, tmp_path):
    settings, _ = distributed
    # three threads per tier: duplicates race each other
    portfolio, w, _ = three_tiers(bench, tmp_path, workers, "-c", "3")
    n = 200
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=n)
    store = BatchStore(settings.db_url)
    run_batch(items, portfolio, settings=settings, batch_id="dup", progress=False, wait=False)
    sender = Dispatcher(make_app(settings), 16)
    # every job's first stage delivered three more times, while the batch runs
    ids = [f"dup:{it.key}" for it in items]
    for _ in range(3):
        for i in range(0, n, 16):
            sender.send_one("t0", portfolio.tier("t0").queue_name, ids[i : i + 16])
    wait_for(store, "dup", progress=False, timeout=300)
    time.sleep(1.0)  # let stray duplicates drain; they must not change anything
    _, outcomes = offline(portfolio, bench, "test", n)
    assert_matches_offline(job_results(JobStore(store.url), "dup"), outcomes)
    assert_exactly_once(store, "dup", n)


def test_a_one_thread_worker_runs_stages_in_its_consumer_and_more_threads_in_a_pool(bench, distributed, workers,
                                                                                   tmp_path):
    # one thread (the default): the solo pool, no hand-over between threads per stage; more
    # threads asked for: the threads pool; both finish every job exactly once
    settings, _ = distributed
    portfolio, w, _ = three_tiers(bench, tmp_path, workers, tier_args={"t1": ["--concurrency", "3"]})
    batch_equals_offline(settings, portfolio, w, bench, "it-pools", 60, timeout=120)
    logs = w.logs()
    banner = {t: logs.split(f"tier {t}: ", 1)[1].split("\n")[0] for t in ("t0", "t1", "t2")}
    assert banner["t0"].endswith("backend replay, pool solo x1") and banner["t2"].endswith("pool solo x1"), banner
    assert banner["t1"].endswith("backend replay, pool threads x3"), banner


def test_worker_for_an_unknown_tier_names_it(bench, distributed, tmp_path):
    import subprocess
    import sys

    from helpers.env import REPO

    _, env = distributed
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    p = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--tier", "t9", "--portfolio", str(path)],
                       env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "unknown tier 't9'" in p.stderr and "tiers: t0, t1, t2" in p.stderr, p.stderr


def submit_then_lose_the_queue(bench, settings, tmp_path, batch_id: str, n: int):
    """Submit n jobs with no worker running, then delete the queue holding all their
    messages, as a Redis restart without AOF would."""
    import redis
    from helpers.env import REDIS

    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    portfolio = load_portfolio(path)
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=n)
    run_batch(items, portfolio, settings=settings, batch_id=batch_id, progress=False, wait=False)
    r = redis.Redis.from_url(REDIS)
    lost = sum(r.delete(f"{settings.redis_prefix}{t.queue_name}") for t in portfolio.tiers)
    assert lost == 1  # every first stage sat in the first tier's queue; now gone
    return path, portfolio


@pytest.mark.slow
def test_resume_resends_jobs_whose_messages_the_broker_lost(bench, distributed, workers, tmp_path):
    import subprocess
    import sys

    from helpers.env import REPO

    settings, env = distributed
    n = 50
    path, portfolio = submit_then_lose_the_queue(bench, settings, tmp_path, "lost", n)
    w = workers(path)
    w.env["CASCADE_SWEEP_INTERVAL"] = "3600"  # no sweeper: only `cascade resume` can recover them
    for t in portfolio.tiers:
        w.start(t.name)
    store = BatchStore(settings.db_url)
    time.sleep(3)
    assert store.batch("lost")["done"] == 0  # nothing left to deliver
    p = subprocess.run([sys.executable, "-m", "worker.cli", "resume", "lost"], env={**os.environ, **env},
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"of {n} unfinished jobs sent again" in p.stdout
    wait_for(store, "lost", progress=False, timeout=120)
    _, outcomes = offline(portfolio, bench, "test", n)
    assert_matches_offline(job_results(JobStore(store.url), "lost"), outcomes)
    assert_exactly_once(store, "lost", n)


@pytest.mark.slow
def test_workers_resend_lost_messages_by_themselves(bench, distributed, workers, tmp_path):
    """A message Redis lost (here: the whole queue deleted) is found by the tier
    workers' sweeper once the job has gone without a heartbeat for CASCADE_STALE_AFTER (10 s here)."""
    settings, _ = distributed
    n = 40
    path, portfolio = submit_then_lose_the_queue(bench, settings, tmp_path, "swept", n)
    w = workers(path)
    for t in portfolio.tiers:
        w.start(t.name)
    store = BatchStore(settings.db_url)
    wait_for(store, "swept", progress=False, timeout=120)
    _, outcomes = offline(portfolio, bench, "test", n)
    assert_matches_offline(job_results(JobStore(store.url), "swept"), outcomes)
    assert_exactly_once(store, "swept", n)
