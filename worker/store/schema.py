"""The tables, as SQLAlchemy declares them for every module of the store (and for
Alembic's autogenerate, migrations/env.py); the migrations in migrations/versions
create them. `now()` is the one clock every stored timestamp is read from."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects import postgresql

metadata = MetaData()

_json = JSON().with_variant(postgresql.JSONB(), "postgresql")
_OPEN_SQL = "status IN ('queued', 'running')"
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
    # lines of the batch remain to be submitted (its submitter is at work, or stopped
    # half-way): never finished until it is false (migration 0005)
    Column("submitting", Boolean, nullable=False, default=False, server_default=false()),
    # OpenAI's Batch API (migration 0007): how a batch made from an uploaded file was asked
    # for ({input_file_id, endpoint, completion_window, metadata}; null for other batches),
    # and when it was cancelled (its status reads cancelling/cancelled, not completed)
    Column("request", _json, nullable=True),
    Column("cancelled_at", _ts, nullable=True),
    Index("ix_batches_webhook", "webhook_state", "webhook_next_at"),
    Index("ix_batches_tenant_created", "tenant", "created_at"),
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
    # the most it can cost, reserved against its tenant's budget while it is open (migration 0006)
    Column("reserved_usd", Float(53), nullable=False, default=0.0, server_default="0"),
    # the worker process whose stage holds the job at its current tier, until lease_until
    # (renewed by its heartbeat): a re-sent stage leaves a held job alone (migration 0008)
    Column("lease_holder", String(200), nullable=True),
    Column("lease_until", _ts, nullable=True),
    UniqueConstraint("batch_id", "item_key", name="uq_jobs_batch_item"),
    Index("ix_jobs_batch_status", "batch_id", "status"),
    Index("ix_jobs_status_deadline", "status", "deadline"),
    Index("ix_jobs_finished_at", "finished_at"),
    Index("ix_jobs_batch_seq", "batch_id", "seq"),
    Index("ix_jobs_open_tenant", "tenant", "reserved_usd", postgresql_where=text(_OPEN_SQL),
          sqlite_where=text(_OPEN_SQL)),
    # room on each page: an escalation's update stays on its page, its indexes untouched (migration 0010)
    postgresql_with={"fillfactor": 70},
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # no foreign key on PostgreSQL (migration 0011): the record statement writes an attempt
    # only for a job that exists, and the purge deletes a job's attempts itself
    Column("job_id", String(200), nullable=False),
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

# every model call of a stage, recorded as started (with its estimated cost: the tier's
# bound for the query) before it is made and finished after, so a call whose worker was
# killed or cut off is known and priced, never invisible (migration 0008). state:
# started -> finished; or started -> lost (the job became final without it: its estimate
# is in the job's cost) -> late (it answered after all).
model_calls = Table(
    "model_calls",
    metadata,
    Column("id", Integer().with_variant(BigInteger(), "postgresql"), primary_key=True, autoincrement=True),
    # no foreign key on PostgreSQL (migration 0011): a call is written only for a job its
    # statement updates, and the purge deletes a job's calls itself
    Column("job_id", String(200), nullable=False),
    Column("tier", String(64), nullable=False),
    Column("holder", String(200), nullable=False),
    Column("state", String(16), nullable=False),
    Column("est_cost_usd", Float(53), nullable=False, default=0.0),
    Column("cost_usd", Float(53), nullable=True),
    Column("tries", Integer, nullable=True),
    Column("started_at", _ts, nullable=False),
    Column("finished_at", _ts, nullable=True),
    Index("ix_model_calls_job", "job_id"),  # the only one: a call is reached by its id or its job (migration 0010)
    postgresql_with={"fillfactor": 75},  # room on each page: a call finished in place (migration 0010)
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

# a portfolio's policy versions (migration 0009): version 1 is the portfolio file's own
# policy; `cascade retune` adds candidates, `cascade policy promote` switches the one
# workers use (at most one promoted per portfolio)
policy_versions = Table(
    "policy_versions",
    metadata,
    Column("portfolio", String(32), ForeignKey("portfolios.digest"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("policy", _json, nullable=False),
    Column("source", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("info", _json, nullable=True),
    Column("created_at", _ts, nullable=False),
    Column("promoted_at", _ts, nullable=True),
    Column("replaced", Integer, nullable=True),  # the version it replaced when last promoted (rollback's target)
    Index("ux_policy_versions_promoted", "portfolio", unique=True, postgresql_where=text("state = 'promoted'"),
          sqlite_where=text("state = 'promoted'")),
)


tenants = Table(
    "tenants",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("budget_usd", Float(53), nullable=True),
    Column("rate_per_min", Integer, nullable=True),
    # moved by a trigger when a job of the tenant becomes final (migration 0003); what it has
    # reserved is the sum of its open jobs' jobs.reserved_usd (worker.queue.admission)
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


# files uploaded through /v1/files (migration 0007): the row, and the bytes in chunks of
# at most worker.store.files.CHUNK, so that no reader or writer holds a whole file
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("status", String(16), nullable=False),  # uploading -> processed (only those are read)
    Column("created_at", _ts, nullable=False),
    Column("expires_at", _ts, nullable=True),
    Index("ix_files_tenant_created", "tenant", "created_at"),
    Index("ix_files_expires_at", "expires_at"),
)

file_chunks = Table(
    "file_chunks",
    metadata,
    Column("file_id", String(64), ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)


def now() -> datetime:
    return datetime.now(timezone.utc)
