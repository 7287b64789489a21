"""Prometheus metrics and the canary on real Redis + PostgreSQL with `cascade
worker` processes: scraped during a batch, the per-tier counters never run ahead
of PostgreSQL and end equal to its counts; queue depth and age match Redis; a
worker whose consumer is cancelled fails its health check."""
from __future__ import annotations

import socket
import time
from collections import Counter

import httpx
import pytest
import redis
from helpers.env import REDIS
from helpers.ping import wait_ready
from helpers.portfolios import write_portfolio
from helpers.servers import free_port
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from router.core.portfolio import load_portfolio
from worker.queue.batch import wait_for
from worker.queue.items import read_items
from worker.queue.run import run_batch
from worker.queue.tasks import make_app
from worker.store.batches import BatchStore
from worker.store.jobs import JobStore
from worker.store.schema import attempts, jobs

pytestmark = pytest.mark.services

MODELS = ["llama3.2-3b", "llama3.1-70b", "llama3.1-405b"]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def per_tier(samples: list[dict], name: str, **match) -> Counter:
    """Sum a sample over the scraped processes, per tier (and matching labels)."""
    out: Counter = Counter()
    for scraped in samples:
        for (n, labels), v in scraped.items():
            lab = dict(labels)
            if n == name and all(lab.get(k) == want for k, want in match.items()):
                out[lab["tier"]] += v
    return out


def db_counts(store: JobStore) -> tuple[Counter, Counter, dict, Counter]:
    with store.engine.connect() as c:
        calls = Counter(dict(c.execute(select(attempts.c.tier, func.count()).group_by(attempts.c.tier)).all()))
        decisions = Counter({(t, d): n for t, d, n in c.execute(
            select(attempts.c.tier, attempts.c.decision, func.count()).group_by(attempts.c.tier, attempts.c.decision))})
        cost = dict(c.execute(select(attempts.c.tier, func.sum(attempts.c.cost_usd)).group_by(attempts.c.tier)).all())
        tokens = Counter(dict(c.execute(select(attempts.c.tier, func.sum(attempts.c.tokens_out))
                                        .group_by(attempts.c.tier)).all()))
    return calls, decisions, cost, tokens


