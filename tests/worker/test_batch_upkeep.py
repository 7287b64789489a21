"""Batch upkeep (worker.service.webhooks) on the embedded database, with no workers: a batch
past its completion window has its unfinished jobs expired, never to be sent again."""
from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from helpers.portfolios import write_portfolio

from worker.client import Client
from worker.config.settings import Settings
from worker.service.webhooks import EXPIRED, BatchUpkeep, signature
from worker.store.schema import now
from worker.store.stages import StageStore
from worker.store.webhooks import WebhookStore


def test_expired_batch_jobs_are_cancelled_and_not_resent(bench, tmp_path):
    path = write_portfolio(tmp_path / "p.toml", bench, ["llama3.2-3b", "llama3.1-70b"], [-0.3])
    with Client(Settings(home=tmp_path / "home"), portfolio=path, workers=False) as c:
        batch_id = c.submit_batch([{"id": f"q{i}", "prompt": f"question {i}"} for i in range(5)])
        later = c.submit_batch([{"id": "r", "prompt": "later"}])
        webhooks = WebhookStore(c.settings.db_url)
        webhooks.set_batch_options(batch_id, expires_at=now() - timedelta(seconds=1), webhook_url=None)
        webhooks.set_batch_options(later, expires_at=now() + timedelta(hours=1), webhook_url=None)
        upkeep = BatchUpkeep(webhooks, c.batches, secret="k", backoff=1, attempts=1)
        upkeep.tick()
        b = c.batch(batch_id)
        assert b["status"] == "cancelled" and b["counts"]["cancelled"] == 5 and b["counts"]["open"] == 0
        assert {j["error"] for j in c.results(batch_id)} == {EXPIRED}
        assert c.batch(later)["counts"]["open"] == 1  # not yet due
        # the sweeper's claim finds nothing of the expired batch to send again
        assert [j for j, _ in StageStore(c.settings.db_url).claim_stale("t0", now() + timedelta(seconds=1)) if j.startswith(batch_id)] == []


def test_signature_is_an_hmac_of_timestamp_and_body():
    assert signature("k", 10, b"{}") == "t=10,v1=" + hmac.new(b"k", b"10.{}", hashlib.sha256).hexdigest()
