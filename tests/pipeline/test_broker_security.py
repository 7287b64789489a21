"""The broker is not an open door: tier workers run only the project's own task,
remote control is read-only by default (what Flower reads; nothing that stops,
revokes or reroutes a worker) or off, task ids cannot be predicted, a stage message
is checked before any work, and a worker refuses a non-local broker without
credentials."""
from __future__ import annotations

import re
import time

import pytest
import redis
from helpers.env import REDIS
from helpers.portfolios import write_portfolio

from router.core.portfolio import load_portfolio
from worker.bench.noop_app import NOOP_TASK, make_noop_app, noop_key_prefix
from worker.config.settings import Settings
from worker.queue.app import base_app, check_stage_message
from worker.queue.dispatch import MAX_STAGE_JOBS, STAGE_TASK, SUBMIT_TASK, task_id
from worker.queue.items import read_items
from worker.queue.run import run_batch
from worker.queue.tasks import make_app

pytestmark = pytest.mark.services

MODELS = ["llama3.2-3b", "llama3.1-70b"]


def queue_len(settings, queue: str) -> int:
    r = redis.Redis.from_url(REDIS)
    try:
        return r.llen(f"{settings.redis_prefix}{queue}")
    finally:
        r.close()


def wait_until(cond, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_tier_workers_refuse_builtins_forged_stages_and_remote_control(bench, distributed, workers, tmp_path):
    settings, _ = distributed
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    portfolio = load_portfolio(path)
    w = workers(path)
    w.env["CASCADE_REMOTE_CONTROL"] = "off"
    procs = {t.name: w.start(t.name) for t in portfolio.tiers}
    app = base_app(settings)
    q0 = portfolio.tiers[0].queue_name
    # Celery's built-ins, a stage too large, one for a tier this worker does not
    # serve, and ones of the wrong shape: each refused, none retried
    app.send_task("celery.starmap", args=[{"task": STAGE_TASK}, [["t0", ["x"]]]], queue=q0, routing_key=q0)
    app.send_task("celery.chunks", args=[{"task": STAGE_TASK}, [], 1], queue=q0, routing_key=q0)
    app.send_task(STAGE_TASK, args=["t0", [f"forged:{i}" for i in range(200_000)]], queue=q0, routing_key=q0)
    app.send_task(STAGE_TASK, args=["t1", ["forged:1"]], queue=q0, routing_key=q0)
    app.send_task(STAGE_TASK, args=["t0", "not-a-list"], queue=q0, routing_key=q0)
    app.send_task(STAGE_TASK, args=[["t0"], ["forged:1"]], queue=q0, routing_key=q0)
    # remote control off: a shutdown or a consumer cancel reaches nobody
    assert app.control.ping(timeout=1.0) == []
    app.control.broadcast("cancel_consumer", arguments={"queue": q0})
    app.control.broadcast("shutdown")
    assert wait_until(lambda: queue_len(settings, q0) == 0)
    time.sleep(2)
    assert all(p.poll() is None for p in procs.values()), w.logs()
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=40)
    report = run_batch(items, portfolio, settings=settings, batch_id="sec", progress=False, timeout=120)
    assert report.batch["done"] == report.batch["succeeded"] == 40
    assert queue_len(settings, q0) == 0  # nothing forged came back as a retry
    logs = "".join(f.read_text(errors="replace") for f in tmp_path.glob("worker-*.log"))
    assert "Received unregistered task of type 'celery.starmap'" in logs
    assert "Received unregistered task of type 'celery.chunks'" in logs
    assert f"job_ids must be a list of 1 to {MAX_STAGE_JOBS} ids, got 200000" in logs
    assert "tier 't1' is not served here (t0)" in logs
    assert "job_ids must be a list of 1 to 1000 ids, got str" in logs
    assert "tier must be a tier name" in logs


