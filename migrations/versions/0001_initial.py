"""jobs, attempts, batches, portfolios

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "portfolios",
        sa.Column("digest", sa.String(32), primary_key=True),
        sa.Column("spec", _json, nullable=False),
        sa.Column("created_at", _ts, nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("portfolio", sa.String(32), sa.ForeignKey("portfolios.digest"), nullable=False),
        sa.Column("source", sa.Text),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("succeeded", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("cancelled", sa.Integer, nullable=False),
        sa.Column("total_cost", sa.Float(53), nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("batch_id", sa.String(200), sa.ForeignKey("batches.id"), nullable=True),
        sa.Column("item_key", sa.String(200), nullable=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("portfolio", sa.String(32), sa.ForeignKey("portfolios.digest"), nullable=False),
        sa.Column("input", _json, nullable=False),
        sa.Column("plan", _json, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_tier", sa.String(64), nullable=True),
        sa.Column("final_answer", sa.Text, nullable=True),
        sa.Column("final_tier", sa.String(64), nullable=True),
        sa.Column("total_cost", sa.Float(53), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("started_at", _ts, nullable=True),
        sa.Column("finished_at", _ts, nullable=True),
        sa.Column("updated_at", _ts, nullable=False),
        sa.UniqueConstraint("batch_id", "item_key", name="uq_jobs_batch_item"),
    )
    op.create_index("ix_jobs_batch_status", "jobs", ["batch_id", "status"])
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(200), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tier", sa.String(64), nullable=False),
        sa.Column("tier_index", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("answer", sa.Text, nullable=True),
        sa.Column("signals", _json, nullable=False),
        sa.Column("tokens_in", sa.Integer, nullable=True),
        sa.Column("tokens_out", sa.Integer, nullable=True),
        sa.Column("cost_usd", sa.Float(53), nullable=False),
        sa.Column("latency_ms", sa.Float(53), nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("meta", _json, nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.UniqueConstraint("job_id", "tier", name="uq_attempts_job_tier"),
    )


def downgrade() -> None:
    op.drop_table("attempts")
    op.drop_index("ix_jobs_batch_status", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("batches")
    op.drop_table("portfolios")
