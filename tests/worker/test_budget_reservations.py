"""Budgets per job (issue #23): what a job reserves (its plan's tiers at their prices
and token limits), the admission of a batch's jobs in line order until the budget is
reached, and the reservation made atomically in PostgreSQL: many submitters at once
for one tenant never admit past its budget."""
from __future__ import annotations

import threading

import pytest
from helpers.portfolios import write_portfolio

from router.core.attempt import Query
from router.core.errors import UserError
from router.core.portfolio import Tier, load_portfolio
from router.core.records import load_dataset
from worker.job.codec import FAILED, QUEUED
from worker.job.request import job_input
from worker.models.backends.base import DEFAULT_MAX_TOKENS, Backend
from worker.models.backends.openai import OpenAIBackend
from worker.ops.migrate import upgrade
from worker.queue.admission import Admission, BudgetExhausted, new_job_row
from worker.store.jobs import JobStore
from worker.store.schema import jobs as store_jobs
from worker.store.tenants import TenantStore

MODELS = ["llama3.2-3b", "llama3.1-70b"]


def priced_tier(**options) -> Tier:
    return Tier.model_validate({"name": "p", "backend": {"kind": "openai", "model": "m",
                                                         "base_url": "http://127.0.0.1:9/v1", **options},
                                "price": {"input_per_mtok": 1.0, "output_per_mtok": 10.0, "per_call": 0.5}})


def test_a_priced_call_reserves_its_prompt_bytes_and_its_answer_limit():
    q = Query("q", "héllo", messages=({"role": "user", "content": "héllo"},))
    t = priced_tier()
    # 6 bytes of prompt + what a template adds (16 a message, 64 once); 256 tokens of answer
    assert Backend.max_cost(t, q) == pytest.approx((6 + 16 + 64) / 1e6 + 256 * 10 / 1e6 + 0.5)
    capped = Query("q", "héllo", messages=q.messages, params={"max_tokens": 8})
    assert Backend.max_cost(t, capped) == pytest.approx((6 + 16 + 64) / 1e6 + 8 * 10 / 1e6 + 0.5)
    assert Backend.max_cost(priced_tier(max_tokens=32, system="be brief"), q) == pytest.approx(
        (6 + 8 + 16 + 64) / 1e6 + 32 * 10 / 1e6 + 0.5)


def test_the_default_answer_limit_is_at_least_what_the_openai_backend_asks_for():
    assert OpenAIBackend(priced_tier()).max_tokens <= DEFAULT_MAX_TOKENS


def test_a_replay_job_reserves_its_recorded_cost_at_every_tier_of_its_plan(bench, tmp_path):
    p = load_portfolio(write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3]))
    rec = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")[0]
    row = new_job_row("j", None, 0, p, {**job_input({"prompt": rec.prompt}), "id": "j"})
    assert row["reserved_usd"] == pytest.approx(sum(rec.responses[m].cost_usd for m in MODELS))


def rows(n: int, need: float, tenant: str = "t") -> list[dict]:
    return [{"id": f"j{i}", "seq": i + 1, "status": QUEUED, "tenant": tenant, "reserved_usd": need,
             "plan": {"first": 0}, "current_tier": "t0"} for i in range(n)]


def test_a_batch_is_admitted_in_line_order_until_its_reservations_reach_the_budget():
    tenant = {"budget_usd": 1.0, "spent_usd": 0.25, "reserved_usd": 0.25}
    a = Admission("t")
    out = a(tenant, rows(5, 0.2))
    assert [r["status"] for r in out] == [QUEUED, QUEUED, FAILED, FAILED, FAILED]  # 0.5 left: two jobs
    assert "over budget" in out[2]["error"] and out[2]["error"].startswith("line 3: ")
    assert out[2]["reserved_usd"] == 0 and a.stopped
    # once stopped, a later chunk admits nothing, even a job that would fit
    later = Admission("t", stopped=a.stopped)(tenant, rows(1, 0.01))
    assert later[0]["status"] == FAILED
    # no budget, or no tenant row: everything goes in (no tenant row: nothing reserved)
    assert all(r["status"] == QUEUED for r in Admission("t")({**tenant, "budget_usd": None}, rows(5, 9.0)))
    assert [r["reserved_usd"] for r in Admission("t")(None, rows(2, 9.0))] == [0.0, 0.0]
    with pytest.raises(BudgetExhausted, match="tenant 't' has \\$0.5 of its \\$1 budget left"):
        Admission("t", strict=True)(tenant, rows(1, 0.6))
    assert issubclass(BudgetExhausted, UserError)


