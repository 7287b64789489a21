"""What a stage does to its jobs: start them (counting the delivery), record what
each tier answered (attempt, escalation or final result, batch counters: one
transaction), note a crash, keep a heartbeat, and fail the jobs that must not
run again (an internal error, a passed deadline); and the sweeper's claim of jobs
whose stage went quiet. On PostgreSQL the start and the record are one statement
each (_START_STAGE, _RECORD_STAGE); elsewhere the same steps one by one.

Every write to a job is guarded (`WHERE status IN ('queued', 'running')`): only
the first final write wins, and the batch counters move only when it did."""
from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Sequence

from sqlalchemy import bindparam, func, or_, select, text, update
from sqlalchemy.engine import Connection

from worker.job.codec import EXPIRED, FAILED, OPEN, RUNNING, SUCCEEDED, StageOutcome
from worker.job.storable import clean_text
from worker.store.engine import Database, dialect_insert
from worker.store.jobs import forget_content
from worker.store.schema import attempts, batches, jobs, now

# (status = .. OR status = ..): an IN list cannot be used with executemany
_OPEN_GUARD = or_(*(jobs.c.status == s for s in OPEN))
_ESCALATE = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_id"), _OPEN_GUARD)
    .values(status=bindparam("b_status"), current_tier=bindparam("b_tier"), updated_at=bindparam("b_t"),
            deliveries=0, error=None)  # a new tier: its own count of deliveries
)
_FINALIZE = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_id"), _OPEN_GUARD)
    .values(status=bindparam("b_status"), final_answer=bindparam("b_answer"), final_tier=bindparam("b_final"),
            total_cost=bindparam("b_cost"), error=bindparam("b_error"), finished_at=bindparam("b_t"),
            updated_at=bindparam("b_t"))
)


# A stage's start on PostgreSQL, in one statement: the message's jobs and their
# attempts so far, and a delivery counted on those a first delivery runs. The outer
# SELECT reads the snapshot from before the UPDATE (the deliveries as they were).
# Its commit does not wait for the disk (synchronous_commit off for this statement's
# transaction, as the heartbeat's): a count lost to a database crash costs at most one
# more delivery before a dead letter, and a flush per stage start costs milliseconds.
_START_STAGE = text("""
WITH started AS (
  UPDATE jobs SET status = 'running', started_at = coalesce(started_at, :t), deliveries = deliveries + 1,
                  updated_at = :t
  WHERE (SELECT set_config('synchronous_commit', 'off', true)) = 'off' AND id = ANY(CAST(:ids AS text[])) AND status IN ('queued', 'running') AND current_tier = :tier
    AND deliveries = 0 AND (deadline IS NULL OR deadline >= :t)
    AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = jobs.id AND a.tier = :tier)
  RETURNING id)
SELECT j.id, j.batch_id, j.tenant, j.portfolio, j.input, j.plan, j.status, j.current_tier, j.deliveries, j.deadline,
       j.error, j.updated_at, s.id IS NOT NULL AS started,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                  'tier', a.tier, 'tier_index', a.tier_index, 'step', a.step, 'model', a.model, 'answer', a.answer,
                  'signals', a.signals, 'tokens_in', a.tokens_in, 'tokens_out', a.tokens_out, 'cost_usd', a.cost_usd,
                  'latency_ms', a.latency_ms, 'decision', a.decision, 'error', a.error) ORDER BY a.step)
                 FROM attempts a WHERE a.job_id = j.id), '[]'::jsonb) AS attempts
FROM jobs j LEFT JOIN started s ON s.id = j.id
WHERE j.id = ANY(CAST(:ids AS text[]))
""")

