"""Bulk stages with concurrent calls give what one-at-a-time stages give: the same
batch through two OpenAI-compatible tiers (a scripted local server that refuses,
fails for good, or fails once on chosen prompts), first one job per message and one
request at a time, then many jobs per message with many requests in flight and
every message delivered twice; every job's answer, signals, decisions and costs
are the same, each recorded once."""
from __future__ import annotations

import time

import pytest
from helpers.servers import ScriptedModel
from helpers.workers import Workers
from sqlalchemy import func, select

from router.core.portfolio import load_portfolio
from worker.queue.batch import job_results, wait_for
from worker.queue.dispatch import Dispatcher
from worker.queue.items import Item
from worker.queue.run import run_batch
from worker.queue.tasks import make_app
from worker.store.batches import BatchStore
from worker.store.jobs import JobStore
from worker.store.schema import attempts, jobs

pytestmark = pytest.mark.services

N = 32


def prompts() -> list[str]:
    tags = {3: " [bad]", 5: " [flaky]", 7: " [down]", 8: " [slow]"}
    return [f"question {i}: {i} + {i * 7} = ?{tags.get(i % 10, '')}" for i in range(N)]


def portfolio_file(path, base_url: str, concurrency: int):
    tiers = "".join(
        f'[[tiers]]\nname = "t{i}"\n' + ("threshold = -0.25\n" if i == 0 else "")
        + f'backend = {{ kind = "openai", base_url = "{base_url}", model = "m{i}", max_tokens = 8, '
          f'concurrency = {concurrency} }}\n\n'
        for i in range(2))
    path.write_text(f'[policy]\nname = "threshold"\nsignal = "mean_logprob"\n\n{tiers}')
    return load_portfolio(path)


def run(distributed, tmp_path, server, name: str, *, chunk: int, concurrency: int, duplicates: int):
    settings, env = distributed
    settings = settings.model_copy(update={"chunk_size": chunk, "backend_breaker_cooldown": 0.0,
                                           "backend_retry_backoff": 0.01})
    env = {**env, "CASCADE_CHUNK_SIZE": str(chunk), "CASCADE_BACKEND_BREAKER_COOLDOWN": "0",
           "CASCADE_BACKEND_RETRY_BACKOFF": "0.01"}
    portfolio = portfolio_file(tmp_path / f"{name}.toml", server.base_url, concurrency)
    logs = tmp_path / name
    logs.mkdir()
    w = Workers(env, tmp_path / f"{name}.toml", logs)
    try:
        for t in portfolio.tiers:
            w.start(t.name)
        items = [Item(f"q{i}", i + 1, {"id": f"q{i}", "prompt": p}) for i, p in enumerate(prompts())]
        store = BatchStore(settings.db_url)
        run_batch(items, portfolio, settings=settings, batch_id=name, progress=False, wait=False)
        sender = Dispatcher(make_app(settings), chunk)
        ids = [f"{name}:{it.key}" for it in items]
        for _ in range(duplicates):  # redelivery: every first stage again, while the batch runs
            for i in range(0, N, chunk):
                sender.send_one("t0", portfolio.tier("t0").queue_name, ids[i : i + chunk])
        try:
            wait_for(store, name, progress=False, timeout=120)
        except Exception:
            print(w.logs())
            raise
        time.sleep(0.5)  # stray duplicates drain; they must change nothing
        assert_exactly_once(store, name, N)
        return {j["id"]: j for j in job_results(JobStore(store.url), name)}
    finally:
        w.stop_all()


def assert_exactly_once(store: BatchStore, batch_id: str, n: int) -> None:
    b = store.batch(batch_id)
    assert (b["total"], b["done"]) == (n, n)
    with store.engine.connect() as c:
        costs = dict(c.execute(select(attempts.c.job_id, func.sum(attempts.c.cost_usd))
                               .join(jobs, jobs.c.id == attempts.c.job_id).where(jobs.c.batch_id == batch_id)
                               .group_by(attempts.c.job_id)).all())
        rows = c.execute(select(jobs.c.id, jobs.c.status, jobs.c.total_cost).where(jobs.c.batch_id == batch_id)).all()
    assert b["succeeded"] == sum(r.status == "succeeded" for r in rows)
    assert b["failed"] == sum(r.status == "failed" for r in rows)
    for r in rows:  # each job's cost is its attempts', each counted once
        assert r.total_cost == pytest.approx(costs[r.id], rel=1e-12, abs=1e-15)
    assert b["total_cost"] == pytest.approx(sum(costs.values()), rel=1e-9)


def comparable(job: dict) -> tuple:
    return (job["status"], job["final_tier"], job["answer"], job["cost_usd"],
            [(a["tier"], a["answer"], a["signals"], a["decision"], a["cost_usd"], a["tokens_in"], a["tokens_out"],
              a["error"] is not None) for a in job["attempts"]])


@pytest.mark.slow
def test_bulk_concurrent_stages_equal_one_at_a_time(distributed, tmp_path):
    with ScriptedModel(slow=0.3) as server:
        one = run(distributed, tmp_path, server, "one", chunk=1, concurrency=1, duplicates=0)
        requests_one = dict(server.seen)
        assert server.peak == 1 or server.peak == 2  # one worker process per tier, one request each at a time
        server.seen.clear()
        server.peak = 0
        bulk = run(distributed, tmp_path, server, "bulk", chunk=16, concurrency=8, duplicates=1)
        requests_bulk = dict(server.seen)
    # requests really were in flight together
    assert server.peak > 2
    assert one.keys() == bulk.keys() and len(one) == N
    for key in one:
        assert comparable(one[key]) == comparable(bulk[key]), key
    # every kind of outcome happened: refused and down calls fell back, a flaky one was retried
    statuses = {k: j["status"] for k, j in one.items()}
    assert statuses["q3"] == "failed" and statuses["q7"] == "failed"  # refused, then down, at both tiers
    assert [a["error"] is not None for a in one["q5"]["attempts"]][:1] == [False]  # retried, then answered
    assert {j["final_tier"] for j in one.values() if j["status"] == "succeeded"} == {"t0", "t1"}
    # each call made as often in both runs (a flaky prompt twice, a down one 4 times): duplicates called nothing again
    assert requests_bulk == requests_one


def test_openai_generate_many_bounds_requests_in_flight_and_keeps_order():
    from router.core.attempt import Query
    from router.core.policy import Needs
    from router.core.portfolio import parse_portfolio
    from worker.models.backends import BackendFailure, build_backend

    with ScriptedModel(slow=0.2) as server:
        pf = parse_portfolio({"policy": {"name": "threshold"}, "tiers": [{"name": "t", "backend": {
            "kind": "openai", "base_url": server.base_url, "model": "m", "concurrency": 3}}]}, where="test")
        backend = build_backend(pf.tiers[0])
        try:
            queries = [Query(f"q{i}", f"{i} [slow]" if i != 4 else "4 [bad]") for i in range(9)]
            got = backend.generate_many(queries, Needs())
            alone = [backend.generate(q, Needs()).text for q in queries if q.id != "q4"]
        finally:
            backend.close()
    assert server.peak == 3  # never more than `concurrency` at once, and that many
    assert isinstance(got[4], BackendFailure) and "HTTP 400" in str(got[4])
    assert [r.text for r in got if not isinstance(r, Exception)] == alone  # each answer in its query's place
