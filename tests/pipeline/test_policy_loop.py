"""The closed loop on real Redis + PostgreSQL with one `cascade worker` process per
tier: a policy version promoted while a batch runs takes over the jobs submitted
after it, the jobs already in flight finish under the version that planned them, no
job is lost or decided twice, and every attempt says which version decided it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
from helpers.env import REPO
from helpers.portfolios import write_portfolio
from sqlalchemy import func, select

from router.core.portfolio import load_portfolio
from worker.labwork.retune import build_policy, replay
from worker.queue.batch import wait_for
from worker.queue.items import read_items
from worker.queue.run import run_batch
from worker.store.batches import BatchStore
from worker.store.policies import PolicyStore
from worker.store.schema import attempts, jobs, policy_versions

pytestmark = pytest.mark.services

MODELS = ["llama3.2-3b", "llama3.1-70b", "llama3.1-405b"]
V2 = {"name": "threshold", "params": {"signal": "logprob", "chain": ["t0", "t2"], "thresholds": {"t0": -0.3}}}


def cascade(env, *args, check=True):
    p = subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**os.environ, **env}, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"cascade {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def _jobs(store: BatchStore, batch_id: str) -> list[dict]:
    with store.engine.connect() as c:
        rows = [dict(r) for r in c.execute(select(jobs).where(jobs.c.batch_id == batch_id)
                                           .order_by(jobs.c.seq)).mappings()]
        ats = {}
        for a in c.execute(select(attempts).where(attempts.c.job_id.in_([r["id"] for r in rows]))
                           .order_by(attempts.c.job_id, attempts.c.step)).mappings():
            ats.setdefault(a["job_id"], []).append(dict(a))
    for r in rows:
        r["attempts"] = ats.get(r["id"], [])
    return rows


@pytest.mark.slow
def test_promotion_mid_batch_switches_new_jobs_and_loses_nothing(bench, distributed, workers, tmp_path):
    settings, env = distributed
    settings = settings.model_copy(update={"chunk_size": 2})
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    # the middle tier waits each call's recorded latency: the first jobs are still running at the promotion
    path.write_text(path.read_text().replace('model = "llama3.1-70b" }', 'model = "llama3.1-70b", sleep = true }'))
    portfolio = load_portfolio(path)
    w = workers(path)
    for t in portfolio.tiers:
        w.start(t.name)
    n1, n = 60, 120
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=n)
    store = BatchStore(settings.db_url)
    policy_file = tmp_path / "v2.json"
    policy_file.write_text(json.dumps(V2))
    run_batch(items[:1], portfolio, settings=settings, batch_id="warm", progress=False, timeout=120)  # saves the portfolio
    assert "stored candidate version 2" in cascade(env, "policy", "add", "--portfolio", str(path), "--file",
                                                   str(policy_file)).stdout
    run_batch(items[:n1], portfolio, settings=settings, batch_id="loop", progress=False, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        with store.engine.connect() as c:
            at_t1 = c.execute(select(func.count()).select_from(attempts).where(attempts.c.tier == "t1")).scalar()
        if at_t1 >= 3:
            break
        time.sleep(0.05)
    assert at_t1 >= 3, w.logs()

    # promoted in-process (milliseconds): `cascade policy promote` and its signal check are tested elsewhere
    assert PolicyStore(settings.db_url).promote(portfolio.digest, 2) == 1
    assert store.batch("loop")["done"] < n1  # the promotion really landed mid-batch
    with store.engine.connect() as c:
        promoted_at = c.execute(select(policy_versions.c.promoted_at).where(policy_versions.c.version == 2)).scalar()
    # the rest of the batch's lines, submitted after the promotion (the first ones' messages are sent again)
    run_batch(items, portfolio, settings=settings, batch_id="loop", progress=False, wait=False)
    try:
        wait_for(store, "loop", progress=False, timeout=300)
    except Exception:
        print(w.logs())
        raise

    b = store.batch("loop")
    assert (b["total"], b["done"], b["succeeded"]) == (n, n, n)
    rows = _jobs(store, "loop")
    assert len(rows) == n and all(r["status"] == "succeeded" for r in rows)
    policies = {1: portfolio.built_policy, 2: build_policy(portfolio, V2)}
    first = {it.key for it in items[:n1]}
    finished_after = 0
    for r in rows:
        version = r["plan"]["policy_version"]
        assert version == (1 if r["item_key"] in first else 2), r["id"]
        # every attempt says which version decided it: the job's, all along
        assert [a["meta"]["policy_version"] for a in r["attempts"]] == [version] * len(r["attempts"]), r["id"]
        # decided once per tier, one accepting attempt
        assert len({a["tier"] for a in r["attempts"]}) == len(r["attempts"])
        assert [a["decision"] for a in r["attempts"]].count("accept") == 1
        # and those decisions are the version's: its replay on the recorded answers calls the same tiers
        got = replay(policies[version], portfolio, r)
        assert got.missing is None and got.calls == [a["tier"] for a in r["attempts"]], r["id"]
        assert got.tier == r["final_tier"] and r["total_cost"] == pytest.approx(got.cost, rel=1e-12, abs=1e-15)
        finished_after += version == 1 and r["finished_at"] > promoted_at
    # jobs in flight at the promotion finished under the version they started with
    assert finished_after > 0
    calls = Counter((r["plan"]["policy_version"], a["tier"]) for r in rows for a in r["attempts"])
    assert calls[(1, "t1")] > 0 and calls[(2, "t1")] == 0 and calls[(2, "t2")] > 0  # version 2 skips t1

    status = json.loads(cascade(env, "status", "loop", "--json").stdout)
    per = {v["version"]: v for v in status["policy_versions"]}
    assert set(per) == {1, 2}
    assert per[1]["attempts"] == sum(v for (ver, _), v in calls.items() if ver == 1)
    assert per[2]["attempts"] == sum(v for (ver, _), v in calls.items() if ver == 2)
    assert per[1]["accept"] == n1 and per[2]["accept"] == n - n1
    assert "policy version 2:" in cascade(env, "status", "loop").stdout
    assert PolicyStore(settings.db_url).promoted(portfolio.digest) == 2
