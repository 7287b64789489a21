"""Every model call accounted for, and the lease that keeps a re-sent stage from
calling a model a second time (worker.store.stages, worker.queue.stage).

Two Runtimes in this process stand for two worker processes (each its own lease
holder) against a real PostgreSQL and the scripted OpenAI-compatible server: the
stages run as the Celery task runs them (`run_stage`), without a broker; the batch is
submitted by the real submitter (its messages go to a private Redis prefix nobody
consumes)."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from helpers.servers import ScriptedModel
from sqlalchemy import select

from router.core.portfolio import load_portfolio
from worker.job.codec import query_of
from worker.queue.admission import call_bound
from worker.queue.items import Item
from worker.queue.run import run_batch
from worker.queue.runtime import Runtime
from worker.queue.stage import begin_calls, keep_calls, run_stage
from worker.store.schema import jobs, model_calls

pytestmark = pytest.mark.services


def _setup(distributed, tmp_path, server, name: str, stale_after: float, store_content: bool = True):
    settings, _ = distributed
    settings = settings.model_copy(update={"stale_after": stale_after, "backend_breaker_cooldown": 0.0,
                                           "store_content": store_content})
    path = tmp_path / f"{name}.toml"
    path.write_text('[policy]\nname = "threshold"\nsignal = "mean_logprob"\n\n' + "".join(
        f'[[tiers]]\nname = "t{i}"\n' + ("threshold = 10.0\n" if i == 0 else "")  # t0 always escalates
        + f'backend = {{ kind = "openai", base_url = "{server.base_url}", model = "m{i}", max_tokens = 8 }}\n'
          f'price = {{ input_per_mtok = 1, output_per_mtok = 2 }}\n\n' for i in range(2)))
    portfolio = load_portfolio(path)
    items = [Item(f"q{i}", i + 1, {"id": f"q{i}", "prompt": f"question {i} [slow]"}) for i in range(3)]
    run_batch(items, portfolio, settings=settings, batch_id=name, progress=False, wait=False)
    ids = [f"{name}:q{i}" for i in range(3)]
    a, b = Runtime(settings), Runtime(settings)
    for rt, who in ((a, "host-a:1"), (b, "host-b:2")):
        rt.holder = who
        rt.add_portfolio(portfolio)
    return a, b, ids


def _calls(rt: Runtime, ids: list[str]) -> list[dict]:
    with rt.stages.engine.connect() as c:
        return [dict(r) for r in c.execute(select(model_calls).where(model_calls.c.job_id.in_(ids))
                                           .order_by(model_calls.c.id)).mappings()]


def test_a_resent_stage_racing_its_holder_does_not_call_the_model_again(distributed, tmp_path):
    with ScriptedModel(slow=1.5) as server:
        a, b, ids = _setup(distributed, tmp_path, server, "race", stale_after=60)
        first = threading.Thread(target=run_stage, args=(a, "t0", ids))
        first.start()
        deadline = time.monotonic() + 20
        while server.in_flight < len(ids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.in_flight == len(ids), "the holder's calls never started"
        # the sweeper's re-send (or a redelivery) of the same stage, on another worker, mid-call
        assert run_stage(b, "t0", ids) == []
        first.join(30)
        seen = {p: n for (m, p), n in server.seen.items() if m == "m0"}
        assert sorted(seen.values()) == [1, 1, 1], seen  # each job's t0 model called once
        calls = _calls(a, ids)
        assert [(c["tier"], c["holder"], c["state"], c["tries"]) for c in calls] == [("t0", "host-a:1", "finished", 1)] * 3
        assert all(c["est_cost_usd"] > 0 and c["cost_usd"] > 0 for c in calls)
        with a.stages.engine.connect() as c:
            rows = c.execute(select(jobs.c.current_tier, jobs.c.lease_holder).where(jobs.c.id.in_(ids))).all()
        assert rows == [("t1", None)] * 3  # escalated, the lease given back


def test_a_delivery_overtaken_by_its_holders_record_does_not_call_again(distributed, tmp_path, monkeypatch):
    """Seen under connection resets: a duplicate delivery (the broker gives back an
    unacknowledged message when its connection drops) reads the jobs while their holder
    is mid-call, then the holder records them and gives the lease back before the
    duplicate takes it. The duplicate must not take a lease on jobs that have moved on:
    that was a second model call at this tier, and a lease on the next tier's job that
    held its stage up until the lease ran out."""
    with ScriptedModel() as server:
        a, b, ids = _setup(distributed, tmp_path, server, "overtaken", stale_after=60)
        _, _, started = a.stages.start_stage("t0", ids, a.holder, a.lease_until())  # a starts them ...
        assert started == set(ids)
        seen_by_b = b.stages.start_stage("t0", ids, b.holder, b.lease_until())  # ... b's start reads them ...
        assert seen_by_b[2] == set() and [j["deliveries"] for j in seen_by_b[0]] == [1] * len(ids)
        assert len(run_stage(a, "t0", ids)) == len(ids)  # ... a calls and records them: escalated to t1
        assert server.requests == len(ids)
        monkeypatch.setattr(b.stages, "start_stage", lambda *args, **kw: seen_by_b)
        assert run_stage(b, "t0", ids) == []  # b goes on from what it read
        assert server.requests == len(ids), "a job was called twice at t0"
        with a.stages.engine.connect() as c:
            rows = c.execute(select(jobs.c.current_tier, jobs.c.deliveries, jobs.c.lease_holder)
                             .where(jobs.c.id.in_(ids))).all()
        assert rows == [("t1", 0, None)] * len(ids)  # t1's stage finds them free and undelivered


def test_a_dead_letter_verdict_from_a_stale_read_leaves_a_job_that_moved_on(distributed, tmp_path, monkeypatch):
    """The stage judges a job dead (max_deliveries runs, untouched for half a visibility
    timeout) from the row it read; if another delivery records the job in between, the
    verdict is stale and the job goes on, not failed."""
    with ScriptedModel() as server:
        a, b, ids = _setup(distributed, tmp_path, server, "deadstale", stale_after=60)
        old = a.stages.engine  # the jobs as a crashed worker's runs left them: delivered max times, quiet
        with old.begin() as c:
            c.execute(jobs.update().where(jobs.c.id.in_(ids)).values(
                deliveries=a.settings.max_deliveries, updated_at=jobs.c.updated_at - timedelta(hours=1)))
        seen_by_b = b.stages.start_stage("t0", ids, b.holder, b.lease_until())
        assert seen_by_b[2] == set()
        with old.begin() as c:  # meanwhile another delivery answers the first job there: escalated to t1
            c.execute(jobs.update().where(jobs.c.id == ids[0]).values(
                current_tier="t1", deliveries=0, updated_at=jobs.c.updated_at + timedelta(hours=1)))
        monkeypatch.setattr(b.stages, "start_stage", lambda *args, **kw: seen_by_b)
        run_stage(b, "t0", ids)
        with old.connect() as c:
            rows = dict(c.execute(select(jobs.c.id, jobs.c.status).where(jobs.c.id.in_(ids))).all())
        assert rows[ids[0]] != "failed", "a job another delivery moved on was failed as a dead letter"
        assert [rows[i] for i in ids[1:]] == ["failed"] * (len(ids) - 1)  # the others were dead indeed
        assert server.requests == 0


@pytest.mark.parametrize("store_content", [True, False])  # the record in one statement, and step by step
def test_a_holder_that_went_silent_leaves_its_calls_started_and_priced(distributed, tmp_path, store_content):
    """A worker killed -9 (or cut off) after it recorded its calls as started: the calls
    stay known; nobody calls again while its lease holds; after it expires the re-sent
    stage runs, and the job's cost carries the lost calls' estimate."""
    with ScriptedModel(slow=0.0) as server:
        a, b, ids = _setup(distributed, tmp_path, server, "silent", stale_after=2, store_content=store_content)
        # what the killed worker did before dying: it started the stage, which recorded its calls
        jobs_, _, started = a.stages.start_stage("t0", ids, a.holder, a.lease_until())
        assert started == set(ids)
        lost = {c["job_id"]: c["est_cost_usd"] for c in _calls(a, ids)}
        assert {j["id"]: j["call_id"] for j in jobs_} == {c["job_id"]: c["id"] for c in _calls(a, ids)}
        assert set(lost) == set(ids) and all(v > 0 for v in lost.values())
        portfolio = a.portfolio(jobs_[0]["portfolio"])
        tier = portfolio.tier("t0")  # at the bound the budget reserves for that call
        assert lost == {j["id"]: pytest.approx(call_bound(tier, query_of(j["id"], j["input"]))) for j in jobs_}

        assert run_stage(b, "t0", ids) == []  # the lease holds: nothing called
        assert server.requests == 0
        time.sleep(2.2)  # the holder silent for `stale_after`: its lease expired
        sent = run_stage(b, "t0", ids)
        assert sorted(j for j, *_ in sent) == sorted(ids)  # called once each, escalated to t1
        for job_id in ids:  # the last tier (threshold at its default) finishes them
            run_stage(b, "t1", [job_id])
        calls = _calls(a, ids)
        states = sorted((c["holder"], c["tier"], c["state"]) for c in calls)
        assert states == sorted([("host-a:1", "t0", "lost")] * 3 + [("host-b:2", "t0", "finished")] * 3
                                + [("host-b:2", "t1", "finished")] * 3)
        with a.stages.engine.connect() as c:
            rows = dict(c.execute(select(jobs.c.id, jobs.c.total_cost).where(jobs.c.id.in_(ids))).all())
        for job_id in ids:
            made = sum(c["cost_usd"] for c in calls if c["job_id"] == job_id and c["state"] == "finished")
            assert rows[job_id] == pytest.approx(made + lost[job_id], rel=1e-9)


def test_a_stage_that_lost_its_lease_while_it_waited_calls_nothing(distributed, tmp_path):
    """A worker started the stage (recording its calls), then waited (cut off from the
    database longer than its lease: the start's answer came late); another worker took
    the jobs over and called them. When the first gets through again, the check of its
    lease before the calls finds it gone: it calls nothing, and its records are void, not
    charged (seen in the network drill: both workers called the jobs)."""
    with ScriptedModel(slow=0.0) as server:
        a, b, ids = _setup(distributed, tmp_path, server, "lapsed", stale_after=2)
        jobs_, _, started = a.stages.start_stage("t0", ids, a.holder, a.lease_until())
        assert started == set(ids)
        mine = {j["id"]: j["call_id"] for j in jobs_}
        time.sleep(2.2)  # a's lease expired while it waited
        sent = run_stage(b, "t0", ids)  # the re-sent stage on another worker
        assert len(sent) == len(ids) and server.requests == len(ids)
        assert keep_calls(a, mine) == {}
        portfolio = a.portfolio(jobs_[0]["portfolio"])
        assert begin_calls(a, "t0", [(j, query_of(j["id"], j["input"]), portfolio) for j in jobs_]) == {}
        assert server.requests == len(ids)
        states = sorted((c["holder"], c["state"]) for c in _calls(a, ids))
        assert states == [("host-a:1", "void")] * len(ids) + [("host-b:2", "finished")] * len(ids)


def test_a_start_answered_late_checks_the_lease_before_calling(distributed, tmp_path, monkeypatch):
    """The stage itself: when the start's answer took half a lease or more, the lease is
    checked again before any call; a lease another worker took meanwhile means no call."""
    with ScriptedModel(slow=0.0) as server:
        a, b, ids = _setup(distributed, tmp_path, server, "late", stale_after=2)
        start = a.stages.start_stage

        def late_start(*args, **kw):
            got = start(*args, **kw)
            time.sleep(2.2)  # the answer on its way while the lease expires ...
            b.stages.start_delivery("t0", ids, b.holder, b.lease_until())  # ... and another worker takes the jobs
            return got

        monkeypatch.setattr(a.stages, "start_stage", late_start)
        assert run_stage(a, "t0", ids) == []
        assert server.requests == 0
        assert [c["state"] for c in _calls(a, ids)] == ["void"] * len(ids)


def test_a_call_record_whose_reply_was_lost_is_voided_not_charged(distributed, tmp_path):
    """The start record committed but its reply never reached the worker (a reset): the
    stage tried again and made one call with a new record. The first record was never
    a call: it becomes `void` when the same holder records again, and its estimate is
    not in the job's cost."""
    with ScriptedModel() as server:
        a, _, ids = _setup(distributed, tmp_path, server, "void", stale_after=60)
        job = a.stages.load_stage(ids[:1])[0][0]
        # the start (and its record of the call) made, its answer lost on the way back: the
        # runtime never learns the record's id
        a.stages.start_stage("t0", [job["id"]], holder=a.holder, until=a.lease_until())
        query = query_of(job["id"], job["input"])
        [phantom] = [c for c in _calls(a, [job["id"]]) if c["state"] == "started"]
        # a call it learned of stays started (it may have been made) when it records again
        got = begin_calls(a, "t0", [(job, query, a.portfolio(job["portfolio"]))])
        assert a.known_calls() == [got[job["id"]]]
        rows = {c["id"]: c["state"] for c in _calls(a, [job["id"]])}
        assert rows == {phantom["id"]: "void", got[job["id"]]: "started"}
        again = begin_calls(a, "t0", [(job, query, a.portfolio(job["portfolio"]))])
        rows = {c["id"]: c["state"] for c in _calls(a, [job["id"]])}
        assert rows == {phantom["id"]: "void", got[job["id"]]: "started", again[job["id"]]: "started"}
        # a voided record is no call: never lost, never in a cost
        with a.stages.engine.connect() as c:
            assert c.execute(select(model_calls.c.state).where(model_calls.c.id == phantom["id"])).scalar() == "void"
