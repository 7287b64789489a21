"""task API: job and batch completion notifications (PostgreSQL LISTEN/NOTIFY), batch pages,
batch expiry and webhooks, tenants (budgets, rate limits) and their API keys (hashed)

A job that is not part of a batch notifies `cascade_job_final` with its id when it
becomes final; a batch notifies `cascade_batch_done` with its id when its last job
does. Waiters (worker.store.notify) LISTEN instead of polling. Batch jobs do not notify
one by one: a million-item batch would queue a million notifications.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_FUNCTIONS = """
CREATE OR REPLACE FUNCTION cascade_job_final() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('cascade_job_final', NEW.id);
  RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION cascade_tenant_spend() RETURNS trigger AS $$
BEGIN
  UPDATE tenants SET spent_usd = spent_usd + NEW.total_cost WHERE id = NEW.tenant;
  RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION cascade_batch_done() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('cascade_batch_done', NEW.id);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""
_TRIGGERS = """
CREATE TRIGGER jobs_final_notify AFTER UPDATE OF status ON jobs FOR EACH ROW
  WHEN (NEW.batch_id IS NULL AND NEW.status IN ('succeeded', 'failed', 'cancelled')
        AND OLD.status IN ('queued', 'running'))
  EXECUTE FUNCTION cascade_job_final();
CREATE TRIGGER jobs_tenant_spend AFTER UPDATE OF status ON jobs FOR EACH ROW
  WHEN (NEW.total_cost > 0 AND NEW.status IN ('succeeded', 'failed', 'cancelled')
        AND OLD.status IN ('queued', 'running'))
  EXECUTE FUNCTION cascade_tenant_spend();
CREATE TRIGGER batches_done_notify AFTER UPDATE OF done ON batches FOR EACH ROW
  WHEN (NEW.done >= NEW.total AND OLD.done < OLD.total)
  EXECUTE FUNCTION cascade_batch_done();
"""

# a tenant's spend moves when one of its jobs becomes final (the budget check reads it)
_SQLITE_SPEND = """
CREATE TRIGGER jobs_tenant_spend AFTER UPDATE OF status ON jobs FOR EACH ROW
  WHEN NEW.total_cost > 0 AND NEW.status IN ('succeeded', 'failed', 'cancelled')
       AND OLD.status IN ('queued', 'running')
BEGIN
  UPDATE tenants SET spent_usd = spent_usd + NEW.total_cost WHERE id = NEW.tenant;
END;
"""


def upgrade() -> None:
    # batch results stream in input order, a page at a time
    op.create_index("ix_jobs_batch_seq", "jobs", ["batch_id", "seq"])
    ts = sa.DateTime(timezone=True)
    with op.batch_alter_table("batches") as b:
        b.add_column(sa.Column("expires_at", ts, nullable=True))
        b.add_column(sa.Column("webhook_url", sa.Text, nullable=True))
        b.add_column(sa.Column("webhook_state", sa.String(16), nullable=True))
        b.add_column(sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default="0"))
        b.add_column(sa.Column("webhook_next_at", ts, nullable=True))
    op.create_index("ix_batches_webhook", "batches", ["webhook_state", "webhook_next_at"])
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("budget_usd", sa.Float(53), nullable=True),
        sa.Column("rate_per_min", sa.Integer, nullable=True),
        sa.Column("spent_usd", sa.Float(53), nullable=False, server_default="0"),
        sa.Column("created_at", ts, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(200), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("revoked_at", ts, nullable=True),
    )
    if op.get_bind().dialect.name != "postgresql":
        op.execute(_SQLITE_SPEND)
        return  # the embedded mode (SQLite) waits by short polling
    op.execute(_FUNCTIONS)
    op.execute(_TRIGGERS)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS jobs_tenant_spend" + (" ON jobs" if op.get_bind().dialect.name == "postgresql" else ""))
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_index("ix_jobs_batch_seq", "jobs")
    op.drop_index("ix_batches_webhook", "batches")
    with op.batch_alter_table("batches") as b:
        for col in ("expires_at", "webhook_url", "webhook_state", "webhook_attempts", "webhook_next_at"):
            b.drop_column(col)
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_final_notify ON jobs")
    op.execute("DROP TRIGGER IF EXISTS batches_done_notify ON batches")
    op.execute("DROP FUNCTION IF EXISTS cascade_job_final()")
    op.execute("DROP FUNCTION IF EXISTS cascade_batch_done()")
    op.execute("DROP FUNCTION IF EXISTS cascade_tenant_spend()")
