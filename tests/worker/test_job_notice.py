"""An interactive job's completion notice carries the job (migration 0013), so its
waiter need not read it back: on real PostgreSQL the notice's job is the one a read
gives, field for field; a job too long for the payload, or one whose content is erased
as it finishes, is notified by its id alone; the Python client answers from the notice
without a read, and from a read when the notice is bare."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
from helpers.env import private_database

from router.core.attempt import Attempt
from worker.job.codec import StageOutcome
from worker.ops.migrate import upgrade
from worker.service.views import job_view, notice_view
from worker.store.jobs import JobStore
from worker.store.notify import JOB_CHANNEL, Listener
from worker.store.schema import now
from worker.store.stages import StageStore

pytestmark = pytest.mark.services
P = "p" * 32


class Notices:
    """What the listener hands the waiters of some job ids."""

    def __init__(self, listener: Listener, ids):
        self.got: dict[str, list] = {j: [] for j in ids}
        self.seen = threading.Event()
        for j in ids:
            listener.subscribe(JOB_CHANNEL, j, lambda notice, j=j: (self.got[j].append(notice), self.seen.set()))

    def wait(self, n: int) -> None:
        for _ in range(100):
            if sum(len(v) for v in self.got.values()) >= n:
                return
            self.seen.wait(0.1)
            self.seen.clear()
        raise AssertionError(f"fewer than {n} notices: {self.got}")


def _jobs(store: JobStore, ids, prompt="2 + 2?"):
    store.save_portfolio(P, {})
    store.add_jobs(None, [{"id": j, "portfolio": P, "input": {"prompt": prompt, "priority": "interactive",
                                                              "metadata": {"who": "test"}},
                           "status": "queued", "current_tier": "t0", "tenant": "acme",
                           "plan": {"call_bounds": {"t0": 0.01, "t1": 0.02}}} for j in ids])


def _run(stages: StageStore, job_id: str, answers: tuple[str, str], cost=0.001):
    """t0 escalates, t1 accepts: two attempts, the second final."""
    started, _, _ = stages.start_stage("t0", [job_id], "h:1", now())
    low = Attempt("t0", 0, "small", answers[0], {"logprob": -2.5, "p_true": 0.125}, cost, 12.5, 7, None)
    stages.record_stage([StageOutcome(job_id, None, 0, low, "escalate", "unsure", {}, next_tier="t1",
                                      total_cost=cost, call_id=started[0]["call_id"])])
    started, prior, _ = stages.start_stage("t1", [job_id], "h:1", now())
    high = Attempt("t1", 1, "large", answers[1], {"logprob": -0.1}, cost * 10, None, 9, 3)
    stages.record_stage([StageOutcome(job_id, None, 1, high, "accept", "sure", {}, final_answer=answers[1],
                                      final_tier="t1", total_cost=cost * 11, call_id=started[0]["call_id"])])


@contextmanager
def listening(ids, keep_content: bool = True):
    """A migrated private database with jobs `ids` queued at t0, its stores, and the
    notices of those jobs as the listener hands them to waiters."""
    with private_database() as url:
        upgrade(url)
        store, stages = JobStore(url), StageStore(url, keep_content=keep_content)
        _jobs(store, ids)
        listener = Listener(url)
        try:
            yield store, stages, Notices(listener, ids)
        finally:
            listener.close()


def test_the_notice_carries_the_job_a_read_gives_and_a_long_one_only_its_id():
    with listening(["short", "long"]) as (store, stages, notices):
        _run(stages, "short", ("5", "4"), cost=1e-05)
        _run(stages, "long", ("5", "x" * 9000))
        notices.wait(2)
        read = job_view(*store.job_with_attempts("short"))
        assert read["answer"] == "4" and len(read["attempts"]) == 2 and read["attempts"][0]["tokens_out"] is None
        assert notices.got["short"][0]["id"] == "short"
        assert notice_view(notices.got["short"][0]) == ("acme", read)
        assert notices.got["long"] == [None]  # over the payload limit: the id alone, the waiter reads


def test_a_transaction_that_erases_the_content_it_finishes_notifies_ids_only():
    with listening(["kept-out", "failed"], keep_content=False) as (store, stages, notices):
        _run(stages, "kept-out", ("5", "4"))
        stages.fail_open_jobs(["failed"], "given up")
        notices.wait(2)
        assert notices.got == {"kept-out": [None], "failed": [None]}
        assert job_view(*store.job_with_attempts("kept-out"))["attempts"][0]["answer"] is None  # erased


def test_a_notice_without_every_field_gives_no_view():
    assert notice_view(None) is None
    assert notice_view({"id": "j", "tenant": "acme"}) is None


def test_the_client_takes_from_a_notice_only_its_tenants_final_job():
    from worker.service.client import Client

    with listening(["j"]) as (store, stages, notices):
        _run(stages, "j", ("5", "4"))
        notices.wait(1)
        notice = notices.got["j"][0]
        client = Client.__new__(Client)  # from_notice reads nothing: no database, queue or worker needed
        client.tenant = "acme"
        assert client.from_notice("j", notice) == job_view(*store.job_with_attempts("j"))
        assert client.from_notice("other", notice) is None
        assert client.from_notice("j", {**notice, "status": "running"}) is None
        client.tenant = "someone-else"
        assert client.from_notice("j", notice) is None
