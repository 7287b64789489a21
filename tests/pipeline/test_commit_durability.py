"""What a database crash may take back, and what it never may: a stage whose jobs all
escalate commits its record without waiting for the disk (the next tier's start, which
waits, writes it out before that tier's call); a stage's start (the calls it records as
started) and a final record (a result a client may already have read) always wait.

A private PostgreSQL whose WAL writer sleeps 60 s, so the log reaches the disk only when a
commit waits for it, stopped in immediate mode (as in a crash) and started again. The
stages run as the Celery task runs them (`run_stage`), against the scripted model server;
the batches' messages go to a private Redis prefix nobody consumes."""
from __future__ import annotations

import pytest
from helpers.servers import ScriptedModel
from sqlalchemy import select

from router.core.portfolio import load_portfolio
from worker.bench.faults import OwnPostgres
from worker.ops.migrate import upgrade
from worker.queue.items import Item
from worker.queue.run import run_batch
from worker.queue.runtime import Runtime
from worker.queue.stage import run_stage
from worker.store.engine import dispose_all
from worker.store.schema import attempts, jobs, model_calls

pytestmark = pytest.mark.services


@pytest.fixture
def pg():
    server = OwnPostgres("durability-test")
    server.start("wal_writer_delay=10000ms", "wal_writer_flush_after=0")  # nothing flushes but a waiting commit
    try:
        yield server
    finally:
        server.remove()


def _restart(pg: OwnPostgres) -> None:
    pg.crash()
    dispose_all()  # the pools' connections died with the server
    pg.start("wal_writer_delay=10000ms", "wal_writer_flush_after=0")


def _rows(rt: Runtime, table, ids: list[str]) -> list[dict]:
    with rt.stages.engine.connect() as c:
        return [dict(r) for r in c.execute(select(table).where(table.c.job_id.in_(ids) if table is not jobs
                                                               else table.c.id.in_(ids))).mappings()]


def test_a_crash_may_take_back_an_escalation_never_a_started_call_or_a_result(distributed, tmp_path, pg):
    pg.create_db("durability")
    settings = distributed[0].model_copy(update={"database_url": pg.url("durability"), "stale_after": 60.0,
                                                 "backend_breaker_cooldown": 0.0})
    upgrade(settings.database_url)
    with ScriptedModel() as server:
        path = tmp_path / "p.toml"
        path.write_text('[policy]\nname = "threshold"\nsignal = "mean_logprob"\n\n' + "".join(
            f'[[tiers]]\nname = "t{i}"\n' + ("threshold = 10.0\n" if i == 0 else "")  # t0 always escalates
            + f'backend = {{ kind = "openai", base_url = "{server.base_url}", model = "m{i}", max_tokens = 8 }}\n'
              f'price = {{ input_per_mtok = 1, output_per_mtok = 2 }}\n\n' for i in range(2)))
        portfolio = load_portfolio(path)

        def batch(name: str) -> tuple[Runtime, list[str]]:
            items = [Item(f"q{i}", i + 1, {"id": f"q{i}", "prompt": f"{name} question {i}"}) for i in range(3)]
            run_batch(items, portfolio, settings=settings, batch_id=name, progress=False, wait=False)
            rt = Runtime(settings)
            rt.holder = "host-a:1"
            rt.add_portfolio(portfolio)
            return rt, [f"{name}:q{i}" for i in range(3)]

        # escalated at t0, then a crash before the next tier's start: back at t0, its calls there
        # still on record as started (priced in and made again after the lease, as after a kill -9)
        rt, ids = batch("up")
        assert sorted(t for _, t, _ in run_stage(rt, "t0", ids)) == ["t1"] * 3
        assert {j["current_tier"] for j in _rows(rt, jobs, ids)} == {"t1"}
        _restart(pg)
        rt = Runtime(settings)
        assert [(j["status"], j["current_tier"]) for j in _rows(rt, jobs, ids)] == [("running", "t0")] * 3
        assert _rows(rt, attempts, ids) == []
        assert sorted((c["tier"], c["state"]) for c in _rows(rt, model_calls, ids)) == [("t0", "started")] * 3

        # escalated, then answered by t1: the results (and the escalation under them) survive a crash
        rt, ids = batch("done")
        run_stage(rt, "t0", ids)
        assert run_stage(rt, "t1", ids) == []
        answers = {j["id"]: j["final_answer"] for j in _rows(rt, jobs, ids)}
        _restart(pg)
        rt = Runtime(settings)
        got = _rows(rt, jobs, ids)
        assert {(j["status"], j["final_tier"]) for j in got} == {("succeeded", "t1")}
        assert {j["id"]: j["final_answer"] for j in got} == answers and all(answers.values())
        assert sorted(a["tier"] for a in _rows(rt, attempts, ids)) == ["t0"] * 3 + ["t1"] * 3
        assert {c["state"] for c in _rows(rt, model_calls, ids)} == {"finished"}
    dispose_all()


def test_a_crash_may_take_back_only_an_insert_no_caller_was_told_of(distributed, tmp_path, pg):
    """Inserted for a caller who learns the job only with its result (durable=False), a job
    may be lost to a crash; inserted otherwise, or made durable once named, it may not."""
    from worker.store.jobs import JobStore

    pg.create_db("inserts")
    url = pg.url("inserts")
    upgrade(url)
    store = JobStore(url)
    spec = {"policy": {"name": "single"}, "tiers": []}
    store.save_portfolio("p" * 32, spec)

    def row(job_id: str) -> dict:
        return {"id": job_id, "portfolio": "p" * 32, "input": {"prompt": job_id}, "status": "queued",
                "current_tier": "t0"}

    assert store.insert_unless_budgeted(row("waited-on"), durable=False) is True
    assert store.insert_unless_budgeted(row("named"), durable=False) is True
    store.make_durable("named")
    assert store.insert_unless_budgeted(row("told"), durable=True) is True
    assert store.insert_unless_budgeted(row("unsaved"), durable=False) is True  # after the last durable commit
    _restart(pg)
    store = JobStore(url)
    assert {i: store.job(i) is not None for i in ("waited-on", "named", "told", "unsaved")} == {
        "waited-on": True, "named": True, "told": True, "unsaved": False}
    dispose_all()
