"""Job rows: the portfolios jobs are submitted with, the jobs themselves (inserted
before any message names them), their attempts as read back, and the job-level
writes outside a stage (cancel one job, forget collected answers). The batch
counters move in the transaction that inserts or cancels a job."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Sequence

from sqlalchemy import bindparam, case, func, select, text, update
from sqlalchemy.engine import Connection, Row

from worker.config.credentials import redact_spec
from worker.job.codec import CANCELLED, FAILED, FINAL, OPEN
from worker.store import jsontext
from worker.store.engine import Database, dialect_insert, no_disk_wait
from worker.store.schema import attempts, batches, jobs, model_calls, now, portfolios, tenants

# what a finished job's input becomes when content is not kept
ERASED_INPUT = {"erased": True}
# a new job holds no lease (worker.store.stages): the submitter never writes those columns
_JOB_COLUMNS = [c.name for c in jobs.columns if c.name not in ("lease_holder", "lease_until")]
_COPY_FROM = 50  # rows; fewer (a single job) go in one plain INSERT, one round trip
_JSON_COLUMNS = {"input", "plan"}


# One job of no batch when its tenant has no budget (JobStore.insert_unless_budgeted): one fixed
# statement, compiled once, its values bound as parameters (built per job with a literal per
# column, its construction and compilation cost more than its round trip); by durability, the
# one not waiting for the disk for a job whose caller alone will know it (see that method)
_INSERT_UNLESS_BUDGETED_SQL = f"""
WITH budgeted AS (SELECT EXISTS (SELECT 1 FROM tenants WHERE id = :tenant AND budget_usd IS NOT NULL) AS b),
ins AS (
  INSERT INTO jobs ({", ".join(_JOB_COLUMNS)})
  SELECT {", ".join(":" + k for k in _JOB_COLUMNS)} WHERE NOT (SELECT b FROM budgeted)
  ON CONFLICT DO NOTHING RETURNING id)
SELECT (SELECT b FROM budgeted) AS budgeted, (SELECT count(*) FROM ins) AS new
"""
_INSERT_UNLESS_BUDGETED = {
    durable: text(sql).bindparams(*[bindparam(k, type_=jobs.c[k].type) for k in _JOB_COLUMNS])
    for durable, sql in ((True, _INSERT_UNLESS_BUDGETED_SQL), (False, no_disk_wait(_INSERT_UNLESS_BUDGETED_SQL)))}

# built once (an interactive caller's read of its finished job; building it took longer than running it)
_JOB_WITH_ATTEMPTS = (select(jobs, *[c.label(f"a__{c.name}") for c in attempts.columns])
                      .select_from(jobs.outerjoin(attempts, attempts.c.job_id == jobs.c.id))
                      .where(jobs.c.id == bindparam("job_id")).order_by(attempts.c.step))
# (the tenant's row: budget_usd, spent_usd, reserved_usd; or None) -> the rows to insert
Admit = Callable[[dict[str, Any] | None, Sequence[dict[str, Any]]], Sequence[dict[str, Any]]]


def _copy_jobs(c: Connection, rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Insert job rows through COPY into a temporary table, then one INSERT .. SELECT
    .. ON CONFLICT DO NOTHING: a multi-row INSERT of a thousand jobs spends most of
    its time in the driver re-parsing a statement with 20,000 placeholders."""
    raw = c.connection.driver_connection
    cols = ", ".join(_JOB_COLUMNS)
    with raw.cursor() as cur:
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS jobs_in (LIKE jobs) ON COMMIT DELETE ROWS")
        with cur.copy(f"COPY jobs_in ({cols}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row([jsontext.dumps(r[k]) if k in _JSON_COLUMNS and r[k] is not None else r[k]
                              for k in _JOB_COLUMNS])
        cur.execute(f"INSERT INTO jobs ({cols}) SELECT {cols} FROM jobs_in ORDER BY seq "
                    f"ON CONFLICT DO NOTHING RETURNING id, status")
        got = cur.fetchall()
        cur.execute("TRUNCATE jobs_in")
    return got


_ADMISSION_LOCK = 0x43617363  # the first key of the admission locks (pg_advisory_xact_lock(key, tenant))