@pytest.mark.services
def test_submitters_at_once_never_admit_past_the_budget(pg_url, bench, tmp_path):
    upgrade(pg_url)
    p = load_portfolio(write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3]))
    store = JobStore(pg_url)
    store.save_portfolio(p.digest, p.spec())
    TenantStore(pg_url).upsert_tenant("t", budget_usd=0.001)
    admitted, refused = [], []

    def submit(k: int) -> None:
        for i in range(20):
            row = {"id": f"job-{k}-{i}", "seq": 0, "portfolio": p.digest, "input": {"prompt": "x"},
                   "status": QUEUED, "current_tier": "t0", "tenant": "t", "reserved_usd": 0.0001}
            try:
                store.insert_jobs(None, [row], admit=Admission("t", strict=True))
                admitted.append(row["id"])
            except BudgetExhausted:
                refused.append(row["id"])

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10 and len(refused) == 150
    assert TenantStore(pg_url).tenant("t")["reserved_usd"] == pytest.approx(0.001)
    # a job that finishes releases its reservation; its real cost is spent
    with store.tx() as c:
        c.execute(store_jobs.update().where(store_jobs.c.id == admitted[0])
                  .values(status="succeeded", total_cost=0.00004))
    t = TenantStore(pg_url).tenant("t")
    assert (t["spent_usd"], t["reserved_usd"]) == (pytest.approx(0.00004), pytest.approx(0.0009))


def test_a_callers_key_and_limits_come_in_one_statement_and_a_tenant_without_a_budget_skips_the_lock(
        pg_url, bench, tmp_path):
    from worker.config.settings import Settings
    from worker.service.tenants import AuthError, Tenants

    upgrade(pg_url)
    store, job_store = TenantStore(pg_url), JobStore(pg_url)
    p = load_portfolio(write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3]))
    job_store.save_portfolio(p.digest, p.spec())

    def rows(n: int, need: float, tenant: str) -> list[dict]:
        return [{"id": f"j{i}", "seq": 0, "portfolio": p.digest, "input": {"prompt": "x"}, "status": QUEUED,
                 "current_tier": "t0", "tenant": tenant, "reserved_usd": need} for i in range(n)]

    tenants = Tenants(store, Settings(broker_url=None, database_url=pg_url))
    store.upsert_tenant("free")
    store.upsert_tenant("capped", budget_usd=1.0)
    _, key = tenants.create_key("capped")
    job_store.insert_jobs(None, [{**rows(1, 0.25, "capped")[0], "id": "open-capped"}])
    seen: list[str] = []
    store.on_statement(seen.append)
    tenant, limits = tenants.authenticate_with_limits(key)
    assert tenant == "capped" and len(seen) == 1
    assert limits["budget_usd"] == 1.0 and limits["reserved_usd"] == pytest.approx(0.25)
    assert tenants.admit(tenant, limits) is True and len(seen) == 1  # admitted on what was just read
    with pytest.raises(AuthError):
        tenants.authenticate_with_limits(key[:-1] + ("x" if key[-1] != "x" else "y"))
    seen.clear()
    assert tenants.admit("free") is False and tenants.admit("nobody") is False and len(seen) == 2
    # a tenant read without a budget: its job goes in as one INSERT, no admission lock, no read of its budget
    seen.clear()
    assert job_store.insert_jobs(None, rows(1, 0.5, "free")) == {"j0"}
    assert len(seen) == 1 and seen[0].lstrip().upper().startswith("INSERT")
    # one with a budget: under the lock, its reservations read
    seen.clear()
    job_store.insert_jobs(None, [{**rows(1, 0.5, "capped")[0], "id": "capped-2"}],
                          admit=Admission("capped", strict=True))
    assert any("pg_advisory_xact_lock" in s for s in seen)
    with pytest.raises(BudgetExhausted):
        job_store.insert_jobs(None, [{**rows(1, 0.5, "capped")[0], "id": "capped-3"}],
                              admit=Admission("capped", strict=True))
