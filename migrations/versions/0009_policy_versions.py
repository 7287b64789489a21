"""policy versions: a portfolio's policy re-tuned on live traffic (`cascade retune`),
stored as a candidate, compared in shadow, promoted or rolled back
(`cascade policy ...`). Version 1 is the portfolio file's own policy; a row for it is
written with the first stored candidate. At most one version of a portfolio is
promoted (a partial unique index); submitters plan new jobs with it (at most a
second after a promotion) and each job keeps the version that planned it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_ts = sa.DateTime(timezone=True)
_PROMOTED = sa.text("state = 'promoted'")


def upgrade() -> None:
    op.create_table(
        "policy_versions",
        sa.Column("portfolio", sa.String(32), sa.ForeignKey("portfolios.digest"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("policy", _json, nullable=False),  # {"name", "params", "fitted"?}
        sa.Column("source", sa.String(32), nullable=False),  # portfolio | retune | manual
        sa.Column("state", sa.String(16), nullable=False),  # candidate | promoted | retired
        sa.Column("info", _json, nullable=True),  # what the retune saw (rows, labels, spend), the last shadow report
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("promoted_at", _ts, nullable=True),
        # the version it replaced when last promoted: where a rollback returns
        sa.Column("replaced", sa.Integer, nullable=True),
    )
    op.create_index("ux_policy_versions_promoted", "policy_versions", ["portfolio"], unique=True,
                    postgresql_where=_PROMOTED, sqlite_where=_PROMOTED)


def downgrade() -> None:
    op.drop_index("ux_policy_versions_promoted", table_name="policy_versions")
    op.drop_table("policy_versions")
