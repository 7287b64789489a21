"""Batch upkeep in the HTTP service: expire batches past their completion window, and
deliver the completion webhook of finished ones.

Webhook: one POST per finished batch, body {"id": event id, "type": "batch.completed",
"created", "data": the batch as GET /v1/batches/{id} shows it}, headers
`Cascade-Event-Id` (the same id on every retry: a receiver deduplicates by it) and
`Cascade-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with
CASCADE_WEBHOOK_SECRET>`. A non-2xx answer or no answer is retried with doubling
backoff (CASCADE_WEBHOOK_BACKOFF, up to CASCADE_WEBHOOK_ATTEMPTS tries). Each due
delivery is leased by one guarded UPDATE, so several API processes never send the
same attempt twice. The loop reads the batches table every `interval` seconds (one
indexed query).

Expiry: when a batch's completion window ends, its unfinished jobs are cancelled
with the error "expired", so no worker or sweeper sends them again.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import timedelta

import httpx
import structlog

from worker.service.views import batch_view
from worker.store.batches import BatchStore
from worker.store.schema import now
from worker.store.webhooks import WebhookStore

log = structlog.get_logger("cascade.webhooks")
EXPIRED = "expired: the batch's completion window ended"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def event_id(batch_id: str) -> str:
    return f"evt_{hashlib.sha256(batch_id.encode()).hexdigest()[:24]}"


class BatchUpkeep:
    def __init__(self, webhooks: WebhookStore, batches: BatchStore, *, secret: str, backoff: float, attempts: int,
                 interval: float = 0.5, timeout: float = 10.0):
        self.webhooks, self.batches, self.secret = webhooks, batches, secret
        self.backoff, self.attempts, self.interval, self.timeout = backoff, attempts, interval, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cascade-upkeep", daemon=True)
        self._http = httpx.Client(timeout=timeout)

    def start(self) -> "BatchUpkeep":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)
        self._http.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as e:  # the database away for a moment: try again next tick
                log.warning("upkeep.error", error=f"{type(e).__name__}: {e}")

    def tick(self) -> None:
        for batch_id in self.webhooks.expired_batches(now()):
            n = self.batches.cancel_batch(batch_id, error=EXPIRED)
            log.info("batch.expired", batch=batch_id, jobs=n)
        for b in self.webhooks.claim_webhooks(now(), lease_s=self.timeout + 5):
            self.deliver(b)

    def deliver(self, b: dict) -> bool:
        body = json.dumps({"id": event_id(b["id"]), "type": "batch.completed", "created": int(time.time()),
                           "data": batch_view(b, self.batches.batch_tiers(b["id"]))}).encode()
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "Cascade-Event-Id": event_id(b["id"]),
                   "Cascade-Signature": signature(self.secret, ts, body)}
        tries = b["webhook_attempts"] + 1
        try:
            ok = self._http.post(b["webhook_url"], content=body, headers=headers).is_success
        except httpx.HTTPError as e:
            log.warning("webhook.error", batch=b["id"], error=str(e), attempt=tries)
            ok = False
        if ok:
            self.webhooks.webhook_result(b["id"], state="delivered", attempts=tries, next_at=None)
        elif tries >= self.attempts:
            self.webhooks.webhook_result(b["id"], state="failed", attempts=tries, next_at=None)
        else:
            wait = self.backoff * 2 ** (tries - 1)
            self.webhooks.webhook_result(b["id"], state="pending", attempts=tries, next_at=now() + timedelta(seconds=wait))
        return ok