def test_default_remote_control_answers_inspection_but_not_control(bench, distributed, workers, tmp_path):
    # no CASCADE_REMOTE_CONTROL: the default is the read-only "flower" mode
    settings, env = distributed
    assert "CASCADE_REMOTE_CONTROL" not in env and Settings().remote_control == "flower"
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    portfolio = load_portfolio(path)
    w = workers(path)
    procs = {t.name: w.start(t.name) for t in portfolio.tiers}
    app = base_app(settings)
    assert wait_until(lambda: len(app.control.ping(timeout=0.5) or []) == 2, 60), w.logs()
    inspect = app.control.inspect(timeout=1.0)
    registered = inspect.registered()
    assert registered and all(STAGE_TASK in v and not any(t.startswith("celery.") for t in v)
                              for v in registered.values())
    queues = {n: sorted(q["name"] for q in qs) for n, qs in inspect.active_queues().items()}
    q0 = portfolio.tiers[0].queue_name
    assert any(q0 in qs for qs in queues.values())
    # everything that stops, revokes, resizes or reroutes a worker is refused
    forged = task_id("t0", ["fl:some-job"])
    app.control.revoke(forged, terminate=True)
    app.control.broadcast("revoke_by_stamped_headers", arguments={"headers": {"x": "y"}})
    app.control.broadcast("cancel_consumer", arguments={"queue": q0})
    app.control.broadcast("add_consumer", arguments={"queue": "elsewhere"})
    app.control.broadcast("rate_limit", arguments={"task_name": STAGE_TASK, "rate_limit": "1/h"})
    app.control.broadcast("time_limit", arguments={"task_name": STAGE_TASK, "soft": 1, "hard": 1})
    for command in ("pool_shrink", "pool_grow", "autoscale", "pool_restart", "shutdown"):
        app.control.broadcast(command)
    time.sleep(2)
    assert all(p.poll() is None for p in procs.values()), w.logs()
    assert {n: sorted(q["name"] for q in qs) for n, qs in inspect.active_queues().items()} == queues
    assert all(not v for v in (inspect.revoked() or {}).values())
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=20)
    report = run_batch(items, portfolio, settings=settings, batch_id="fl", progress=False, timeout=120)
    assert report.batch["done"] == 20


def test_task_ids_cannot_be_predicted():
    a, b = task_id("t0", ["batch:q1", "batch:q2"]), task_id("t0", ["batch:q1", "batch:q2"])
    assert a != b
    assert re.fullmatch(r"batch:q1\+1@t0~[0-9a-f]{32}", a)
    assert re.fullmatch(r"batch:q1@t1~[0-9a-f]{32}", task_id("t1", ["batch:q1"]))


@pytest.mark.parametrize("tier, job_ids, message", [
    ("t0", [], "job_ids must be a list of 1 to"),
    ("t0", ["x"] * (MAX_STAGE_JOBS + 1), f"got {MAX_STAGE_JOBS + 1}"),
    ("t0", [1, 2], "is not a job id"),
    ("t0", ["a" * 201], "is not a job id"),
    ("t0", ["a\x00b"], "is not a job id"),
    (None, ["a"], "tier must be a tier name"),
    ("t9", ["a"], "tier 't9' is not served here"),
])
def test_stage_message_checks(tier, job_ids, message):
    from worker.queue.app import BadMessage

    with pytest.raises(BadMessage, match=re.escape(message)):
        check_stage_message(tier, job_ids, {"t0", "t1"})
    check_stage_message("t0", ["batch:a", "batch:b"], {"t0"})


def test_apps_carry_only_their_own_tasks(distributed):
    settings, _ = distributed
    tasks = set(make_app(settings).tasks)
    assert {STAGE_TASK, SUBMIT_TASK} <= tasks and all(t.startswith("cascade.") for t in tasks)  # no celery.*
    noop_app = make_noop_app(settings)
    assert list(noop_app.tasks) == [NOOP_TASK]
    # the benchmark's no-op task writes only its own counter, never a key it is handed
    r = redis.Redis.from_url(REDIS)
    victim = f"{settings.redis_prefix}someone-elses-key"
    own = f"{noop_key_prefix(settings)}count"
    try:
        noop_app.tasks[NOOP_TASK].run(victim)
        noop_app.tasks[NOOP_TASK].run(own)
        assert r.get(victim) is None and r.get(own) == b"1"
    finally:
        r.delete(own)
        r.close()


def test_worker_refuses_a_remote_broker_without_credentials():
    import click

    from worker.cli.worker_cmd import check_broker_credentials

    with pytest.raises(click.ClickException, match="has no credentials"):
        check_broker_credentials(Settings(broker_url="redis://redis.internal:6379/0"))
    check_broker_credentials(Settings(broker_url="redis://cascade:${PW}@redis.internal:6379/0".replace(
        "${PW}", "pw")))
    check_broker_credentials(Settings(broker_url="redis://127.0.0.1:6379/0"))
    check_broker_credentials(Settings(broker_url="redis://redis.internal:6379/0", allow_open_broker=True))
