"""What a stage does to its jobs: start them (counting the delivery), record what
each tier answered (attempt, escalation or final result, batch counters: one
transaction), note a crash, keep a heartbeat, and fail the jobs that must not
run again (an internal error, a passed deadline); and the sweeper's claim of jobs
whose stage went quiet. On PostgreSQL the start and the record are one statement
each (_START_STAGE, _RECORD_STAGE); elsewhere the same steps one by one.

Every write to a job is guarded (`WHERE status IN ('queued', 'running')`): only
the first final write wins, and the batch counters move only when it did.

Every model call is accounted for (model_calls): a row per call, started with its
estimated cost, is written before the calls are made (by the start statement on
PostgreSQL, at the bound the job's plan holds; else by `begin_calls`, one statement
per delivery), and the record finishes it with the real cost, even when the attempt
itself lost a race and was dropped. A job that becomes final while a call of it is
still started (its worker was killed or cut off) has that call marked lost and its
estimate added to the job's cost; if the call answers later it becomes `late`.

The lease: a stage that starts a job holds it (jobs.lease_holder, lease_until =
now + the lease, `stale_after` seconds), and its worker's heartbeat renews the
lease every sweep. Another delivery of the same stage (a sweeper re-send, a
broker redelivery, a duplicate message) starts the job only if it holds no lease,
the lease has expired, or it is its own: so the model is called a second time only
after the holder went `stale_after` seconds without a heartbeat, which is also when
the sweeper re-sends. The lease ends when the job moves on or its stage crashed."""
from __future__ import annotations

import math
from datetime import datetime
from typing import Sequence

from sqlalchemy import and_, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.engine import Connection

from worker.job.codec import EXPIRED, FAILED, OPEN, RUNNING, SUCCEEDED, StageOutcome
from worker.job.storable import clean_text
from worker.store import jsontext
from worker.store.engine import Database, dialect_insert, no_disk_wait
from worker.store.jobs import bare_notices, forget_content
from worker.store.schema import attempts, batches, jobs, model_calls, now

# (status = .. OR status = ..): an IN list cannot be used with executemany
_OPEN_GUARD = or_(*(jobs.c.status == s for s in OPEN))
_ESCALATE = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_id"), _OPEN_GUARD)
    .values(status=bindparam("b_status"), current_tier=bindparam("b_tier"), updated_at=bindparam("b_t"),
            deliveries=0, error=None, lease_holder=None, lease_until=None)  # a new tier: its own count of deliveries
)
_FINALIZE = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_id"), _OPEN_GUARD)
    .values(status=bindparam("b_status"), final_answer=bindparam("b_answer"), final_tier=bindparam("b_final"),
            total_cost=bindparam("b_cost"), error=bindparam("b_error"), finished_at=bindparam("b_t"),
            updated_at=bindparam("b_t"))
)


# The guards of the stage statements below are written as expressions no index
# serves (`status || ''`, `state || ''`, `coalesce(deadline >= :t, true)`): the planner must then reach a message's jobs
# by primary key and their calls by job. Written plainly, it may instead read every
# open job (the status indexes) or every open call, and it does so whenever the
# statistics are stale, as they are after a bulk insert: every stage of a 20,000-job
# batch read all 20,000 rows until autovacuum analysed the table.
def _open_job(alias: str) -> str:
    return f"({alias}status || '') IN ('queued', 'running')"


def _call_state(alias: str, *states: str) -> str:
    return f"({alias}state || '') IN ({', '.join(repr(s) for s in states)})"


