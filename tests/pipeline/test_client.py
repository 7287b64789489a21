"""The Python client and the `cascade.submit` Celery task against real Redis and
PostgreSQL with one `cascade worker` process per (replay) tier; and the client in
the embedded mode."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from celery import Celery
from helpers.env import REDIS
from helpers.portfolios import write_portfolio
from helpers.workers import Workers
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from router.core.errors import UserError
from router.core.records import load_dataset
from worker.client import AsyncClient, Client, JobNotFound
from worker.config.settings import Settings
from worker.job.request import RequestError
from worker.queue.submit import IdempotencyConflict, job_id_for
from worker.store.jobs import JobStore
from worker.store.notify import JOB_CHANNEL, Waiter
from worker.store.schema import attempts, jobs

pytestmark = pytest.mark.services

MODELS = ["llama3.2-3b", "llama3.1-70b"]


def rows(bench, n, split="test"):
    return load_dataset(bench / "rc-mmlu.jsonl.gz").split(split)[:n]


@pytest.fixture(scope="module")
def tier_workers(bench, distributed_module, tmp_path_factory):
    """One worker process per tier, shared by the module's tests (each with its own jobs)."""
    tmp = tmp_path_factory.mktemp("client")
    path = write_portfolio(tmp / "p.toml", bench, MODELS, [-0.3])
    w = Workers(distributed_module[1], path, tmp)
    try:
        for t in ("t0", "t1"):
            w.start(t)
        yield w, path
    finally:
        w.kill_all()


@pytest.fixture
def deployment(distributed_module, tier_workers):
    settings, _ = distributed_module
    w, path = tier_workers
    client = Client(settings, portfolio=path)
    yield settings, client, w, path
    client.close()


def count(store: JobStore, table, *where) -> int:
    with store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(table).where(*where)).scalar()


