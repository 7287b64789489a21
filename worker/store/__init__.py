"""Persistence: the only package that speaks SQL. PostgreSQL (or SQLite in the
embedded mode) is the source of truth; Redis only carries messages.

Idempotency lives here, in the statements themselves:
- one attempt row per (job, tier): `INSERT .. ON CONFLICT DO NOTHING`, so a
  redelivered task cannot record (or charge) the same call twice;
- finalizing is `UPDATE jobs .. WHERE status IN ('queued', 'running')`: only the
  first final write wins, and the batch counters move only when it did;
- job rows are committed before any task naming them is sent.

One module per aggregate, each a narrow store on the shared engine (a caller holds
only the ones it uses):
- schema      the tables (MetaData, for Alembic too) and `now()`
- engine      one engine per URL, SQLite's hooks, `Database` (read, tx, ping, on_statement)
- jobs        JobStore: portfolios, job rows and their attempts, cancel one job, erase answers
- stages      StageStore: a stage's start and record, crashes, heartbeat, expiry, the sweeper's claim
- batches     BatchStore: batch rows and counters, cancel or reopen a batch's jobs
- feedback    FeedbackStore: graded outcomes
- retention   RetentionStore: purge what finished long ago, and expired files
- files       FileStore: files uploaded through /v1/files, their bytes in 1 MiB chunks
- webhooks    WebhookStore: completion windows and webhook deliveries
- tenants     TenantStore: tenants, limits and API keys
- admin       private databases for benches and tests, the commit probe
- notify      LISTEN/NOTIFY waiters
- errors      the driver's exceptions, for the layers that catch them
"""
