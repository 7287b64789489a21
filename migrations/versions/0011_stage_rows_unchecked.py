"""the stage statements' rows without foreign-key checks on PostgreSQL: attempts.job_id and
model_calls.job_id no longer reference jobs. Each row's check was a query of its own, run
by a trigger, locking the job's row (FOR KEY SHARE). auto_explain put a third of the start
and record statements' time in those triggers, but its per-node timing inflates them; in a
loop of 256-job stages, with this and migration 0012, the start took 11% less time and the
record 6% less (docs/throughput.md, 2026-12-07 evening). The statements write these rows only for jobs they read or update in the
same statement (worker.store.stages), and the purge deletes a job's calls and attempts
itself (worker.store.retention). SQLite (the embedded mode) keeps its constraints.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TABLES = ("attempts", "model_calls")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(f"""
DO $$ DECLARE c text; BEGIN
  FOR c IN SELECT conname FROM pg_constraint
           WHERE conrelid = '{table}'::regclass AND contype = 'f' AND confrelid = 'jobs'::regclass LOOP
    EXECUTE format('ALTER TABLE {table} DROP CONSTRAINT %I', c);
  END LOOP;
END $$""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        # a row whose job is gone (written in the instant its job was purged) would fail the check
        op.execute(f"DELETE FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = t.job_id)")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_job_id_fkey FOREIGN KEY (job_id) "
                   "REFERENCES jobs (id) ON DELETE CASCADE")