def test_counters_scraped_during_a_batch_equal_postgres(bench, distributed, workers, tmp_path):
    settings, _ = distributed
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    portfolio = load_portfolio(path)
    w = workers(path)
    w.env["CASCADE_REMOTE_CONTROL"] = "flower"  # the readiness ping needs the read-only remote control
    ports = {t: free_port() for t in ("t0", "t1", "t2")}
    for t in ("t0", "t1"):
        w.start(t, "--metrics-port", str(ports[t]))
    for t in ("t0", "t1"):
        wait_ready(settings, t)
    store = JobStore(settings.db_url)
    n = 300
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=n)
    run_batch(items, portfolio, settings=settings, batch_id="m", progress=False, wait=False)

    # during the batch: nothing counted that PostgreSQL does not hold
    mid_scrapes = 0
    r = redis.Redis.from_url(REDIS)
    t2_queue = f"{settings.redis_prefix}{portfolio.tier('t2').queue_name}"
    end = time.time() + 120
    while time.time() < end:
        scraped = [scrape(ports["t0"]), scrape(ports["t1"])]
        calls, _, _, _ = db_counts(store)
        seen = per_tier(scraped, "cascade_calls_total")
        assert all(seen[t] <= calls[t] for t in seen), (seen, calls)
        mid_scrapes += 0 < sum(seen.values())
        if not store.open_jobs("m") or all(t == "t2" for _, t in store.open_jobs("m")):
            break  # only jobs waiting for t2 (no worker yet) remain
        time.sleep(0.2)
    assert mid_scrapes >= 1
    # t2 has no worker yet: its queue's depth and age, as Redis holds them
    time.sleep(1.5)
    g = scrape(ports["t0"])
    label = (("queue", portfolio.tier("t2").queue_name), ("tier", "t2"))
    assert g[("cascade_queue_depth", label)] == r.llen(t2_queue) > 0
    assert g[("cascade_queue_oldest_age_seconds", label)] >= 1.0
    assert g[("cascade_queue_depth", (("queue", portfolio.tier("t0").queue_name), ("tier", "t0")))] == 0

    w.start("t2", "--metrics-port", str(ports["t2"]))
    wait_for(BatchStore(store.url), "m", progress=False, timeout=180)
    wait_ready(settings, "t2")
    time.sleep(0.5)
    scraped = [scrape(p) for p in ports.values()]
    calls, decisions, cost, tokens = db_counts(store)
    assert per_tier(scraped, "cascade_calls_total") == calls
    assert set(calls) == {"t0", "t1", "t2"}
    for decision in ("accept", "escalate", "reject"):
        want = Counter({t: k for (t, d), k in decisions.items() if d == decision})
        assert +per_tier(scraped, "cascade_decisions_total", decision=decision) == want, decision
    got_cost = per_tier(scraped, "cascade_cost_usd_total")
    assert {t: pytest.approx(v, rel=1e-9) for t, v in cost.items()} == dict(got_cost)
    assert +per_tier(scraped, "cascade_tokens_total", direction="out") == +tokens
    with store.engine.connect() as c:
        job_cost = c.execute(select(func.sum(jobs.c.total_cost)).where(jobs.c.batch_id == "m")).scalar()
        top_calls = c.execute(select(func.count()).select_from(attempts).where(attempts.c.tier == "t2")).scalar()
    assert sum(per_tier(scraped, "cascade_job_cost_usd_total").values()) == pytest.approx(job_cost, rel=1e-9)
    # the replay tiers carry no price: the top tier's cost counts only where it was called
    assert sum(per_tier(scraped, "cascade_top_tier_cost_usd_total").values()) == pytest.approx(cost["t2"], rel=1e-9)
    assert top_calls == calls["t2"]
    latency = per_tier(scraped, "cascade_call_latency_seconds_count")
    assert latency == calls
    for p in ports.values():
        assert httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=10).status_code == 200


def test_health_check_fails_when_a_live_worker_stops_consuming(bench, distributed, workers, tmp_path):
    settings, _ = distributed
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS[:2], [-0.3])
    w = workers(path)
    w.env["CASCADE_REMOTE_CONTROL"] = "full"  # the test itself cancels the consumer (off by default)
    w.env.update(CASCADE_CANARY_INTERVAL="0.5", CASCADE_CANARY_MAX_AGE="4")
    port = free_port()
    proc = w.start("t0", "--metrics-port", str(port))
    wait_ready(settings, "t0")
    node = f"t0@{socket.gethostname()}"
    end = time.time() + 30
    while time.time() < end:
        h = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        lat = scrape(port).get(("cascade_canary_latency_seconds", (("tier", "t0"),)))
        if h.status_code == 200 and lat is not None and lat > 0:
            break
        time.sleep(0.1)
    assert h.status_code == 200 and "consumed its canary" in h.text, h.text
    assert scrape(port)[("cascade_canary_age_seconds", (("tier", "t0"),))] < 4

    # the process stays up but its consumer goes away (as after a broker reconnect gone wrong)
    app = make_app(settings)
    queues = [q["name"] for q in app.control.inspect(destination=[node], timeout=5).active_queues()[node]]
    assert any(".canary." in q for q in queues)  # its own canary queue, beside the tier's
    for q in queues:
        app.control.cancel_consumer(q, destination=[node], reply=True, timeout=5)
    end = time.time() + 30
    while time.time() < end:
        h = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        if h.status_code == 503:
            break
        time.sleep(0.1)
    assert proc.poll() is None  # alive, yet reported unhealthy
    assert h.status_code == 503 and "not consuming" in h.text, h.text
    assert scrape(port)[("cascade_canary_age_seconds", (("tier", "t0"),))] > 4