def _admission_view(c: Connection, tenant: str) -> dict[str, Any] | None:
    """With the tenant's admission lock held to the end of the transaction: its budget,
    spend and open reservations, read in one statement (one snapshot: a job that
    finishes meanwhile is counted by its reservation or by its cost, never by neither).
    None: no such tenant.

    The lock is an advisory lock on the tenant's name, not its row: concurrent
    submitters for one tenant, in any number of processes, take turns, while the
    stages' trigger moving the tenant's spend (its row) never waits on a submitter, so
    the two never deadlock (a stage locks its jobs, its batch, then the tenant's row).
    SQLite: one writer at a time already (BEGIN IMMEDIATE)."""
    if c.dialect.name == "postgresql":
        c.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:t))"), {"k": _ADMISSION_LOCK, "t": tenant})
    row = c.execute(select(tenants.c.budget_usd, tenants.c.spent_usd, reserved_if_budgeted())
                    .where(tenants.c.id == tenant)).mappings().one_or_none()
    return None if row is None else dict(row)


def reserved_if_budgeted():
    """A tenants row's `reserved_usd` column: what its open jobs have reserved, summed only
    when it has a budget (without one there is nothing to hold the jobs to)."""
    open_sum = (select(func.coalesce(func.sum(jobs.c.reserved_usd), 0.0))
                .where(jobs.c.tenant == tenants.c.id, jobs.c.status.in_(OPEN)).scalar_subquery())
    return case((tenants.c.budget_usd.is_(None), 0.0), else_=open_sum).label("reserved_usd")


def open_reservations(c: Connection, tenant: str) -> float:
    """What the tenant's open jobs have reserved (index ix_jobs_open_tenant)."""
    return float(c.execute(select(func.coalesce(func.sum(jobs.c.reserved_usd), 0.0))
                           .where(jobs.c.tenant == tenant, jobs.c.status.in_(OPEN))).scalar())


def bare_notices(c: Connection) -> None:
    """The completion notices of this transaction carry job ids only, not the jobs
    (migration 0013): it erases the content it finishes (forget_content), after the
    UPDATE whose trigger builds the notice."""
    if c.dialect.name == "postgresql":
        c.execute(text("SELECT set_config('cascade.notice_bare', 'yes', true)"))


def forget_content(c: Connection, job_ids: Sequence[str]) -> None:
    """Erase these finished jobs' prompts and their tiers' answers, in the caller's
    transaction (the one that finishes them), when content is not kept."""
    if not job_ids:
        return
    ids = sorted(job_ids)
    for i in range(0, len(ids), 1000):
        part = ids[i : i + 1000]
        c.execute(update(jobs).where(jobs.c.id.in_(part)).values(input=ERASED_INPUT))
        c.execute(update(attempts).where(attempts.c.job_id.in_(part)).values(answer=None))