def test_submit_wait_idempotent_and_scoped(bench, deployment):
    settings, client, w, _ = deployment
    r = rows(bench, 2)
    job = client.submit(r[0].prompt, idempotency_key="order-1", metadata={"customer": "acme"})
    try:
        done = client.wait(job, timeout=60)
    except TimeoutError:
        print(w.logs())
        raise
    assert done["status"] == "succeeded" and done["answer"] and done["tier"] in ("t0", "t1")
    assert done["metadata"] == {"customer": "acme"} and done["priority"] == "interactive"
    assert [a["tier"] for a in done["attempts"]][0] == "t0" and done["attempts"][-1]["decision"] == "accept"
    assert done["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in done["attempts"]))
    # the same key again: the same job, and no second set of attempts
    assert client.submit(r[0].prompt, idempotency_key="order-1", metadata={"customer": "acme"}) == job
    store = JobStore(settings.db_url)
    assert count(store, attempts, attempts.c.job_id == job) == len(done["attempts"])
    with pytest.raises(IdempotencyConflict, match="order-1"):
        client.submit(r[1].prompt, idempotency_key="order-1")
    # another tenant cannot see it
    other = Client(settings, tenant="other", portfolio=deployment[3])
    try:
        with pytest.raises(JobNotFound):
            other.get(job)
    finally:
        other.close()


def test_refused_requests_write_nothing(bench, deployment):
    settings, client, _, _ = deployment
    store = JobStore(settings.db_url)
    before = count(store, jobs)
    with pytest.raises(RequestError, match=r"^params.temperature: tier 't0' \(replay backend\)"):
        client.submit("hi", params={"temperature": 0.7})
    with pytest.raises(RequestError, match="^prompt: contains a NUL"):
        client.submit("a\x00b")
    with pytest.raises(RequestError, match="^metadata.k: contains a NUL"):
        client.submit("hi", metadata={"k": "\x00"})
    # issue #23: text PostgreSQL cannot store is refused naming the field, as NUL is
    with pytest.raises(RequestError, match="^metadata.k: contains a lone surrogate"):
        client.submit("hi", metadata={"k": "\ud800"})
    with pytest.raises(RequestError, match="^prompt: contains a lone surrogate"):
        client.submit("a\ud800b")
    with pytest.raises(RequestError, match=r"^messages\[0\].content: contains a lone surrogate"):
        client.submit(messages=[{"role": "user", "content": "\ud800"}])
    with pytest.raises(RequestError, match="^priority"):
        client.submit("hi", priority="urgent")
    assert count(store, jobs) == before


def test_wait_is_woken_by_a_notification_not_a_poll(bench, deployment):
    settings, client, _, _ = deployment
    job = client.submit("a prompt no replay has", idempotency_key="nowhere")  # fails at every tier, quickly
    client.wait(job, timeout=60)
    store = JobStore(settings.db_url)
    # a job finished by another connection 1.5 s from now: the waiter reads the row when
    # it starts and when woken, a handful of times, not every few milliseconds
    job2 = client.submit("another prompt no replay has", priority="batch")
    client.wait(job2, timeout=60)
    with store.tx() as c:
        c.execute(jobs.update().where(jobs.c.id == job2).values(status="running"))
    reads = []

    def done():
        reads.append(1)
        return store.job(job2)["status"] != "running"

    threading.Timer(1.5, store.cancel_job, args=[job2]).start()
    started = time.monotonic()
    waiter = Waiter(settings.db_url)
    try:
        assert waiter.wait(JOB_CHANNEL, job2, done, timeout=20)
    finally:
        waiter.close()
    assert time.monotonic() - started >= 1.4 and len(reads) <= 3


def test_run_subscribes_before_the_insert_and_takes_the_finished_job_from_its_notice(bench, deployment):
    settings, client, _, _ = deployment
    rec = rows(bench, 1)[0]
    client.run(rec.prompt, timeout=60)  # the listener connected, the portfolio saved
    seen: list[str] = []
    client.jobs.on_statement(seen.append)
    job = client.run(rec.prompt, timeout=60)
    assert job["status"] == "succeeded" and job["answer"]
    reads = [s for s in seen if s.lstrip().upper().startswith("SELECT") and "WHERE jobs.id = " in s]
    assert not [s for s in seen if "FROM attempts" in s and "JOIN" not in s], seen  # the attempts came with it
    # no read before the job's notice (it was subscribed to before its row was written), and none after
    # it: the notice carried the job (migration 0013), the same as a read of it gives
    assert reads == [], seen
    assert job == client.get(job["id"])
    # the default tenant has no budget: its job went in as one INSERT, without the admission lock
    assert not any("pg_advisory_xact_lock" in s for s in seen)
    # a job already final when it is asked for again (an idempotency key repeated) is read at once
    first = client.run(rec.prompt, idempotency_key="run-twice", timeout=60)
    assert client.run(rec.prompt, idempotency_key="run-twice", timeout=5)["id"] == first["id"]


def test_async_run_takes_the_finished_job_from_its_notice_and_a_timeout_names_a_durable_job(bench, deployment):
    """AsyncClient.run as Client.run: no read before the notice nor after it, the insert not
    waiting for the disk; jobs awaited together on one loop; out of time, it names a job
    that exists."""
    settings, _, _, path = deployment
    recs = rows(bench, 4)

    async def main():
        async with AsyncClient(settings, portfolio=path) as c:
            await c.run(recs[0].prompt, timeout=60)  # the listener connected, the portfolio saved
            seen: list[str] = []
            c.sync.jobs.on_statement(seen.append)
            job = await c.run(recs[1].prompt, timeout=60)
            together = await asyncio.gather(*(c.run(r.prompt, timeout=60) for r in recs[2:]))
            reads = [x for x in seen if x.lstrip().upper().startswith("SELECT") and "WHERE jobs.id = " in x]
            assert reads == [], seen
            assert job == await c.get(job["id"])
            assert [j["status"] for j in together] == ["succeeded"] * 2
            with pytest.raises(TimeoutError, match="job .* not finished after 0") as e:
                await c.run(recs[0].prompt, timeout=0)
            return job, e.value.args[0].split()[1]

    job, timed_out = asyncio.run(main())
    assert job["status"] == "succeeded" and job["answer"]
    assert JobStore(settings.database_url).job(timed_out) is not None


def test_a_runs_insert_waits_for_no_disk_and_a_timeout_that_names_the_job_makes_it_durable(bench, deployment):
    """Client.run gives the job's id to no one before its result (committed durably by its
    stage), so its insert does not wait for the disk; the setting must end with the insert
    (the connection's next write waits again), and a run that times out, naming the job,
    first has it written out."""
    settings, client, w, _ = deployment
    url = make_url(settings.database_url).update_query_dict({"application_name": "durability-probe"})
    store = JobStore(url.render_as_string(hide_password=False))  # an engine of its own: one connection
    row = {**client.submitter.prepare({"prompt": "durability probe"}, portfolio=None)[0], "id": "durable-probe"}
    with store.read() as c:
        pid = c.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    assert store.insert_unless_budgeted(row, durable=False) is True
    with store.read() as c:  # the same connection (one in the pool), back to waiting for the disk
        assert c.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid
        assert c.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        written = c.exec_driver_sql("SELECT pg_current_wal_insert_lsn()").scalar()
    store.make_durable(row["id"])
    with store.read() as c:
        assert c.execute(text("SELECT pg_current_wal_flush_lsn() >= CAST(:l AS pg_lsn)"), {"l": written}).scalar()
    store.engine.dispose()
    # out of time before the job could finish: the error names a job that exists
    with pytest.raises(TimeoutError, match="not finished") as e:
        client.run(rows(bench, 1)[0].prompt, timeout=0.001)
    assert client.jobs.job(str(e.value).split()[1]) is not None


def test_batch_streams_in_and_results_out_in_order(bench, deployment, tmp_path):
    _, client, _, _ = deployment
    r = rows(bench, 20)
    items = [{"id": x.id, "prompt": x.prompt} for x in r]
    items.insert(5, {"id": "bad", "prompt": 7})
    items.append({"id": r[0].id, "prompt": r[0].prompt})  # an id used twice
    out = list(client.map(items, chunk=7, timeout=120))
    assert len(out) == 22
    assert [o["custom_id"] for o in out[:5]] == [x.id for x in r[:5]] and out[5]["custom_id"] == "bad"
    assert out[5]["status"] == "failed" and out[5]["error"] == "line 6: prompt: must be a string, got int"
    assert out[-1]["status"] == "failed" and out[-1]["error"] == f"line 22: id {r[0].id!r} already used on line 1"
    assert all(o["status"] == "succeeded" for i, o in enumerate(out[:-1]) if i != 5)
    b = client.batch(out[0]["batch_id"])
    assert b["counts"] == {"total": 22, "done": 22, "succeeded": 20, "failed": 2, "cancelled": 0, "open": 0}
    assert sum(t["answered"] for t in b["tiers"].values()) == 20


def test_cascade_submit_from_a_plain_celery_client(bench, deployment):
    settings, client, w, _ = deployment
    plain = Celery("some-service", broker=REDIS)
    plain.conf.broker_transport_options = {"global_keyprefix": settings.redis_prefix}
    prompt = rows(bench, 1)[0].prompt
    plain.send_task("cascade.submit", kwargs={"prompt": prompt, "idempotency_key": "celery-1",
                                              "metadata": {"from": "celery"}}, queue="cascade.submit")
    plain.send_task("cascade.submit", kwargs={"prompt": prompt, "idempotency_key": "celery-bad",
                                              "params": {"temperature": 1.0}}, queue="cascade.submit")
    # issue #23: a request PostgreSQL cannot store raised in the task and left nothing under its key
    plain.send_task("cascade.submit", kwargs={"prompt": "\ud800", "idempotency_key": "celery-surrogate"},
                    queue="cascade.submit")
    plain.send_task("cascade.submit", kwargs={"prompt": prompt, "idempotency_key": "celery-surrogate-meta",
                                              "metadata": {"k": "\ud800"}}, queue="cascade.submit")
    job = job_id_for("default", "celery-1")
    deadline = time.time() + 60
    while time.time() < deadline:  # the task commits the row; wait() needs it to exist
        try:
            done = client.wait(job, timeout=60)
            break
        except JobNotFound:
            time.sleep(0.1)
    else:
        print(w.logs())
        raise AssertionError("cascade.submit did not commit the job")
    plain.close()
    assert done["status"] == "succeeded" and done["metadata"] == {"from": "celery"}
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            bad = client.get(job_id_for("default", "celery-bad"))
            break
        except JobNotFound:
            time.sleep(0.1)
    assert bad["status"] == "failed" and "params.temperature" in bad["error"] and bad["attempts"] == []
    for key, field in (("celery-surrogate", "prompt"), ("celery-surrogate-meta", "metadata.k")):
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                kept = client.get(job_id_for("default", key))
                break
            except JobNotFound:
                time.sleep(0.1)
        else:
            print(w.logs())
            raise AssertionError(f"nothing kept under the idempotency key {key!r}")
        assert kept["status"] == "failed" and f"{field}: contains a lone surrogate" in kept["error"], kept


def test_embedded_client_and_async_client(bench, tmp_path):
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    r = rows(bench, 3)
    settings = Settings(home=tmp_path / "home")

    async def main():
        async with AsyncClient(settings, portfolio=path) as c:
            ids = [await c.submit(x.prompt) for x in r]
            return await asyncio.gather(*(c.wait(i, timeout=60) for i in ids)), await c.run(r[0].prompt, timeout=60)

    done, ran = asyncio.run(main())
    assert [d["status"] for d in done] == ["succeeded"] * 3
    assert ran["status"] == "succeeded"  # run without notifications: short polls

    # a file streamed in, results out in input order (a line that is not JSON fails, named)
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([json.dumps({"id": "a", "prompt": r[0].prompt}), "{oops",
                              json.dumps({"id": "b", "prompt": r[1].prompt})]) + "\n")
    with Client(settings, portfolio=path) as c:
        out = list(c.map(inp, timeout=60))
    assert [(o["custom_id"], o["status"]) for o in out] == [("a", "succeeded"), ("line-2", "failed"),
                                                            ("b", "succeeded")]
    assert out[1]["error"].startswith("line 2: not valid JSON")


