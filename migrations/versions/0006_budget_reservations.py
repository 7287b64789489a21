"""budgets enforced per job: a job reserves its maximum cost when it is admitted
(jobs.reserved_usd; worker.queue.admission). What a tenant has reserved is the sum over
its open jobs, read with the tenant's row locked when jobs are admitted; a job that
becomes final stops counting, and its real cost moves into the tenant's spend (the
trigger of migration 0003), so a reservation is released as its job finishes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_OPEN = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("reserved_usd", sa.Float(53), nullable=False, server_default="0"))
    # a tenant's open reservations, summed at admission from this index alone
    op.create_index("ix_jobs_open_tenant", "jobs", ["tenant", "reserved_usd"], postgresql_where=_OPEN,
                    sqlite_where=_OPEN)


def downgrade() -> None:
    op.drop_index("ix_jobs_open_tenant", table_name="jobs")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("reserved_usd")
