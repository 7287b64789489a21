"""A stage's rows on PostgreSQL carry no foreign-key check (migration 0011: a third of the
stage statements' time): the statements themselves write an attempt or a call only for a
job that exists, and a job's stage run twice still records once."""
from __future__ import annotations

import pytest
from helpers.env import private_database
from sqlalchemy import func, select, text

from router.core.attempt import Attempt
from worker.job.codec import StageOutcome
from worker.ops.migrate import upgrade
from worker.store.jobs import JobStore
from worker.store.schema import attempts, jobs, model_calls, now
from worker.store.stages import StageStore

pytestmark = pytest.mark.services


def _outcome(job_id: str, call_id: int | None) -> StageOutcome:
    return StageOutcome(job_id, None, 0, Attempt("t0", 0, "m", "4", {"p": 0.9}, 0.001, 5.0), "accept", "sure",
                        {}, final_answer="4", final_tier="t0", total_cost=0.001, call_id=call_id)


def test_stage_rows_are_written_only_for_jobs_that_exist():
    with private_database() as url:
        upgrade(url)
        store, stages = JobStore(url), StageStore(url)
        with store.engine.connect() as c:
            fks = c.execute(text("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND "
                                 "conrelid IN ('attempts'::regclass, 'model_calls'::regclass)")).scalar()
        assert fks == 0
        store.save_portfolio("p" * 32, {})
        store.add_jobs(None, [{"id": j, "portfolio": "p" * 32, "input": {"prompt": "2 + 2?"}, "status": "queued",
                               "current_tier": "t0", "plan": {"call_bounds": {"t0": 0.01}}} for j in ("kept", "gone")])
        started, _, _ = stages.start_stage("t0", ["kept", "gone"], "h:1", now())
        calls = {j["id"]: j["call_id"] for j in started}
        assert all(calls.values())  # each started job's call recorded before it is made
        with store.engine.begin() as c:  # a purge takes one job in the middle of its stage
            c.execute(model_calls.delete().where(model_calls.c.job_id == "gone"))
            c.execute(jobs.delete().where(jobs.c.id == "gone"))
        recorded = stages.record_stage([_outcome("kept", calls["kept"]), _outcome("gone", calls["gone"])])
        assert [o.job_id for o in recorded] == ["kept"]
        assert stages.record_stage([_outcome("kept", calls["kept"])]) == []  # a duplicate records nothing
        with store.engine.connect() as c:
            assert c.execute(select(attempts.c.job_id)).scalars().all() == ["kept"]
            assert c.execute(select(func.count()).select_from(model_calls)).scalar() == 1
        assert store.job("kept")["status"] == "succeeded"


def test_a_record_moves_each_tenants_spend_once_and_other_paths_still_count():
    from worker.store.tenants import TenantStore

    with private_database() as url:
        upgrade(url)
        store, stages, tenants = JobStore(url), StageStore(url), TenantStore(url)
        store.save_portfolio("p" * 32, {})
        for t in ("a", "b"):
            tenants.upsert_tenant(t, budget_usd=10.0)
        ids = {"a1": "a", "a2": "a", "b1": "b", "b2": "b", "b3": "b"}
        store.add_jobs(None, [{"id": j, "portfolio": "p" * 32, "input": {"prompt": "?"}, "status": "queued",
                               "current_tier": "t0", "tenant": t} for j, t in ids.items()])
        stages.start_stage("t0", list(ids), "h:1", now())
        costs = {"a1": 0.25, "a2": 0.5, "b1": 1.0, "b2": 0.0, "b3": 2.0}
        outs = [StageOutcome(j, None, 0, Attempt("t0", 0, "m", "4", {}, c, 5.0), "accept", "sure", {},
                             final_answer="4", final_tier="t0", total_cost=c) for j, c in costs.items()]
        outs[-1] = StageOutcome("b3", None, 0, Attempt("t0", 0, "m", "4", {}, 2.0, 5.0), "escalate", "unsure", {},
                                next_tier="t1", total_cost=2.0)  # not final: nothing spent yet
        assert len(stages.record_stage(outs)) == 5
        assert tenants.tenant("a")["spent_usd"] == pytest.approx(0.75)
        assert tenants.tenant("b")["spent_usd"] == pytest.approx(1.0)
        # the setting that kept the row trigger out ended with the record's transaction: a job
        # finished another way, on the same pooled connection, is counted by the trigger
        for _ in range(3):
            with store.engine.begin() as c:
                c.execute(jobs.update().where(jobs.c.id == "b3").values(status="cancelled", total_cost=2.0))
        assert tenants.tenant("b")["spent_usd"] == pytest.approx(3.0)
