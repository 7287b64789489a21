"""Persistence: the only module that speaks SQL. PostgreSQL (or SQLite in the
embedded mode) is the source of truth; Redis only carries messages.

Idempotency lives here, in the statements themselves:
- one attempt row per (job, tier): `INSERT .. ON CONFLICT DO NOTHING`, so a
  redelivered task cannot record (or charge) the same call twice;
- finalizing is `UPDATE jobs .. WHERE status IN ('queued', 'running')`: only the
  first final write wins, and the batch counters move only when it did;
- job rows are committed before any task naming them is sent.
"""
from __future__ import annotations

import json
import math
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from worker.config.credentials import redact_spec
from worker.job.codec import (
    CANCELLED,
    EXPIRED,
    FAILED,
    FINAL,
    OPEN,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    StageOutcome,
)
from worker.job.storable import clean_text

metadata = MetaData()

_json = JSON().with_variant(postgresql.JSONB(), "postgresql")
_ts = DateTime(timezone=True)

portfolios = Table(
    "portfolios",
    metadata,
    Column("digest", String(32), primary_key=True),
    Column("spec", _json, nullable=False),
    Column("created_at", _ts, nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("tenant", String(200), nullable=False, default="default"),
    Column("portfolio", String(32), ForeignKey("portfolios.digest"), nullable=False),
    Column("source", Text),
    Column("total", Integer, nullable=False, default=0),
    Column("done", Integer, nullable=False, default=0),
    Column("succeeded", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("cancelled", Integer, nullable=False, default=0),
    Column("total_cost", Float(53), nullable=False, default=0.0),
    Column("created_at", _ts, nullable=False),
    Column("updated_at", _ts, nullable=False),
    # task API (worker.service.webhooks): unfinished jobs expire at expires_at; a finished
    # batch's webhook is delivered (state pending -> delivered | failed) with retries
    Column("expires_at", _ts, nullable=True),
    Column("webhook_url", Text, nullable=True),
    Column("webhook_state", String(16), nullable=True),
    Column("webhook_attempts", Integer, nullable=False, default=0),
    Column("webhook_next_at", _ts, nullable=True),
    Index("ix_batches_webhook", "webhook_state", "webhook_next_at"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("tenant", String(200), nullable=False, default="default"),
    Column("batch_id", String(200), ForeignKey("batches.id"), nullable=True),
    Column("item_key", String(200), nullable=True),
    Column("seq", Integer, nullable=False, default=0),
    Column("portfolio", String(32), ForeignKey("portfolios.digest"), nullable=False),
    Column("input", _json, nullable=False),
    Column("plan", _json, nullable=True),
    Column("status", String(16), nullable=False),
    Column("current_tier", String(64), nullable=True),
    Column("final_answer", Text, nullable=True),
    Column("final_tier", String(64), nullable=True),
    Column("total_cost", Float(53), nullable=False, default=0.0),
    Column("error", Text, nullable=True),
    Column("created_at", _ts, nullable=False),
    Column("started_at", _ts, nullable=True),
    Column("finished_at", _ts, nullable=True),
    Column("updated_at", _ts, nullable=False),
    # stage runs at the current tier that ended without recording a result (a crash)
    Column("deliveries", Integer, nullable=False, default=0, server_default="0"),
    Column("deadline", _ts, nullable=True),  # an open job past it expires (fails), never re-sent
    UniqueConstraint("batch_id", "item_key", name="uq_jobs_batch_item"),
    Index("ix_jobs_batch_status", "batch_id", "status"),
    Index("ix_jobs_status_deadline", "status", "deadline"),
    Index("ix_jobs_finished_at", "finished_at"),
    Index("ix_jobs_batch_seq", "batch_id", "seq"),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(200), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("tier", String(64), nullable=False),
    Column("tier_index", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("model", String(200), nullable=False),
    Column("answer", Text, nullable=True),
    Column("signals", _json, nullable=False),
    Column("tokens_in", Integer, nullable=True),
    Column("tokens_out", Integer, nullable=True),
    Column("cost_usd", Float(53), nullable=False, default=0.0),
    Column("latency_ms", Float(53), nullable=True),
    Column("decision", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("meta", _json, nullable=False),
    Column("created_at", _ts, nullable=False),
    UniqueConstraint("job_id", "tier", name="uq_attempts_job_tier"),
)

# graded outcomes (`cascade feedback`): one row per job, a re-grade replaces it
feedback = Table(
    "feedback",
    metadata,
    Column("job_id", String(200), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("correct", Float(53), nullable=False),
    Column("gold", Text, nullable=True),
    Column("tiers", _json, nullable=False),  # tier -> graded correctness of that tier's answer
    Column("source", Text, nullable=True),
    Column("created_at", _ts, nullable=False),
    Column("updated_at", _ts, nullable=False),
)


tenants = Table(
    "tenants",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("budget_usd", Float(53), nullable=True),
    Column("rate_per_min", Integer, nullable=True),
    # moved by a trigger when a job of the tenant becomes final (migration 0003)
    Column("spent_usd", Float(53), nullable=False, default=0.0),
    Column("created_at", _ts, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(200), ForeignKey("tenants.id"), nullable=False),
    Column("hash", String(64), nullable=False),  # sha256 of the whole key; the key itself is never stored
    Column("name", String(200), nullable=True),
    Column("created_at", _ts, nullable=False),
    Column("revoked_at", _ts, nullable=True),
)


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- engine -------------------------------------------------------------------

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _sqlite_connect(dbapi_conn, _record) -> None:
    # Transactions are begun by _sqlite_begin, not by the driver's implicit BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # WAL lets the in-process tier workers read while one writes; busy_timeout
    # makes a writer wait for the lock instead of failing.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the lock up front (BEGIN IMMEDIATE): two in-process writers
    # then queue on busy_timeout instead of failing a lock upgrade mid-transaction.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


def engine_for(url: str) -> Engine:
    with _engines_lock:
        eng = _engines.get(url)
        if eng is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
                event.listen(eng, "connect", _sqlite_connect)
                event.listen(eng, "begin", _sqlite_begin)
            else:
                # no pre-ping round trip per checkout: a dropped connection surfaces as an
                # OperationalError, and the stage task retries the whole (idempotent) stage.
                # No server-side prepared statements (psycopg prepares a statement run 5 times):
                # PostgreSQL then reuses a generic plan, and the one made for a 256-job message
                # hash-joins the whole jobs table for a single job (a stage's statements took
                # 5-7 ms instead of 1 after a 20,000-job batch). A custom plan costs ~0.3 ms;
                # this also works behind PgBouncer's transaction pooling.
                eng = create_engine(url, pool_recycle=1800, pool_size=5, max_overflow=10,
                                    connect_args={"prepare_threshold": None})
            _engines[url] = eng
        return eng


def dispose_all() -> None:
    with _engines_lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()


def _insert(conn: Connection, table: Table):
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


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


# what a finished job's input becomes when content is not kept
ERASED_INPUT = {"erased": True}
_JOB_COLUMNS = [c.name for c in jobs.columns]
_COPY_FROM = 50  # rows; fewer (a single job) go in one plain INSERT, one round trip
_JSON_COLUMNS = {"input", "plan"}


def _copy_jobs(c: Connection, rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Insert job rows through COPY into a temporary table, then one INSERT .. SELECT
    .. ON CONFLICT DO NOTHING: a multi-row INSERT of a thousand jobs spends most of
    its time in the driver re-parsing a statement with 20,000 placeholders."""
    raw = c.connection.driver_connection
    cols = ", ".join(_JOB_COLUMNS)
    with raw.cursor() as cur:
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS jobs_in (LIKE jobs) ON COMMIT DELETE ROWS")
        with cur.copy(f"COPY jobs_in ({cols}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row([json.dumps(r[k]) if k in _JSON_COLUMNS and r[k] is not None else r[k]
                              for k in _JOB_COLUMNS])
        cur.execute(f"INSERT INTO jobs ({cols}) SELECT {cols} FROM jobs_in ORDER BY seq "
                    f"ON CONFLICT DO NOTHING RETURNING id, status")
        got = cur.fetchall()
        cur.execute("TRUNCATE jobs_in")
    return got


class Store:
    def __init__(self, url: str, *, keep_content: bool = True):
        self.url = url
        self.engine = engine_for(url)
        # off: a job's prompt and its tiers' answers are erased in the transaction that
        # finishes it; the final answer stays until its results are collected (erase_answers)
        self.keep_content = keep_content

    def read(self):
        """A connection for reads. On PostgreSQL in autocommit: no BEGIN/ROLLBACK round
        trips around the one or two SELECTs of a stage (each reads committed rows)."""
        if self.engine.dialect.name == "postgresql":
            return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self.engine.connect()

    def on_statement(self, callback) -> None:
        """Call `callback(sql)` before every statement this store sends (the metrics count them)."""
        event.listen(self.engine, "before_cursor_execute",
                     lambda conn, cursor, statement, *rest: callback(statement))

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.read() as c:
            c.execute(text("SELECT 1"))

    def tx(self):
        """A write transaction (committed on success, rolled back on error)."""
        return self.engine.execution_options(write=True).begin()

    # -- portfolios / batches / jobs -------------------------------------------
    def save_portfolio(self, digest: str, spec: dict[str, Any]) -> None:
        """Stored with every credential blanked (worker.config.credentials): a worker calls with
        the portfolio it was started with, never with one read back from here."""
        with self.tx() as c:
            c.execute(_insert(c, portfolios).values(digest=digest, spec=redact_spec(spec), created_at=now())
                      .on_conflict_do_nothing(index_elements=["digest"]))

    def portfolio_spec(self, digest: str) -> dict[str, Any]:
        with self.read() as c:
            spec = c.execute(select(portfolios.c.spec).where(portfolios.c.digest == digest)).scalar_one_or_none()
        if spec is None:
            raise LookupError(f"portfolio {digest} is not in the database")
        return spec

    def ensure_batch(self, batch_id: str, portfolio: str, source: str | None, tenant: str = "default") -> dict:
        """Create the batch, or return the existing one (a re-run resumes it)."""
        with self.tx() as c:
            t = now()
            c.execute(_insert(c, batches).values(
                id=batch_id, tenant=tenant, portfolio=portfolio, source=source, total=0, done=0, succeeded=0,
                failed=0, cancelled=0, total_cost=0.0, created_at=t, updated_at=t, webhook_attempts=0,
            ).on_conflict_do_nothing(index_elements=["id"]))
            return dict(c.execute(select(batches).where(batches.c.id == batch_id)).mappings().one())

    def add_jobs(self, batch_id: str | None, rows: Sequence[dict[str, Any]]) -> int:
        """Insert jobs (skipping ones already there); count new ones into the batch.

        Each row: id, item_key, seq, portfolio, input, plan, status, current_tier,
        and for rows rejected at submission: error (status failed).
        Returns how many rows were new.
        """
        return len(self.insert_jobs(batch_id, rows))

    def insert_jobs(self, batch_id: str | None, rows: Sequence[dict[str, Any]]) -> set[str]:
        """`add_jobs`, returning the ids of the rows that were new."""
        if not rows:
            return set()
        t = now()
        full = []
        for r in rows:
            full.append({
                "tenant": "default", "batch_id": batch_id, "item_key": None, "seq": 0, "plan": None,
                "current_tier": None, "final_answer": None, "final_tier": None, "total_cost": 0.0,
                "error": None, "started_at": None, "finished_at": t if r.get("status") in FINAL else None,
                "created_at": t, "updated_at": t, "deliveries": 0, "deadline": None, **r,
            })
        if batch_id is None and len(full) <= _COPY_FROM and self.engine.dialect.name == "postgresql":
            # jobs of no batch (the interactive path): one INSERT, its own transaction, one round trip
            with self.read() as c:
                ins = _insert(c, jobs).on_conflict_do_nothing().returning(jobs.c.id)
                return {g[0] for g in c.execute(ins, full).all()}
        new: set[str] = set()
        failed = 0
        with self.tx() as c:
            for i in range(0, len(full), 1000):
                part = full[i : i + 1000]
                if c.dialect.name == "postgresql" and len(part) > _COPY_FROM:
                    got = _copy_jobs(c, part)
                else:
                    ins = _insert(c, jobs).on_conflict_do_nothing().returning(jobs.c.id, jobs.c.status)
                    got = c.execute(ins, part).all()
                new.update(g[0] for g in got)
                failed += sum(1 for g in got if g[1] == FAILED)
            if batch_id is not None and new:
                c.execute(update(batches).where(batches.c.id == batch_id).values(
                    total=batches.c.total + len(new), done=batches.c.done + failed,
                    failed=batches.c.failed + failed, updated_at=t))
        return new

    def job_inputs(self, batch_id: str) -> dict[str, tuple[Any, str | None]]:
        """item key -> (stored input, error if it failed at submission) of a batch's jobs."""
        with self.read() as c:
            q = select(jobs.c.item_key, jobs.c.input, jobs.c.status, jobs.c.plan, jobs.c.error).where(
                jobs.c.batch_id == batch_id)
            # a job failed at submission has no plan: its error is what the line was
            return {r.item_key: (r.input, r.error if r.plan is None and r.status == FAILED else None)
                    for r in c.execute(q)}

    def open_jobs(self, batch_id: str, *, idle_before: datetime | None = None) -> list[tuple[str, str]]:
        """(job id, current tier) of the batch's unfinished jobs, in input order;
        with idle_before, only those not updated since then."""
        with self.read() as c:
            q = (select(jobs.c.id, jobs.c.current_tier).where(jobs.c.batch_id == batch_id, jobs.c.status.in_(OPEN))
                 .order_by(jobs.c.seq))
            if idle_before is not None:
                q = q.where(jobs.c.updated_at < idle_before)
            return [(r.id, r.current_tier) for r in c.execute(q)]

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

    def job_ids(self, batch_id: str, item_keys: Sequence[str]) -> dict[str, str]:
        """item key -> job id, for the keys that are jobs of the batch."""
        out: dict[str, str] = {}
        with self.read() as c:
            for i in range(0, len(item_keys), 1000):
                q = select(jobs.c.item_key, jobs.c.id).where(jobs.c.batch_id == batch_id,
                                                            jobs.c.item_key.in_(item_keys[i : i + 1000]))
                out.update({r.item_key: r.id for r in c.execute(q)})
        return out

    def existing_jobs(self, job_ids: Sequence[str]) -> set[str]:
        with self.read() as c:
            got: set[str] = set()
            for i in range(0, len(job_ids), 1000):
                got |= set(c.execute(select(jobs.c.id).where(jobs.c.id.in_(job_ids[i : i + 1000]))).scalars())
            return got

    def record_feedback(self, rows: Sequence[dict[str, Any]]) -> int:
        """Upsert graded outcomes (job_id, correct, gold, tiers, source); a job graded
        again keeps its latest grade. Returns the number of rows written."""
        if not rows:
            return 0
        t = now()
        full = [{"gold": None, "tiers": {}, "source": None, **r, "created_at": t, "updated_at": t} for r in rows]
        with self.tx() as c:
            ins = _insert(c, feedback)
            c.execute(ins.on_conflict_do_update(index_elements=["job_id"], set_={
                "correct": ins.excluded.correct, "gold": ins.excluded.gold, "tiers": ins.excluded.tiers,
                "source": ins.excluded.source, "updated_at": ins.excluded.updated_at}), full)
        return len(full)

    def feedback_of(self, batch_id: str) -> dict[str, dict]:
        """job id -> its feedback row, for the batch's graded jobs."""
        with self.read() as c:
            q = (select(feedback).select_from(feedback.join(jobs, jobs.c.id == feedback.c.job_id))
                 .where(jobs.c.batch_id == batch_id))
            return {r["job_id"]: dict(r) for r in c.execute(q).mappings()}

    def batch_jobs(self, batch_id: str) -> list[dict]:
        with self.read() as c:
            q = select(jobs).where(jobs.c.batch_id == batch_id).order_by(jobs.c.seq)
            return [dict(r) for r in c.execute(q).mappings()]

    def attempts_of(self, job_ids: Sequence[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {j: [] for j in job_ids}
        with self.read() as c:
            for i in range(0, len(job_ids), 1000):
                q = (select(attempts).where(attempts.c.job_id.in_(job_ids[i : i + 1000]))
                     .order_by(attempts.c.job_id, attempts.c.step))
                for r in c.execute(q).mappings():
                    out[r["job_id"]].append(dict(r))
        return out

    def job(self, job_id: str) -> dict | None:
        with self.read() as c:
            r = c.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one_or_none()
            return dict(r) if r else None

    # -- the stage task's reads and writes ------------------------------------
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
            ins = _insert(c, attempts).on_conflict_do_nothing(index_elements=["job_id", "tier"]).returning(attempts.c.job_id)
            inserted = {r.job_id for r in c.execute(ins, [o.attempt_row(t) for o in outcomes]).all()}
            # lock order: job ids sorted, then the batch row, so writers never deadlock
            won = sorted((o for o in outcomes if o.job_id in inserted), key=lambda o: o.job_id)
            moves = [o for o in won if o.decision == "escalate"]
            finals = [o for o in won if o.decision != "escalate"]
            applied = self._guarded(c, moves, t, lambda o: {"b_status": RUNNING, "b_tier": o.next_tier}, _ESCALATE)
            applied += self._guarded(c, finals, t, lambda o: {
                "b_status": SUCCEEDED if o.decision == "accept" else FAILED, "b_answer": clean_text(o.final_answer),
                "b_final": o.final_tier, "b_cost": o.total_cost, "b_error": clean_text(o.error)}, _FINALIZE)
            self._forget_content(c, [o.job_id for o in applied if o.decision != "escalate"])
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
            return self._fail_where(c, jobs.c.id.in_(ids.scalar_subquery()),
EXPIRED)

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
        self._forget_content(c, [r.id for r in rows])
        return [(r.id, r.current_tier) for r in rows]

    def _forget_content(self, c: Connection, job_ids: Sequence[str]) -> None:
        if self.keep_content or not job_ids:
            return
        ids = sorted(job_ids)
        for i in range(0, len(ids), 1000):
            part = ids[i : i + 1000]
            c.execute(update(jobs).where(jobs.c.id.in_(part)).values(input=ERASED_INPUT))
            c.execute(update(attempts).where(attempts.c.job_id.in_(part)).values(answer=None))

    def erase_answers(self, job_ids: Sequence[str]) -> None:
        """Forget finished jobs' final answers (their results were collected)."""
        ids = sorted(job_ids)
        with self.tx() as c:
            for i in range(0, len(ids), 1000):
                c.execute(update(jobs).where(jobs.c.id.in_(ids[i : i + 1000]), jobs.c.status.in_(FINAL))
                          .values(final_answer=None))

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

    def cancel_job(self, job_id: str) -> bool:
        """Cancel one open job (its batch's counters move with it); False if it was final."""
        t = now()
        with self.tx() as c:
            row = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(OPEN))
                            .values(status=CANCELLED, finished_at=t, updated_at=t, error="cancelled")
                            .returning(jobs.c.batch_id)).one_or_none()
            if row is not None and row.batch_id is not None:
                c.execute(update(batches).where(batches.c.id == row.batch_id).values(
                    done=batches.c.done + 1, cancelled=batches.c.cancelled + 1, updated_at=t))
        return row is not None

    def jobs_page(self, batch_id: str, after_seq: int, limit: int) -> list[dict]:
        """The batch's jobs with seq > after_seq, in input order (results stream page by page)."""
        with self.read() as c:
            q = (select(jobs).where(jobs.c.batch_id == batch_id, jobs.c.seq > after_seq)
                 .order_by(jobs.c.seq).limit(limit))
            return [dict(r) for r in c.execute(q).mappings()]

    def cancel_batch(self, batch_id: str, error: str = "cancelled") -> int:
        t = now()
        with self.tx() as c:
            ids = c.execute(update(jobs).where(jobs.c.batch_id == batch_id, jobs.c.status.in_(OPEN))
                            .values(status=CANCELLED, finished_at=t, updated_at=t, error=error)
                            .returning(jobs.c.id)).scalars().all()
            n = len(ids)
            self._forget_content(c, ids)
            if n:
                c.execute(update(batches).where(batches.c.id == batch_id).values(
                    done=batches.c.done + n, cancelled=batches.c.cancelled + n, updated_at=t))
        return n


    # -- retention --------------------------------------------------------------
    def purge(self, before: datetime, *, dry_run: bool = False, chunk: int = 1000) -> dict[str, int]:
        """Delete what finished before `before`: every batch whose jobs are all final
        (with its jobs and attempts), and finished jobs outside any batch. Open work,
        and a batch with any job still open, are never touched. Returns the counts."""
        out = {"batches": 0, "jobs": 0, "attempts": 0}
        open_in_batch = select(jobs.c.id).where(jobs.c.batch_id == batches.c.id, jobs.c.status.in_(OPEN)).exists()
        with self.read() as c:
            done_batches = c.execute(select(batches.c.id).where(
                batches.c.done >= batches.c.total, batches.c.updated_at < before, ~open_in_batch)).scalars().all()
        for batch_id in done_batches:  # one transaction per batch: no long lock
            with self.tx() as c:
                in_batch = select(jobs.c.id).where(jobs.c.batch_id == batch_id)
                if c.execute(select(in_batch.where(jobs.c.status.in_(OPEN)).exists())).scalar():
                    continue  # re-opened meanwhile (a re-run resumed it)
                got = self._delete_jobs(c, in_batch, dry_run)
                if not dry_run:
                    c.execute(batches.delete().where(batches.c.id == batch_id))
            out["batches"] += 1
            out["jobs"] += got[0]
            out["attempts"] += got[1]
        loose = (select(jobs.c.id).where(jobs.c.batch_id.is_(None), jobs.c.status.in_(FINAL),
                                         jobs.c.finished_at < before).order_by(jobs.c.id))
        with self.read() as c:
            loose_ids = c.execute(loose).scalars().all()
        for i in range(0, len(loose_ids), chunk):
            with self.tx() as c:
                got = self._delete_jobs(c, select(jobs.c.id).where(jobs.c.id.in_(loose_ids[i : i + chunk]),
                                                                   jobs.c.status.in_(FINAL)), dry_run)
            out["jobs"] += got[0]
            out["attempts"] += got[1]
        return out

    @staticmethod
    def _delete_jobs(c: Connection, ids, dry_run: bool) -> tuple[int, int]:
        sub = ids.scalar_subquery()
        if dry_run:
            n_jobs = c.execute(select(func.count()).select_from(jobs).where(jobs.c.id.in_(sub))).scalar()
            n_att = c.execute(select(func.count()).select_from(attempts).where(attempts.c.job_id.in_(sub))).scalar()
            return n_jobs, n_att
        n_att = c.execute(attempts.delete().where(attempts.c.job_id.in_(sub))).rowcount
        n_jobs = c.execute(jobs.delete().where(jobs.c.id.in_(sub))).rowcount
        return n_jobs, n_att
    # -- the task API's batch upkeep (worker.service.webhooks) -----------------------------
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
                                              batches.c.done >= batches.c.total).limit(limit))
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

    # -- tenants and API keys (worker.service.tenants) -----------------------------------------
    def upsert_tenant(self, tenant: str, **limits: Any) -> None:
        """Create the tenant if new; set the given limits (budget_usd, rate_per_min; None clears)."""
        with self.tx() as c:
            c.execute(_insert(c, tenants).values(id=tenant, spent_usd=0.0, created_at=now())
                      .on_conflict_do_nothing(index_elements=["id"]))
            if limits:
                c.execute(update(tenants).where(tenants.c.id == tenant).values(**limits))

    def tenant(self, tenant: str) -> dict | None:
        with self.read() as c:
            r = c.execute(select(tenants).where(tenants.c.id == tenant)).mappings().one_or_none()
            return dict(r) if r else None

    def add_key(self, key_id: str, tenant: str, digest: str, name: str | None) -> None:
        with self.tx() as c:
            c.execute(api_keys.insert().values(id=key_id, tenant=tenant, hash=digest, name=name, created_at=now()))

    def key(self, key_id: str) -> dict | None:
        with self.read() as c:
            r = c.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().one_or_none()
            return dict(r) if r else None

    def keys(self, tenant: str | None = None) -> list[dict]:
        with self.read() as c:
            q = select(api_keys.c.id, api_keys.c.tenant, api_keys.c.name, api_keys.c.created_at,
                       api_keys.c.revoked_at).order_by(api_keys.c.tenant, api_keys.c.created_at)
            if tenant is not None:
                q = q.where(api_keys.c.tenant == tenant)
            return [dict(r) for r in c.execute(q).mappings()]

    def revoke_key(self, key_id: str) -> bool:
        with self.tx() as c:
            return c.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                             .values(revoked_at=now())).rowcount == 1
