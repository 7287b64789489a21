"""The task API's batch upkeep (worker.service.webhooks): a batch's completion
window and webhook, the batches past their window, and the webhook deliveries due,
each leased by one guarded UPDATE so that several API processes never send the
same attempt twice."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from worker.store.batches import FINISHED
from worker.store.engine import Database
from worker.store.schema import batches, now


class WebhookStore(Database):
    def set_batch_options(self, batch_id: str, *, expires_at: datetime | None, webhook_url: str | None) -> None:
        with self.tx() as c:
            c.execute(update(batches).where(batches.c.id == batch_id).values(
                expires_at=expires_at, webhook_url=webhook_url, webhook_state="pending" if webhook_url else None,
                webhook_next_at=now() if webhook_url else None))

    def expired_batches(self, at: datetime) -> list[str]:
        with self.read() as c:
            return list(c.execute(select(batches.c.id).where(batches.c.expires_at < at,
                                                             batches.c.done < batches.c.total)).scalars())

    def claim_webhooks(self, at: datetime, lease_s: float, limit: int = 20) -> list[dict]:
        """Finished batches whose webhook is due, each leased to this caller for lease_s
        (another API process skips it meanwhile)."""
        with self.tx() as c:
            due = (select(batches.c.id).where(batches.c.webhook_state == "pending", batches.c.webhook_next_at <= at,
                                              FINISHED).limit(limit))
            rows = c.execute(update(batches).where(batches.c.id.in_(due.scalar_subquery()),
                                                   batches.c.webhook_state == "pending",
                                                   batches.c.webhook_next_at <= at)
                             .values(webhook_next_at=at + timedelta(seconds=lease_s))
                             .returning(*batches.c)).mappings().all()
        return [dict(r) for r in rows]

    def webhook_result(self, batch_id: str, *, state: str, attempts: int, next_at: datetime | None) -> None:
        with self.tx() as c:
            c.execute(update(batches).where(batches.c.id == batch_id).values(
                webhook_state=state, webhook_attempts=attempts, webhook_next_at=next_at))
