"""feedback: graded outcomes of jobs, for drift checks and re-tuning on live traffic

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("job_id", sa.String(200), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("correct", sa.Float(53), nullable=False),
        sa.Column("gold", sa.Text, nullable=True),
        # tier name -> graded correctness of that tier's answer, where the grader gave it
        sa.Column("tiers", _json, nullable=False),
        sa.Column("source", sa.Text, nullable=True),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feedback")