def test_cascade_submit_task_in_the_embedded_mode_refuses_unstorable_text(bench, tmp_path):
    """Issue #23: the same refusal as on PostgreSQL, kept as a failed job under the key."""
    from worker.queue.catalog import Catalog
    from worker.queue.runtime import Runtime
    from worker.queue.tasks import make_app

    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    settings = Settings(home=tmp_path / "home")
    with Client(settings, portfolio=path) as c:
        runtime = Runtime(settings)
        app = make_app(settings, runtime, catalog=Catalog.from_settings(settings, c.catalog.get(None)))
        try:
            app.tasks["cascade.submit"].apply(kwargs={"prompt": "a\ud800", "idempotency_key": "emb-1"})
            app.tasks["cascade.submit"].apply(kwargs={"prompt": "hi", "idempotency_key": "emb-2",
                                                      "metadata": {"k": "\ud800"}})
        finally:
            runtime.close()
        for key, field in (("emb-1", "prompt"), ("emb-2", "metadata.k")):
            kept = c.get(job_id_for("default", key))
            assert kept["status"] == "failed" and f"{field}: contains a lone surrogate" in kept["error"], kept


def test_a_tenants_budget_limits_the_client_and_the_celery_task_too(bench, deployment):
    """Issue #23: budgets are reserved per job in the one submit path, so the in-cluster
    callers that name a tenant are held to its budget as the HTTP service is."""
    from worker.store.tenants import TenantStore

    settings, _, w, path = deployment
    TenantStore(settings.db_url).upsert_tenant("capped", budget_usd=1e-6)  # below any job's reservation
    store = JobStore(settings.db_url)
    r = rows(bench, 3)
    with Client(settings, tenant="capped", portfolio=path) as capped:
        with pytest.raises(UserError, match="tenant 'capped' has .* budget left") as e:
            capped.submit(r[0].prompt)
        assert type(e.value).__name__ == "BudgetExhausted"
        assert count(store, jobs, jobs.c.tenant == "capped") == 0
        out = list(capped.map([{"id": f"c{i}", "prompt": x.prompt} for i, x in enumerate(r)], timeout=60))
        assert [o["status"] for o in out] == ["failed"] * 3 and all("budget" in o["error"] for o in out), out
    plain = Celery("some-service", broker=REDIS)
    plain.conf.broker_transport_options = {"global_keyprefix": settings.redis_prefix}
    plain.send_task("cascade.submit", kwargs={"prompt": r[0].prompt, "tenant": "capped", "idempotency_key": "cap-1"},
                    queue="cascade.submit")
    plain.close()
    job = job_id_for("capped", "cap-1")
    deadline = time.time() + 30
    while (row := store.job(job)) is None and time.time() < deadline:
        time.sleep(0.1)
    assert row is not None, w.logs()
    assert row["status"] == "failed" and "budget" in row["error"], row