# A stage's results on PostgreSQL, in one statement (its own transaction): the
# attempts (one per job and tier: a duplicate's is dropped), each new one's job
# escalated or finalized if still open, and the batches' counters moved by the jobs
# that became final. The rows travel as one JSON array (a non-finite float as its
# text, "NaN" or "Infinity", which float8 reads back).
_RECORD_STAGE = text("""
WITH x AS (
  SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb))
    AS x(job_id text, tier text, tier_index int, step int, model text, answer text, signals jsonb, tokens_in int,
         tokens_out int, cost_usd float8, latency_ms float8, decision text, reason text, error text, meta jsonb,
         status text, next_tier text, final_answer text, final_tier text, total_cost float8, job_error text)
), ins AS (
  INSERT INTO attempts (job_id, tier, tier_index, step, model, answer, signals, tokens_in, tokens_out, cost_usd,
                        latency_ms, decision, reason, error, meta, created_at)
  SELECT job_id, tier, tier_index, step, model, answer, signals, tokens_in, tokens_out, cost_usd, latency_ms,
         decision, reason, error, meta, :t FROM x ORDER BY job_id
  ON CONFLICT (job_id, tier) DO NOTHING
  RETURNING job_id
), moved AS (
  UPDATE jobs j SET
    status = x.status,
    current_tier = CASE WHEN x.decision = 'escalate' THEN x.next_tier ELSE j.current_tier END,
    deliveries = CASE WHEN x.decision = 'escalate' THEN 0 ELSE j.deliveries END,
    error = CASE WHEN x.decision = 'escalate' THEN NULL ELSE x.job_error END,
    final_answer = CASE WHEN x.decision = 'escalate' THEN j.final_answer ELSE x.final_answer END,
    final_tier = CASE WHEN x.decision = 'escalate' THEN j.final_tier ELSE x.final_tier END,
    total_cost = CASE WHEN x.decision = 'escalate' THEN j.total_cost ELSE x.total_cost END,
    finished_at = CASE WHEN x.decision = 'escalate' THEN j.finished_at ELSE :t END,
    updated_at = :t
  FROM (SELECT x.* FROM x JOIN ins ON ins.job_id = x.job_id) AS x  -- the new attempts' jobs, found by their key
  WHERE j.id = x.job_id AND j.status IN ('queued', 'running')
  RETURNING j.id, j.batch_id, x.decision, x.total_cost
), counted AS (
  UPDATE batches b SET done = b.done + n.done, succeeded = b.succeeded + n.succeeded, failed = b.failed + n.failed,
                       total_cost = b.total_cost + n.cost, updated_at = :t
  FROM (SELECT batch_id, count(*) AS done, count(*) FILTER (WHERE decision = 'accept') AS succeeded,
               count(*) FILTER (WHERE decision <> 'accept') AS failed, sum(total_cost) AS cost
        FROM moved WHERE decision <> 'escalate' AND batch_id IS NOT NULL GROUP BY batch_id) n
  WHERE b.id = n.batch_id
  RETURNING b.id
)
SELECT id FROM moved
""")