# A stage's start on PostgreSQL, in one statement: the message's jobs and their
# attempts so far, a delivery counted and the lease taken on those a first delivery
# runs, and the record of the call each of those is about to make. The outer SELECT
# reads the snapshot from before the UPDATE (the deliveries as they were). Its commit
# waits for the disk: the calls follow at once, and a record of a call made must
# outlive a database crash (the delivery count alone could do without). The JSON
# columns come as text, decoded by `jsontext.loads`.
_START_STAGE = text("""
WITH started AS (
  UPDATE jobs SET status = 'running', started_at = coalesce(started_at, :t), deliveries = deliveries + 1,
                  updated_at = :t, lease_holder = :holder, lease_until = :until
  WHERE id = ANY(CAST(:ids AS text[]))
    AND """ + _open_job("") + """ AND current_tier = :tier
    AND deliveries = 0 AND coalesce(deadline >= :t, true)
    AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = jobs.id AND a.tier = :tier)
  RETURNING id, plan
), calls AS (  -- the call each started job's stage makes, recorded before it is made, at the plan's bound
  INSERT INTO model_calls (job_id, tier, holder, state, est_cost_usd, started_at)
  SELECT s.id, :tier, :holder, 'started', CAST(s.plan->'call_bounds'->>:tier AS float8), :t
  FROM started s WHERE s.plan->'call_bounds'->>:tier IS NOT NULL
  RETURNING id, job_id)
SELECT j.id, j.batch_id, j.tenant, j.portfolio, CAST(j.input AS text) AS input, CAST(j.plan AS text) AS plan,
       j.status, j.current_tier, j.deliveries, j.deadline, j.error, j.updated_at, s.id IS NOT NULL AS started,
       c.id AS call_id, CAST(coalesce((SELECT jsonb_agg(jsonb_build_object(
                  'tier', a.tier, 'tier_index', a.tier_index, 'step', a.step, 'model', a.model, 'answer', a.answer,
                  'signals', a.signals, 'tokens_in', a.tokens_in, 'tokens_out', a.tokens_out, 'cost_usd', a.cost_usd,
                  'latency_ms', a.latency_ms, 'decision', a.decision, 'error', a.error) ORDER BY a.step)
                 FROM attempts a WHERE a.job_id = j.id), '[]'::jsonb) AS text) AS attempts
FROM jobs j LEFT JOIN started s ON s.id = j.id LEFT JOIN calls c ON c.job_id = j.id
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
         status text, next_tier text, final_answer text, final_tier text, total_cost float8, job_error text,
         call_id bigint, tries int)
), fin AS (  -- the calls made: finished, with their cost, whether or not their attempt is new
  UPDATE model_calls c SET state = CASE WHEN c.state = 'lost' THEN 'late' ELSE 'finished' END, finished_at = :t,
                           cost_usd = x.cost_usd, tries = x.tries
  FROM x WHERE c.id = ANY(CAST(:call_ids AS bigint[])) AND c.id = x.call_id
    AND """ + _call_state("c.", "started", "lost") + """
  RETURNING c.id
), ins AS (
  INSERT INTO attempts (job_id, tier, tier_index, step, model, answer, signals, tokens_in, tokens_out, cost_usd,
                        latency_ms, decision, reason, error, meta, created_at)
  SELECT job_id, tier, tier_index, step, model, answer, signals, tokens_in, tokens_out, cost_usd, latency_ms,
         decision, reason, error, meta, :t FROM x
  WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.id = x.job_id)  -- no foreign key checks it (migration 0011)
  ORDER BY job_id
  ON CONFLICT (job_id, tier) DO NOTHING
  RETURNING job_id
), new AS MATERIALIZED (  -- the new attempts' rows, each with the estimate of its job's calls lost
  SELECT x.*, coalesce((SELECT sum(c.est_cost_usd) FROM model_calls c  -- started and never finished
                        WHERE c.job_id = x.job_id AND """ + _call_state("c.", "started") + """
                          AND c.id IS DISTINCT FROM x.call_id), 0) AS lost_cost
  FROM x JOIN ins ON ins.job_id = x.job_id
), moved AS (
  UPDATE jobs j SET
    status = x.status,
    current_tier = CASE WHEN x.decision = 'escalate' THEN x.next_tier ELSE j.current_tier END,
    deliveries = CASE WHEN x.decision = 'escalate' THEN 0 ELSE j.deliveries END,
    error = CASE WHEN x.decision = 'escalate' THEN NULL ELSE x.job_error END,
    final_answer = CASE WHEN x.decision = 'escalate' THEN j.final_answer ELSE x.final_answer END,
    final_tier = CASE WHEN x.decision = 'escalate' THEN j.final_tier ELSE x.final_tier END,
    total_cost = CASE WHEN x.decision = 'escalate' THEN j.total_cost ELSE x.total_cost + x.lost_cost END,
    finished_at = CASE WHEN x.decision = 'escalate' THEN j.finished_at ELSE :t END,
    updated_at = :t, lease_holder = NULL, lease_until = NULL
  FROM new x, (SELECT set_config('cascade.spend_counted', 'yes', true)) AS spend  -- set before any row moves
  WHERE j.id = x.job_id AND """ + _open_job("j.") + """
  RETURNING j.id, j.batch_id, j.tenant, x.decision, x.total_cost + x.lost_cost AS total_cost, x.call_id
), spent AS (  -- the final jobs' cost, once per tenant; the row trigger stays out (migration 0012)
  UPDATE tenants t SET spent_usd = t.spent_usd + n.cost
  FROM (SELECT tenant, sum(total_cost) AS cost FROM moved WHERE decision <> 'escalate' AND total_cost > 0
        GROUP BY tenant) n
  WHERE t.id = n.tenant
  RETURNING t.id
), lost AS (  -- a final job's calls still started: lost (their estimate is in its cost above)
  UPDATE model_calls c SET state = 'lost'
  FROM moved m WHERE c.job_id = m.id AND m.decision <> 'escalate' AND """ + _call_state("c.", "started") + """
    AND c.id IS DISTINCT FROM m.call_id
  RETURNING c.id
), counted AS (
  UPDATE batches b SET done = b.done + n.done, succeeded = b.succeeded + n.succeeded, failed = b.failed + n.failed,
                       total_cost = b.total_cost + n.cost, updated_at = :t
  FROM (SELECT batch_id, count(*) AS done, count(*) FILTER (WHERE decision = 'accept') AS succeeded,
               count(*) FILTER (WHERE decision <> 'accept') AS failed, sum(total_cost) AS cost
        FROM moved WHERE decision <> 'escalate' AND batch_id IS NOT NULL GROUP BY batch_id) n
  WHERE b.id = n.batch_id
  RETURNING b.id
)
SELECT id, total_cost FROM moved
""")
# A stage whose jobs all escalate commits its record without waiting for the disk: the next
# tier's start commits durably before its call, and that commit writes this one out with it.
# Lost in a crash before that, the jobs are back at this tier, their calls here recorded as
# started (by the durable start): after the lease they are priced in and the tier is called
# again, as after a worker killed mid-call; no result is lost or given twice (a final record,
# which a client reads as soon as it commits, always waits for the disk).
_RECORD_ESCALATIONS = text(no_disk_wait(_RECORD_STAGE.text))

