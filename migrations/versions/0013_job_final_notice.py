"""an interactive job's completion notice carries the job as its waiter shows it (status,
answer, cost, attempts), so the waiter need not read it back: one round trip fewer for
every chat completion and `Client.run`. A notice whose job does not fit PostgreSQL's
payload limit (8,000 bytes: long answers) carries the id alone, as before, and the
waiter reads the job; so does every notice of a transaction that erases the content it
finishes (CASCADE_STORE_CONTENT=false: `cascade.notice_bare`, set by
worker.store.jobs.bare_notices), whose answers must not travel after they are erased. The payload is built when the job becomes final, in the
statement that made it so (its attempts included: AFTER triggers see that statement's
rows), and is sent at commit, like any notice: it is committed data.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08
"""
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# the limit is 8,000 bytes: a margin for the channel name and the message around it
PAYLOAD_MAX = 7900

_NOTICE = f"""
CREATE OR REPLACE FUNCTION cascade_job_final() RETURNS trigger AS $$
DECLARE
  p text;
BEGIN
  IF current_setting('cascade.notice_bare', true) IS NOT DISTINCT FROM 'yes' THEN
    PERFORM pg_notify('cascade_job_final', NEW.id);
    RETURN NULL;
  END IF;
  p := json_build_object(
    'id', NEW.id, 'tenant', NEW.tenant, 'status', NEW.status, 'final_answer', NEW.final_answer,
    'final_tier', NEW.final_tier, 'total_cost', NEW.total_cost, 'error', NEW.error, 'batch_id', NEW.batch_id,
    'item_key', NEW.item_key, 'priority', NEW.input->'priority', 'metadata', NEW.input->'metadata',
    'current_tier', NEW.current_tier, 'created_at', NEW.created_at, 'finished_at', NEW.finished_at,
    'attempts', coalesce((SELECT json_agg(json_build_object(
        'tier', a.tier, 'model', a.model, 'answer', a.answer, 'signals', a.signals, 'decision', a.decision,
        'reason', a.reason, 'error', a.error, 'cost_usd', a.cost_usd, 'latency_ms', a.latency_ms,
        'tokens_in', a.tokens_in, 'tokens_out', a.tokens_out) ORDER BY a.step)
      FROM attempts a WHERE a.job_id = NEW.id), '[]'::json))::text;
  IF p IS NULL OR octet_length(p) > {PAYLOAD_MAX} THEN
    p := NEW.id;
  END IF;
  PERFORM pg_notify('cascade_job_final', p);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""

_ID_ONLY = """
CREATE OR REPLACE FUNCTION cascade_job_final() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('cascade_job_final', NEW.id);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_NOTICE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_ID_ONLY)
