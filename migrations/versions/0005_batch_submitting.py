"""batches: submitting (lines of the batch remain to be submitted), so that a batch
whose submitter stopped half-way, or is still reading its input, never reads as
finished; the completion notification waits for it

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_NOTIFY = """
CREATE TRIGGER batches_done_notify AFTER UPDATE OF done, submitting ON batches FOR EACH ROW
  WHEN (NEW.done >= NEW.total AND NOT NEW.submitting AND (OLD.done < OLD.total OR OLD.submitting))
  EXECUTE FUNCTION cascade_batch_done();
"""
_NOTIFY_BEFORE = """
CREATE TRIGGER batches_done_notify AFTER UPDATE OF done ON batches FOR EACH ROW
  WHEN (NEW.done >= NEW.total AND OLD.done < OLD.total)
  EXECUTE FUNCTION cascade_batch_done();
"""


def upgrade() -> None:
    # existing batches were submitted whole (a submitter that crashed left no mark: false)
    op.add_column("batches", sa.Column("submitting", sa.Boolean, nullable=False, server_default=sa.false()))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS batches_done_notify ON batches")
        op.execute(_NOTIFY)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS batches_done_notify ON batches")
        op.execute(_NOTIFY_BEFORE)
    with op.batch_alter_table("batches") as b:
        b.drop_column("submitting")