# The calls a delivery is about to make, one row each, in one statement: only for the
# jobs whose lease this holder still has (renewed here): a stage that lost its lease
# while it waited (cut off from the database longer than the lease, another worker
# took the job over) calls nothing.
_BEGIN_CALLS = text("""
WITH held AS (
  UPDATE jobs SET lease_until = :until
  WHERE id = ANY(CAST(:ids AS text[])) AND lease_holder = :holder AND """ + _open_job("") + """
  RETURNING id
), void AS (
  UPDATE model_calls SET state = 'void', finished_at = :t
  WHERE holder = :holder AND """ + _call_state("", "started") + """ AND job_id = ANY(CAST(:ids AS text[]))
    AND NOT (id = ANY(CAST(:known AS bigint[])))
  RETURNING id
)
INSERT INTO model_calls (job_id, tier, holder, state, est_cost_usd, started_at)
SELECT x.job_id, x.tier, :holder, 'started', x.est, :t
FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(job_id text, tier text, est float8) JOIN held ON held.id = x.job_id
RETURNING id, job_id
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

    def start_stage(self, tier: str, job_ids: Sequence[str], holder: str = "", until: datetime | None = None
                    ) -> tuple[list[dict], dict[str, list[dict]], set[str]]:
        """`load_stage`, and `start_delivery` of the jobs a first delivery will run (open,
        waiting at `tier`, never delivered here, not answered here, not past their
        deadline), in one statement on PostgreSQL (its own transaction), each taking the
        lease (`holder` until `until`) and recording the call its stage is about to make
        (model_calls, started at the bound its plan holds: the row's `call_id`): the rows
        show the values from before it (`deliveries` as it was), the set says which started.
        Elsewhere the two steps, the set empty (the stage starts its jobs and records
        their calls itself: `start_delivery`, `begin_calls`)."""
        if self.engine.dialect.name != "postgresql":
            rows, ats = self.load_stage(job_ids)
            return [{**r, "call_id": None} for r in rows], ats, set()
        ids = list(dict.fromkeys(job_ids))
        t = now()
        with self.read() as c:
            got = c.execute(_START_STAGE, {"ids": ids, "tier": tier, "t": t, "holder": holder,
                                           "until": until or t}).mappings().all()
        rows, ats, started = [], {}, set()
        for r in got:
            r = dict(r)
            r["input"], r["plan"] = jsontext.loads(r["input"]), jsontext.loads(r["plan"])
            ats[r["id"]] = jsontext.loads(r.pop("attempts"))
            if r.pop("started"):
                started.add(r["id"])
            rows.append(r)
        order = {j: i for i, j in enumerate(ids)}
        rows.sort(key=lambda r: order[r["id"]])
        return rows, ats, started

    def start_delivery(self, tier: str, job_ids: Sequence[str], holder: str = "", until: datetime | None = None
                       ) -> set[str]:
        """These jobs' stage at `tier` starts: running, one more delivery at their tier
        (reset when they move on), so a job that keeps crashing its stage is counted, and
        the lease taken. Returns the jobs started: not one whose lease another holder
        still has (its stage may be running: it is left to it), nor one no longer waiting
        at `tier` (another delivery recorded it there since this stage read it: it is at
        the next tier, where a lease taken now would hold up that tier's stage and a call
        made now would be a second one)."""
        if not job_ids:
            return set()
        t = now()
        free = or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < t, jobs.c.lease_holder == holder)
        answered = select(attempts.c.job_id).where(attempts.c.job_id == jobs.c.id, attempts.c.tier == tier).exists()
        with self.tx() as c:
            return set(c.execute(
                update(jobs).where(jobs.c.id.in_(sorted(job_ids)), jobs.c.status.in_(OPEN), jobs.c.current_tier == tier,
                                   ~answered, free)
                .values(status=RUNNING, started_at=func.coalesce(jobs.c.started_at, t),
                        deliveries=jobs.c.deliveries + 1, updated_at=t, lease_holder=holder, lease_until=until or t)
                .returning(jobs.c.id)).scalars())

    def begin_calls(self, calls: Sequence[tuple[str, str, float]], holder: str,
                    until: datetime | None = None, known: Sequence[int] = ()) -> dict[str, int]:
        """Record these model calls, (job id, tier, estimated cost), as started, before
        they are made (one statement), for the jobs whose lease `holder` still has (renewed
        to `until`); their row ids by job. A job missing from the answer is held by
        another worker now: its call must not be made.

        `known`: the ids of this holder's started rows that it learned of (a call it may
        have made). Its other started rows of these jobs are records whose reply never
        reached it (the connection was reset after the commit): no call was made for
        them, and they become `void` here instead of being charged as lost calls."""
        if not calls:
            return {}
        t = now()
        until = until or t
        ests = [(j, tier, est if math.isfinite(est) else 0.0) for j, tier, est in calls]
        if self.engine.dialect.name == "postgresql":
            with self.read() as c:  # one statement, its own transaction: no BEGIN/COMMIT trips
                rows = jsontext.dumps([{"job_id": j, "tier": tier, "est": est} for j, tier, est in ests])
                got = c.execute(_BEGIN_CALLS, {"rows": rows, "ids": [j for j, _, _ in ests], "holder": holder,
                                               "until": until, "t": t, "known": list(known)}).all()
            return {r.job_id: r.id for r in got}
        with self.tx() as c:
            c.execute(update(model_calls).where(model_calls.c.holder == holder, model_calls.c.state == "started",
                                                model_calls.c.job_id.in_(sorted({j for j, _, _ in ests})),
                                                model_calls.c.id.not_in(list(known)))
                      .values(state="void", finished_at=t))
            held = self._renew_leases(c, {j for j, _, _ in ests}, holder, until)
            mine = [(j, tier, est) for j, tier, est in ests if j in held]
            if not mine:
                return {}
            got = c.execute(insert(model_calls).returning(model_calls.c.id, model_calls.c.job_id,
                                                          sort_by_parameter_order=True),
                            [{"job_id": j, "tier": tier, "holder": holder, "state": "started", "est_cost_usd": est,
                              "started_at": t} for j, tier, est in mine]).all()
        return {r.job_id: r.id for r in got}

    def keep_calls(self, calls: dict[str, int], holder: str, until: datetime) -> dict[str, int]:
        """Before recorded calls (job id -> call record) are made: the jobs whose lease
        `holder` still has, renewed to `until`, with their records; the records of the
        others become `void` (their lease went to another worker while this one waited:
        their calls must not be made, and were not)."""
        if not calls:
            return {}
        t = now()
        with self.tx() as c:
            held = self._renew_leases(c, calls, holder, until)
            self._void(c, [i for j, i in calls.items() if j not in held], t)
        return {j: i for j, i in calls.items() if j in held}

    def void_calls(self, call_ids: Sequence[int]) -> None:
        """Recorded calls that were never made (their job expired before its call)."""
        if call_ids:
            with self.tx() as c:
                self._void(c, call_ids, now())

    @staticmethod
    def _renew_leases(c: Connection, job_ids, holder: str, until: datetime) -> set[str]:
        """The open jobs among these whose lease `holder` still has, renewed to `until`."""
        return set(c.execute(update(jobs).where(jobs.c.id.in_(sorted(job_ids)), jobs.c.lease_holder == holder,
                                                jobs.c.status.in_(OPEN))
                             .values(lease_until=until).returning(jobs.c.id)).scalars())

    @staticmethod
    def _void(c: Connection, call_ids: Sequence[int], t: datetime) -> None:
        if call_ids:
            c.execute(update(model_calls).where(model_calls.c.id.in_(sorted(call_ids)), model_calls.c.state == "started")
                      .values(state="void", finished_at=t))

    def note_error(self, job_id: str, error: str, holder: str | None = None) -> None:
        """The last error of a still-open job (its stage crashed; it will be tried again),
        and its lease given up, so the stage sent again runs at once."""
        values: dict = {"error": error}
        if holder is not None:
            values.update(lease_holder=None, lease_until=None)
        with self.tx() as c:
            cond = [jobs.c.id == job_id, jobs.c.status.in_(OPEN)]
            if holder is not None:
                cond.append(or_(jobs.c.lease_holder == holder, jobs.c.lease_holder.is_(None)))
            c.execute(update(jobs).where(*cond).values(**values))

    def touch(self, job_ids: Sequence[str], holder: str | None = None, until: datetime | None = None) -> None:
        """A heartbeat: these open jobs are being worked on (the sweeper leaves them be),
        and the leases `holder` has on them last until `until`."""
        if not job_ids:
            return
        t = now()
        values: dict = {"updated_at": t}
        if holder is not None and until is not None:
            values["lease_until"] = case((jobs.c.lease_holder == holder, until), else_=jobs.c.lease_until)
        with self.tx() as c:
            if c.dialect.name == "postgresql":
                c.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")  # a heartbeat, not a result
            c.execute(update(jobs).where(jobs.c.id.in_(sorted(job_ids)), jobs.c.status.in_(OPEN))
                      .values(**values))

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
            if not self.keep_content:
                bare_notices(c)
            self._finish_calls(c, outcomes, t)
            ins = dialect_insert(c, attempts).on_conflict_do_nothing(index_elements=["job_id", "tier"]).returning(attempts.c.job_id)
            inserted = {r.job_id for r in c.execute(ins, [o.attempt_row(t) for o in outcomes]).all()}
            # lock order: job ids sorted, then the batch row, so writers never deadlock
            won = sorted((o for o in outcomes if o.job_id in inserted), key=lambda o: o.job_id)
            moves = [o for o in won if o.decision == "escalate"]
            finals = [o for o in won if o.decision != "escalate"]
            lost = self._lost_calls(c, finals)
            for o in finals:  # a final job's cost includes the estimate of its calls never finished
                o.total_cost += lost.get(o.job_id, 0.0)
            applied = self._guarded(c, moves, t, lambda o: {"b_status": RUNNING, "b_tier": o.next_tier}, _ESCALATE)
            done = self._guarded(c, finals, t, lambda o: {
                "b_status": SUCCEEDED if o.decision == "accept" else FAILED, "b_answer": clean_text(o.final_answer),
                "b_final": o.final_tier, "b_cost": o.total_cost, "b_error": clean_text(o.error)}, _FINALIZE)
            applied += done
            if done:
                c.execute(update(model_calls).where(
                    model_calls.c.job_id.in_([o.job_id for o in done]), model_calls.c.state == "started",
                    model_calls.c.id.notin_([o.call_id for o in done if o.call_id is not None] or [-1]))
                    .values(state="lost"))
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

    @staticmethod
    def _finish_calls(c: Connection, outcomes: Sequence[StageOutcome], t: datetime) -> None:
        rows = [{"b_id": o.call_id, "b_cost": o.attempt.cost_usd if math.isfinite(o.attempt.cost_usd) else None,
                 "b_tries": int(o.meta.get("tries", 1)), "b_t": t} for o in outcomes if o.call_id is not None]
        if rows:
            c.execute(update(model_calls).where(model_calls.c.id == bindparam("b_id"),
                                                or_(model_calls.c.state == "started", model_calls.c.state == "lost"))
                      .values(state=case((model_calls.c.state == "lost", "late"), else_="finished"),
                              finished_at=bindparam("b_t"), cost_usd=bindparam("b_cost"), tries=bindparam("b_tries")),
                      rows)

    @staticmethod
    def _lost_calls(c: Connection, finals: Sequence[StageOutcome]) -> dict[str, float]:
        """The estimated cost, by job, of these jobs' calls started and never finished
        (not the outcomes' own)."""
        if not finals:
            return {}
        own = [o.call_id for o in finals if o.call_id is not None] or [-1]
        return {r.job_id: float(r.est or 0.0) for r in c.execute(
            select(model_calls.c.job_id, func.sum(model_calls.c.est_cost_usd).label("est"))
            .where(model_calls.c.job_id.in_([o.job_id for o in finals]), model_calls.c.state == "started",
                   model_calls.c.id.notin_(own)).group_by(model_calls.c.job_id))}

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
                       job_error=clean_text(o.error) if final else None, call_id=o.call_id,
                       tries=int(o.meta.get("tries", 1)))
            for k in ("cost_usd", "total_cost"):
                if not math.isfinite(row[k]):
                    row[k] = str(row[k]).replace("inf", "Infinity").replace("nan", "NaN")
            rows.append(row)
        with self.read() as c:
            stmt = _RECORD_ESCALATIONS if all(o.decision == "escalate" for o in outcomes) else _RECORD_STAGE
            moved = dict(c.execute(stmt, {"rows": jsontext.dumps(rows), "t": t, "call_ids": [
                r["call_id"] for r in rows if r["call_id"] is not None]}).all())
        for o in outcomes:
            if o.job_id in moved and o.decision != "escalate":
                o.total_cost = moved[o.job_id]  # with the estimate of calls lost on the way
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

    def fail_open_jobs(self, job_ids: Sequence[str], error: str, *, unchanged_since: datetime | None = None) -> int:
        """Fail the still-open ones of these jobs (an internal error): nothing hangs forever.
        `unchanged_since`: only if nothing has written the job since it was read then (its
        `updated_at`): a stage deciding from what it read leaves alone a job another
        delivery has moved on meanwhile."""
        cond = jobs.c.id.in_(sorted(job_ids))
        if unchanged_since is not None:
            cond = and_(cond, jobs.c.updated_at == unchanged_since)
        with self.tx() as c:
            return len(self._fail_where(c, cond, error))

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
        if not self.keep_content:
            bare_notices(c)
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
