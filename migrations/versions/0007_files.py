"""files (OpenAI's /v1/files): the uploaded file's row and its bytes in chunks, in the
database every API process shares (PostgreSQL; SQLite in the embedded mode); batches:
the OpenAI Batch request a batch was made from (input file, endpoint, window, metadata),
when it was cancelled, and an index for listing a tenant's batches newest first

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("expires_at", _ts, nullable=True),
    )
    op.create_index("ix_files_tenant_created", "files", ["tenant", "created_at"])
    op.create_index("ix_files_expires_at", "files", ["expires_at"])
    op.create_table(
        "file_chunks",
        sa.Column("file_id", sa.String(64), sa.ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.add_column("batches", sa.Column("request", _json, nullable=True))
    op.add_column("batches", sa.Column("cancelled_at", _ts, nullable=True))
    op.create_index("ix_batches_tenant_created", "batches", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_batches_tenant_created", table_name="batches")
    with op.batch_alter_table("batches") as b:
        b.drop_column("cancelled_at")
        b.drop_column("request")
    op.drop_table("file_chunks")
    op.drop_index("ix_files_expires_at", table_name="files")
    op.drop_index("ix_files_tenant_created", table_name="files")
    op.drop_table("files")
