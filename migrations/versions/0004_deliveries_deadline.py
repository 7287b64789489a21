"""jobs: deliveries (stage runs without a result at the current tier) and deadline

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("deadline", sa.DateTime(timezone=True), nullable=True))
    # the sweeper's expiry scan and `cascade purge` read these
    op.create_index("ix_jobs_status_deadline", "jobs", ["status", "deadline"])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_index("ix_jobs_status_deadline", table_name="jobs")
    op.drop_column("jobs", "deadline")
    op.drop_column("jobs", "deliveries")
