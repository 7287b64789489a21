"""Batch rows: created once (a re-run resumes the batch), read with their counters
and per-tier figures, and the writes to a batch's jobs as a whole (cancel the open
ones, queue the failed ones again), each moving the batch's counters in the same
transaction."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import case, func, select, update

from worker.job.codec import CANCELLED, FAILED, OPEN, QUEUED
from worker.store.engine import Database, dialect_insert, newest_first
from worker.store.jobs import forget_content
from worker.store.schema import attempts, batches, jobs, now


def finished(batch: dict) -> bool:
    """Every job of the batch is final and none remains to be submitted: the one rule
    every reader of a batch goes by (`cascade run`, `cascade status`, the task API)."""
    return batch["done"] >= batch["total"] and not batch.get("submitting")


# the same rule in SQL
FINISHED = (batches.c.done >= batches.c.total) & ~batches.c.submitting


class BatchStore(Database):
    def ensure_batch(self, batch_id: str, portfolio: str, source: str | None, tenant: str = "default", *,
                     submitting: bool = False) -> dict:
        """Create the batch, or return the existing one (a re-run resumes it). A batch
        created `submitting` reads as unfinished from its first instant, until
        `end_submission`; an existing one is not changed (see `begin_submission`)."""
        with self.tx() as c:
            t = now()
            c.execute(dialect_insert(c, batches).values(
                id=batch_id, tenant=tenant, portfolio=portfolio, source=source, total=0, done=0, succeeded=0,
                failed=0, cancelled=0, total_cost=0.0, created_at=t, updated_at=t, webhook_attempts=0,
                submitting=submitting,
            ).on_conflict_do_nothing(index_elements=["id"]))
            return dict(c.execute(select(batches).where(batches.c.id == batch_id)).mappings().one())

    def begin_submission(self, batch_id: str) -> None:
        """Lines are being added to the batch: it does not read as finished meanwhile."""
        with self.tx() as c:
            c.execute(update(batches).where(batches.c.id == batch_id, ~batches.c.submitting)
                      .values(submitting=True, updated_at=now()))

    def end_submission(self, batch_id: str) -> None:
        """Every line of the batch is in (a job, or a failed job naming why)."""
        with self.tx() as c:
            c.execute(update(batches).where(batches.c.id == batch_id, batches.c.submitting)
                      .values(submitting=False, updated_at=now()))

    def drop_if_empty(self, batch_id: str) -> bool:
        """Delete the batch if no job of it was ever written (an upload that failed
        before its first line was in); True if it was."""
        with self.tx() as c:
            any_job = select(jobs.c.id).where(jobs.c.batch_id == batch_id).exists()
            return c.execute(batches.delete().where(batches.c.id == batch_id, batches.c.total == 0,
                                                    ~any_job)).rowcount == 1

    def batch(self, batch_id: str) -> dict | None:
        with self.read() as c:
            r = c.execute(select(batches).where(batches.c.id == batch_id)).mappings().one_or_none()
            return dict(r) if r else None

    def recent_batches(self, limit: int = 20) -> list[dict]:
        with self.read() as c:
            return [dict(r) for r in c.execute(
                select(batches).order_by(batches.c.created_at.desc()).limit(limit)).mappings()]

    def batch_tiers(self, batch_id: str) -> list[dict]:
        """Per tier: calls, accepted, escalated/failed, cost and model time."""
        with self.read() as c:
            q = (select(attempts.c.tier, attempts.c.tier_index, attempts.c.decision,
                        func.count().label("n"), func.sum(attempts.c.cost_usd).label("cost"),
                        func.sum(attempts.c.latency_ms).label("latency_ms"))
                 .select_from(attempts.join(jobs, jobs.c.id == attempts.c.job_id))
                 .where(jobs.c.batch_id == batch_id)
                 .group_by(attempts.c.tier, attempts.c.tier_index, attempts.c.decision))
            return [dict(r) for r in c.execute(q).mappings()]

    def tier_observations(self, batch_id: str) -> list[dict]:
        """Every answered call of the batch (failed calls excluded): tier, decision, signals."""
        with self.read() as c:
            q = (select(attempts.c.tier, attempts.c.decision, attempts.c.signals)
                 .select_from(attempts.join(jobs, jobs.c.id == attempts.c.job_id))
                 .where(jobs.c.batch_id == batch_id, attempts.c.error.is_(None)))
            return [dict(r) for r in c.execute(q).mappings()]

    def cancel_batch(self, batch_id: str, error: str = "cancelled") -> int:
        t = now()
        with self.tx() as c:
            cancel = (update(jobs).where(jobs.c.batch_id == batch_id, jobs.c.status.in_(OPEN))
                      .values(status=CANCELLED, finished_at=t, updated_at=t, error=error))
            if self.keep_content:
                # a count, not the ids: a million-job batch's ids held here took the API past 400 MB
                n = c.execute(cancel).rowcount
            else:
                ids = c.execute(cancel.returning(jobs.c.id)).scalars().all()
                n = len(ids)
                forget_content(c, ids)
            # cancelled: nothing more is to come, though its submitter stopped half-way
            c.execute(update(batches).where(batches.c.id == batch_id).values(
                done=batches.c.done + n, cancelled=batches.c.cancelled + n, submitting=False, updated_at=t))
        return n

    def reopen_failed(self, batch_id: str, match: str | None = None,
                      deadline: datetime | None = None) -> list[tuple[str, str]]:
        """Queue again the batch's failed jobs (whose error contains `match`, if given)
        that never got an answer at the tier they failed at: dead letters, expired
        jobs, internal errors. A job the policy rejected after its last call stays
        failed (running it again would change nothing). Returns (job id, tier)."""
        t = now()
        tried_here = (select(attempts.c.id).where(attempts.c.job_id == jobs.c.id, attempts.c.tier == jobs.c.current_tier)
                      .exists())
        cond = [jobs.c.batch_id == batch_id, jobs.c.status == FAILED, jobs.c.current_tier.is_not(None), ~tried_here]
        if match:
            cond.append(jobs.c.error.contains(match, autoescape=True))
        with self.tx() as c:
            rows = c.execute(update(jobs).where(*cond)
                             .values(status=QUEUED, error=None, deliveries=0, finished_at=None, deadline=deadline,
                                     updated_at=t)
                             .returning(jobs.c.id, jobs.c.current_tier)).all()
            if rows:
                c.execute(update(batches).where(batches.c.id == batch_id).values(
                    done=batches.c.done - len(rows), failed=batches.c.failed - len(rows), updated_at=t))
        return sorted((r.id, r.current_tier) for r in rows)

    def set_request(self, batch_id: str, request: dict[str, Any]) -> None:
        """What an OpenAI Batch request asked for (input file, endpoint, window, metadata)."""
        with self.tx() as c:
            c.execute(update(batches).where(batches.c.id == batch_id).values(request=request))

    def mark_cancelled(self, batch_id: str) -> None:
        """A cancel was asked for (the first time counts): its status reads cancelled, not completed."""
        with self.tx() as c:
            c.execute(update(batches).where(batches.c.id == batch_id, batches.c.cancelled_at.is_(None))
                      .values(cancelled_at=now()))

    def tenant_page(self, tenant: str, *, after: str | None, limit: int) -> list[dict]:
        """The tenant's batches newest first, those after the batch `after` (a cursor)."""
        with self.read() as c:
            return newest_first(c, batches, select(batches).where(batches.c.tenant == tenant), tenant, after, limit)

    def signal_gaps(self, batch_id: str | Sequence[str]) -> dict[str, dict[str, int]]:
        """Per tier: decisions taken on an answer (`decisions`) and those of them taken
        without a signal the policy reads there (`without`: the stage wrote
        meta.missing_signals, worker.queue.stage), over one batch or several."""
        if self.engine.dialect.name == "postgresql":
            lacking = func.jsonb_exists(attempts.c.meta, "missing_signals")
        else:
            lacking = func.json_type(attempts.c.meta, "$.missing_signals").is_not(None)
        q = (select(attempts.c.tier, attempts.c.tier_index, func.count().label("decisions"),
                    func.sum(case((lacking, 1), else_=0)).label("without"))
             .where(attempts.c.error.is_(None)).group_by(attempts.c.tier, attempts.c.tier_index)
             .order_by(attempts.c.tier_index))
        ids = [batch_id] if isinstance(batch_id, str) else list(batch_id)
        q = (q.select_from(attempts.join(jobs, jobs.c.id == attempts.c.job_id))
             .where(jobs.c.batch_id.in_(ids)))
        with self.read() as c:
            return {r.tier: {"decisions": int(r.decisions), "without": int(r.without or 0)} for r in c.execute(q)}

    def batch_count(self) -> int:
        """Batches in the database (the fault drill waits for its submitter's first)."""
        with self.read() as c:
            return c.execute(select(func.count()).select_from(batches)).scalar()
