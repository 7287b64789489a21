"""a tenant's spend moved once per stage record, not once per job: the record statement
adds its final jobs' cost per tenant in one UPDATE (worker.store.stages) and says so in a
setting local to its transaction (cascade.spend_counted), which the row trigger's WHEN
reads to stay out. The row trigger stays for every other way a job becomes final
(cancel, expiry, a failed stage, SQLite). Each of its UPDATEs of one tenant's row in one
statement made a new version of the row, and each next one walked the versions made
before it: a 256-job record paid for some 33,000 (with auto_explain: a quarter of the
record statement's time).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_FINAL = """NEW.total_cost > 0 AND NEW.status IN ('succeeded', 'failed', 'cancelled')
        AND OLD.status IN ('queued', 'running')"""


def _trigger(when: str) -> str:
    return f"""
DROP TRIGGER IF EXISTS jobs_tenant_spend ON jobs;
CREATE TRIGGER jobs_tenant_spend AFTER UPDATE OF status ON jobs FOR EACH ROW
  WHEN ({when})
  EXECUTE FUNCTION cascade_tenant_spend();
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_trigger(_FINAL + "\n        AND current_setting('cascade.spend_counted', true) IS DISTINCT FROM 'yes'"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_trigger(_FINAL))
