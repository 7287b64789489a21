"""every model call accounted for: model_calls (a row per call, written as started with
its estimated cost before the call and finished after), and a lease on the job
(jobs.lease_holder, jobs.lease_until) so a re-sent stage does not call the model again
while the stage that holds the job may still be running (worker.store.stages).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_OPEN = sa.text("state IN ('started', 'lost')")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_holder", sa.String(200), nullable=True))
    op.add_column("jobs", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "model_calls",
        sa.Column("id", sa.Integer().with_variant(sa.BigInteger(), "postgresql"), primary_key=True,
                  autoincrement=True),
        sa.Column("job_id", sa.String(200), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tier", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("est_cost_usd", sa.Float(53), nullable=False),
        sa.Column("cost_usd", sa.Float(53), nullable=True),
        sa.Column("tries", sa.Integer, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_model_calls_job", "model_calls", ["job_id"])
    op.create_index("ix_model_calls_open", "model_calls", ["state"], postgresql_where=_OPEN, sqlite_where=_OPEN)


def downgrade() -> None:
    op.drop_index("ix_model_calls_open", table_name="model_calls")
    op.drop_index("ix_model_calls_job", table_name="model_calls")
    op.drop_table("model_calls")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("lease_until")
        b.drop_column("lease_holder")