class JobStore(Database):
    def save_portfolio(self, digest: str, spec: dict[str, Any]) -> None:
        """Stored with every credential blanked (worker.config.credentials): a worker calls with
        the portfolio it was started with, never with one read back from here."""
        with self.tx() as c:
            c.execute(dialect_insert(c, portfolios).values(digest=digest, spec=redact_spec(spec), created_at=now())
                      .on_conflict_do_nothing(index_elements=["digest"]))

    def portfolio_spec(self, digest: str) -> dict[str, Any]:
        with self.read() as c:
            spec = c.execute(select(portfolios.c.spec).where(portfolios.c.digest == digest)).scalar_one_or_none()
        if spec is None:
            raise LookupError(f"portfolio {digest} is not in the database")
        return spec

    def add_jobs(self, batch_id: str | None, rows: Sequence[dict[str, Any]], *, admit: Admit | None = None) -> int:
        """Insert jobs (skipping ones already there); count new ones into the batch.

        Each row: id, item_key, seq, portfolio, input, plan, status, current_tier,
        reserved_usd, and for rows rejected at submission: error (status failed).
        Returns how many rows were new.
        """
        return len(self.insert_jobs(batch_id, rows, admit=admit))

    def insert_jobs(self, batch_id: str | None, rows: Sequence[dict[str, Any]], *,
                    admit: Admit | None = None, durable: bool = True) -> set[str]:
        """`add_jobs`, returning the ids of the rows that were new.

        admit(tenant or None, rows) -> rows: called in the insert's transaction with the
        tenant's admission lock held (concurrent submitters for one tenant, in any
        number of processes, take turns: `_admission_view`), it decides the rows to
        insert against the tenant's budget (worker.queue.admission.Admission), or raises
        and nothing is written. The tenant it gets: budget_usd, spent_usd, and
        reserved_usd, the sum of the tenant's open jobs' reservations (a job stops
        counting once final, its real cost then in spent_usd). Every row of one call is
        of one tenant. durable=False: the commit does not wait for the disk
        (`insert_unless_budgeted` says when that is safe)."""
        if not rows:
            return set()
        if durable and admit is None and batch_id is None and len(rows) <= _COPY_FROM \
                and self.engine.dialect.name == "postgresql":
            # jobs of no batch, no budget to hold them to: one INSERT, one round trip
            with self.read() as c:
                ins = dialect_insert(c, jobs).on_conflict_do_nothing().returning(jobs.c.id)
                return {g[0] for g in c.execute(ins, self._full(batch_id, rows)).all()}
        new: set[str] = set()
        failed = 0
        with self.tx() as c:
            if not durable and c.dialect.name == "postgresql":
                c.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            if admit is not None:
                names = {r.get("tenant", "default") for r in rows}
                if len(names) != 1:
                    raise ValueError(f"one insert holds the jobs of one tenant, got {sorted(names)[:3]}")
                rows = admit(_admission_view(c, names.pop()), rows)
            full = self._full(batch_id, rows)
            for i in range(0, len(full), 1000):
                part = full[i : i + 1000]
                if c.dialect.name == "postgresql" and len(part) > _COPY_FROM:
                    got = _copy_jobs(c, part)
                else:
                    ins = dialect_insert(c, jobs).on_conflict_do_nothing().returning(jobs.c.id, jobs.c.status)
                    got = c.execute(ins, part).all()
                new.update(g[0] for g in got)
                failed += sum(1 for g in got if g[1] == FAILED)
            if batch_id is not None and new:
                c.execute(update(batches).where(batches.c.id == batch_id).values(
                    total=batches.c.total + len(new), done=batches.c.done + failed,
                    failed=batches.c.failed + failed, updated_at=full[0]["updated_at"]))
        return new

    def insert_unless_budgeted(self, row: dict[str, Any], *, durable: bool = True) -> bool | None:
        """One job of no batch, in one statement when its tenant has no budget: whether
        it was new (False: its id existed), or None, nothing written, when the tenant
        has a budget (insert it with `insert_jobs(.., admit=..)`, under the admission
        lock). A budget set at that very moment applies from the next job on, as if this
        one had come a moment earlier. PostgreSQL only (None elsewhere).

        durable=False, for a job whose caller waits for its result and gives its id to
        no one before (`Client.run`, a chat completion): the commit does not wait for the
        disk. Its first stage's start commits durably before any call is made, and a
        durable commit writes out everything committed before it, this insert included;
        should the database crash before that, the job is gone and so is the caller's
        connection: it was never told the job exists. A caller that does give the id out
        first (a timeout naming it) calls `make_durable(job_id)`."""
        if self.engine.dialect.name != "postgresql":
            return None
        full = self._full(None, [row])[0]
        with self.read() as c:
            has_budget, new = c.execute(_INSERT_UNLESS_BUDGETED[durable], {k: full[k] for k in _JOB_COLUMNS}).one()
        return None if has_budget else new == 1

    def make_durable(self, job_id: str) -> None:
        """Wait until the job's row, and everything committed before now, is on disk (a job
        inserted with durable=False): its row rewritten in a durable commit, which writes
        the log out up to its own record. (A transaction that writes nothing commits
        without waiting for the disk, an id assigned or not.)"""
        if self.engine.dialect.name == "postgresql":
            with self.read() as c:
                c.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=jobs.c.updated_at))

    @staticmethod
    def _full(batch_id: str | None, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows with every column (defaults for the ones not given)."""
        t = now()
        return [{
            "tenant": "default", "batch_id": batch_id, "item_key": None, "seq": 0, "plan": None,
            "current_tier": None, "final_answer": None, "final_tier": None, "total_cost": 0.0,
            "error": None, "started_at": None, "finished_at": t if r.get("status") in FINAL else None,
            "created_at": t, "updated_at": t, "deliveries": 0, "deadline": None, "reserved_usd": 0.0, **r,
        } for r in rows]

    def job_inputs(self, batch_id: str) -> dict[str, tuple[Any, str | None]]:
        """item key -> (stored input, error if it failed at submission) of a batch's jobs."""
        with self.read() as c:
            q = select(jobs.c.item_key, jobs.c.input, jobs.c.status, jobs.c.plan, jobs.c.error).where(
                jobs.c.batch_id == batch_id)
            # a job failed at submission has no plan: its error is what the line was
            return {r.item_key: (r.input, r.error if r.plan is None and r.status == FAILED else None)
                    for r in c.execute(q)}

    def open_jobs(self, batch_id: str, *, idle_before: datetime | None = None) -> list[tuple[str, str]]:
        """(job id, current tier) of the batch's unfinished jobs, in input order;
        with idle_before, only those not updated since then."""
        with self.read() as c:
            q = (select(jobs.c.id, jobs.c.current_tier).where(jobs.c.batch_id == batch_id, jobs.c.status.in_(OPEN))
                 .order_by(jobs.c.seq))
            if idle_before is not None:
                q = q.where(jobs.c.updated_at < idle_before)
            return [(r.id, r.current_tier) for r in c.execute(q)]

    def lease_holders(self, batch_id: str) -> list[str]:
        """Who holds a lease on the batch's unfinished jobs."""
        with self.read() as c:
            return list(c.execute(select(jobs.c.lease_holder).distinct().where(
                jobs.c.batch_id == batch_id, jobs.c.status.in_(OPEN), jobs.c.lease_holder.is_not(None))).scalars())

    def release_leases(self, batch_id: str, holders: Sequence[str]) -> int:
        """Give up the leases these holders have on the batch's unfinished jobs (holders
        known to be gone: a stage sent again then runs at once, not after the lease)."""
        if not holders:
            return 0
        with self.tx() as c:
            return c.execute(update(jobs).where(jobs.c.batch_id == batch_id, jobs.c.status.in_(OPEN),
                                                jobs.c.lease_holder.in_(list(holders)))
                             .values(lease_holder=None, lease_until=None)).rowcount

    def job_ids(self, batch_id: str, item_keys: Sequence[str]) -> dict[str, str]:
        """item key -> job id, for the keys that are jobs of the batch."""
        return self._by_item_key(batch_id, item_keys, jobs.c.id)

    def item_seqs(self, batch_id: str, item_keys: Sequence[str]) -> dict[str, int]:
        """item key -> the line (seq) of the batch's job holding it, for the keys held."""
        return self._by_item_key(batch_id, item_keys, jobs.c.seq)

    def _by_item_key(self, batch_id: str, item_keys: Sequence[str], column) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self.read() as c:
            for i in range(0, len(item_keys), 1000):  # bounded IN lists
                q = select(jobs.c.item_key, column).where(jobs.c.batch_id == batch_id,
                                                          jobs.c.item_key.in_(item_keys[i : i + 1000]))
                out.update({r[0]: r[1] for r in c.execute(q)})
        return out

    def existing_jobs(self, job_ids: Sequence[str]) -> set[str]:
        with self.read() as c:
            got: set[str] = set()
            for i in range(0, len(job_ids), 1000):
                got |= set(c.execute(select(jobs.c.id).where(jobs.c.id.in_(job_ids[i : i + 1000]))).scalars())
            return got

    def job(self, job_id: str) -> dict | None:
        with self.read() as c:
            r = c.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one_or_none()
            return dict(r) if r else None

    def job_with_attempts(self, job_id: str) -> tuple[dict | None, list[dict]]:
        """A job and its attempts in step order, in one statement (an interactive caller
        reads a finished job this way: one round trip, not two)."""
        with self.read() as c:
            found = c.execute(_JOB_WITH_ATTEMPTS, {"job_id": job_id}).mappings().all()
        if not found:
            return None, []
        job = {k: v for k, v in found[0].items() if not k.startswith("a__")}
        tries = [{k[3:]: v for k, v in r.items() if k.startswith("a__")} for r in found if r["a__job_id"] is not None]
        return job, tries

    def batch_jobs(self, batch_id: str) -> list[dict]:
        with self.read() as c:
            q = select(jobs).where(jobs.c.batch_id == batch_id).order_by(jobs.c.seq)
            return [dict(r) for r in c.execute(q).mappings()]

    def attempts_of(self, job_ids: Sequence[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {j: [] for j in job_ids}
        with self.read() as c:
            for i in range(0, len(job_ids), 1000):
                q = (select(attempts).where(attempts.c.job_id.in_(job_ids[i : i + 1000]))
                     .order_by(attempts.c.job_id, attempts.c.step))
                for r in c.execute(q).mappings():
                    out[r["job_id"]].append(dict(r))
        return out

    def jobs_page(self, batch_id: str, after_seq: int, limit: int) -> list[dict]:
        """The batch's jobs with seq > after_seq, in input order (results stream page by page)."""
        with self.read() as c:
            q = (select(jobs).where(jobs.c.batch_id == batch_id, jobs.c.seq > after_seq)
                 .order_by(jobs.c.seq).limit(limit))
            return [dict(r) for r in c.execute(q).mappings()]

    def cancel_job(self, job_id: str) -> bool:
        """Cancel one open job (its batch's counters move with it); False if it was final."""
        t = now()
        with self.tx() as c:
            row = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(OPEN))
                            .values(status=CANCELLED, finished_at=t, updated_at=t, error="cancelled")
                            .returning(jobs.c.batch_id)).one_or_none()
            if row is not None and row.batch_id is not None:
                c.execute(update(batches).where(batches.c.id == row.batch_id).values(
                    done=batches.c.done + 1, cancelled=batches.c.cancelled + 1, updated_at=t))
        return row is not None

    def erase_answers(self, job_ids: Sequence[str]) -> None:
        """Forget finished jobs' final answers (their results were collected)."""
        ids = sorted(job_ids)
        with self.tx() as c:
            for i in range(0, len(ids), 1000):
                c.execute(update(jobs).where(jobs.c.id.in_(ids[i : i + 1000]), jobs.c.status.in_(FINAL))
                          .values(final_answer=None))

    # -- the books read back (the benchmarks reconcile them) --------------------------
    def final_count(self, batch_id: str) -> int:
        with self.read() as c:
            return c.execute(select(func.count()).select_from(jobs).where(
                jobs.c.batch_id == batch_id, jobs.c.status.in_(FINAL))).scalar()

    def attempt_count(self, tier: str | None = None) -> int:
        """Attempts recorded (at `tier`, if given), of every job in the database."""
        q = select(func.count()).select_from(attempts)
        if tier is not None:
            q = q.where(attempts.c.tier == tier)
        with self.read() as c:
            return c.execute(q).scalar()

    def ledger(self, batch_id: str) -> tuple[list[Row], list[Row]]:
        """The batch's jobs (id, status, total_cost) and every attempt in the database
        (job_id, decision, cost_usd, meta): what the fault drill checks against the
        requests its model server counted."""
        with self.read() as c:
            rows = c.execute(select(jobs.c.id, jobs.c.status, jobs.c.total_cost).where(
                jobs.c.batch_id == batch_id)).all()
            ats = c.execute(select(attempts.c.job_id, attempts.c.decision, attempts.c.cost_usd,
                                   attempts.c.meta)).all()
        return rows, ats

    def calls(self, batch_id: str | None = None) -> list[Row]:
        """The model calls recorded (model_calls) of a batch's jobs, or of every job: job_id,
        tier, holder, state, est_cost_usd, cost_usd, tries, started_at, finished_at, in the order
        they started."""
        q = select(model_calls.c.job_id, model_calls.c.tier, model_calls.c.holder, model_calls.c.state,
                   model_calls.c.est_cost_usd, model_calls.c.cost_usd, model_calls.c.tries,
                   model_calls.c.started_at, model_calls.c.finished_at)
        if batch_id is not None:
            q = q.join(jobs, jobs.c.id == model_calls.c.job_id).where(jobs.c.batch_id == batch_id)
        with self.read() as c:
            return c.execute(q.order_by(model_calls.c.id)).all()

    def durable(self, batch_id: str) -> dict[str, int]:
        """What PostgreSQL holds of the batch, read back: succeeded jobs with an answer, attempts."""
        with self.read() as c:
            ok = c.execute(text("SELECT count(*) FROM jobs WHERE batch_id = :b AND status = 'succeeded' "
                                "AND final_answer IS NOT NULL"), {"b": batch_id}).scalar()
            n = c.execute(text("SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b"),
                          {"b": batch_id}).scalar()
        return {"succeeded": ok, "attempts": n}