class StageStore(Database):
    def load_stage(self, job_ids: Sequence[str]) -> tuple[list[dict], dict[str, list[dict]]]:
        """The jobs of one stage message and their attempts so far (call order)."""
        with self.read() as c:
            rows = [dict(r) for r in c.execute(
                select(jobs.c.id, jobs.c.batch_id, jobs.c.tenant, jobs.c.portfolio, jobs.c.input, jobs.c.plan,
                       jobs.c.status, jobs.c.current_tier, jobs.c.deliveries, jobs.c.deadline, jobs.c.error,
                       jobs.c.updated_at)
                .where(jobs.c.id.in_(list(job_ids)))).mappings()]
            ats: dict[str, list[dict]] = {r["id"]: [] for r in rows}
            if rows:
                for a in c.execute(select(attempts).where(attempts.c.job_id.in_(list(ats)))
                                   .order_by(attempts.c.job_id, attempts.c.step)).mappings():
                    ats[a["job_id"]].append(dict(a))
        order = {j: i for i, j in enumerate(job_ids)}
        rows.sort(key=lambda r: order[r["id"]])
        return rows, ats

    def start_stage(self, tier: str, job_ids: Sequence[str]) -> tuple[list[dict], dict[str, list[dict]], set[str]]:
        """`load_stage`, and `start_delivery` of the jobs a first delivery will run (open,
        waiting at `tier`, never delivered here, not answered here, not past their
        deadline), in one statement on PostgreSQL (its own transaction): the rows show
        the values from before it (`deliveries` as it was), the set says which started.
        Elsewhere the two steps, the set empty (the stage starts its jobs itself)."""
        if self.engine.dialect.name != "postgresql":
            rows, ats = self.load_stage(job_ids)
            return rows, ats, set()
        ids = list(dict.fromkeys(job_ids))
        with self.read() as c:
            got = c.execute(_START_STAGE, {"ids": ids, "tier": tier, "t": now()}).mappings().all()
        rows, ats, started = [], {}, set()
        for r in got:
            r = dict(r)
            ats[r["id"]] = r.pop("attempts")
            if r.pop("started"):
                started.add(r["id"])
            rows.append(r)
        order = {j: i for i, j in enumerate(ids)}
        rows.sort(key=lambda r: order[r["id"]])
        return rows, ats, started

    def start_delivery(self, job_ids: Sequence[str]) -> None:
        """These jobs' stage starts: running, and one more delivery at their tier
        (reset when they move on), so a job that keeps crashing its stage is counted."""
        if not job_ids:
            return
        t = now()
        with self.tx() as c:
            c.execute(update(jobs).where(jobs.c.id.in_(list(job_ids)), jobs.c.status.in_(OPEN))
                      .values(status=RUNNING, started_at=func.coalesce(jobs.c.started_at, t),
                              deliveries=jobs.c.deliveries + 1, updated_at=t))

    def note_error(self, job_id: str, error: str) -> None:
        """The last error of a still-open job (its stage crashed; it will be tried again)."""
        with self.tx() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(OPEN)).values(error=error))

    def touch(self, job_ids: Sequence[str]) -> None:
        """A heartbeat: these open jobs are being worked on (the sweeper leaves them be)."""
        if not job_ids:
            return
        t = now()
        with self.tx() as c:
            if c.dialect.name == "postgresql":
                c.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")  # a heartbeat, not a result
            c.execute(update(jobs).where(jobs.c.id.in_(sorted(job_ids)), jobs.c.status.in_(OPEN))
                      .values(updated_at=t))

    def record_stage(self, outcomes: Sequence[StageOutcome]) -> list[StageOutcome]:
        """Write one stage's attempts and their consequences in one transaction.

        Returns the outcomes that took effect. An outcome whose (job, tier)
        attempt already existed (a duplicate delivery that raced this one) is
        dropped: the first writer's row and decision stand. A job that became
        final meanwhile (cancelled) keeps its state.
        """
        if not outcomes:
            return []
        t = now()
        if self.engine.dialect.name == "postgresql" and self.keep_content:
            return self._record_stage_at_once(outcomes, t)
        with self.tx() as c:
            ins = dialect_insert(c, attempts).on_conflict_do_nothing(index_elements=["job_id", "tier"]).returning(attempts.c.job_id)
            inserted = {r.job_id for r in c.execute(ins, [o.attempt_row(t) for o in outcomes]).all()}
            # lock order: job ids sorted, then the batch row, so writers never deadlock
            won = sorted((o for o in outcomes if o.job_id in inserted), key=lambda o: o.job_id)
            moves = [o for o in won if o.decision == "escalate"]
            finals = [o for o in won if o.decision != "escalate"]
            applied = self._guarded(c, moves, t, lambda o: {"b_status": RUNNING, "b_tier": o.next_tier}, _ESCALATE)
            applied += self._guarded(c, finals, t, lambda o: {
                "b_status": SUCCEEDED if o.decision == "accept" else FAILED, "b_answer": clean_text(o.final_answer),
                "b_final": o.final_tier, "b_cost": o.total_cost, "b_error": clean_text(o.error)}, _FINALIZE)
            if not self.keep_content:
                forget_content(c, [o.job_id for o in applied if o.decision != "escalate"])
            counters: dict[str, dict[str, float]] = {}
            for o in applied:
                if o.decision == "escalate" or o.batch_id is None:
                    continue
                k = counters.setdefault(o.batch_id, {"done": 0, SUCCEEDED: 0, FAILED: 0, "cost": 0.0})
                k["done"] += 1
                k[SUCCEEDED if o.decision == "accept" else FAILED] += 1
                k["cost"] += o.total_cost
            for batch_id, k in sorted(counters.items()):
                c.execute(update(batches).where(batches.c.id == batch_id).values(
                    done=batches.c.done + k["done"], succeeded=batches.c.succeeded + k[SUCCEEDED],
                    failed=batches.c.failed + k[FAILED], total_cost=batches.c.total_cost + k["cost"],
                    updated_at=t))
        return applied

    def _record_stage_at_once(self, outcomes: Sequence[StageOutcome], t: datetime) -> list[StageOutcome]:
        """record_stage on PostgreSQL: one statement, one round trip (_RECORD_STAGE)."""
        rows = []
        for o in outcomes:
            row = o.attempt_row(t)
            del row["created_at"]
            final = o.decision != "escalate"
            row.update(status=RUNNING if not final else SUCCEEDED if o.decision == "accept" else FAILED,
                       next_tier=o.next_tier, final_answer=clean_text(o.final_answer) if final else None,
                       final_tier=o.final_tier, total_cost=o.total_cost,
                       job_error=clean_text(o.error) if final else None)
            for k in ("cost_usd", "total_cost"):
                if not math.isfinite(row[k]):
                    row[k] = str(row[k]).replace("inf", "Infinity").replace("nan", "NaN")
            rows.append(row)
        with self.read() as c:
            moved = set(c.execute(_RECORD_STAGE, {"rows": json.dumps(rows), "t": t}).scalars())
        return [o for o in outcomes if o.job_id in moved]

    @staticmethod
    def _guarded(c: Connection, outs: list[StageOutcome], t: datetime, params, stmt) -> list[StageOutcome]:
        """One executemany of a guarded UPDATE; which rows took effect, from the row count
        (all of them, the usual case) or, when some did not, from the stamp it wrote."""
        if not outs:
            return []
        res = c.execute(stmt, [{"b_id": o.job_id, "b_t": t, **params(o)} for o in outs])
        if res.rowcount == len(outs):
            return list(outs)
        stamped = set(c.execute(select(jobs.c.id).where(jobs.c.id.in_([o.job_id for o in outs]),
                                                        jobs.c.updated_at == t)).scalars())
        return [o for o in outs if o.job_id in stamped]

    def fail_open_jobs(self, job_ids: Sequence[str], error: str) -> int:
        """Fail the still-open ones of these jobs (an internal error): nothing hangs forever."""
        with self.tx() as c:
            return len(self._fail_where(c, jobs.c.id.in_(sorted(job_ids)), error))

    def expire_overdue(self, at: datetime | None = None, limit: int = 1000) -> list[tuple[str, str | None]]:
        """Fail the open jobs whose deadline has passed (never re-sent again); their
        (id, tier where they waited)."""
        at = at or now()
        with self.tx() as c:
            ids = (select(jobs.c.id).where(jobs.c.status.in_(OPEN), jobs.c.deadline < at)
                   .order_by(jobs.c.id).limit(limit))
            return self._fail_where(c, jobs.c.id.in_(ids.scalar_subquery()), EXPIRED)

    def _fail_where(self, c: Connection, cond, error: str) -> list[tuple[str, str | None]]:
        t = now()
        rows = c.execute(update(jobs).where(cond, jobs.c.status.in_(OPEN))
                         .values(status=FAILED, error=clean_text(error), finished_at=t, updated_at=t)
                         .returning(jobs.c.id, jobs.c.batch_id, jobs.c.current_tier)).all()
        per_batch: dict[str, int] = {}
        for r in rows:
            if r.batch_id is not None:
                per_batch[r.batch_id] = per_batch.get(r.batch_id, 0) + 1
        for batch_id, n in sorted(per_batch.items()):
            c.execute(update(batches).where(batches.c.id == batch_id).values(
                done=batches.c.done + n, failed=batches.c.failed + n, updated_at=t))
        if not self.keep_content:
            forget_content(c, [r.id for r in rows])
        return [(r.id, r.current_tier) for r in rows]

    def claim_stale(self, tier: str, idle_before: datetime, limit: int = 1000) -> list[tuple[str, str]]:
        """Open jobs waiting at `tier` not updated since `idle_before`, stamped now so
        that one sweeper (of however many) re-sends each, once per idle period.
        Returns (job id, portfolio digest)."""
        t = now()
        with self.tx() as c:
            ids = select(jobs.c.id).where(jobs.c.current_tier == tier, jobs.c.status.in_(OPEN),
                                          jobs.c.updated_at < idle_before).order_by(jobs.c.updated_at).limit(limit)
            rows = c.execute(update(jobs).where(jobs.c.id.in_(ids.scalar_subquery()), jobs.c.status.in_(OPEN),
                                                jobs.c.updated_at < idle_before)
                             .values(updated_at=t).returning(jobs.c.id, jobs.c.portfolio)).all()
        return [(r.id, r.portfolio) for r in rows]
