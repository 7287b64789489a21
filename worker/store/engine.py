"""One engine per database URL for the whole process, and `Database`, the base of
every store of this package: its reads, its write transactions, and the hooks on
the engine. Stores made on one URL share its engine (one connection pool), so
`on_statement` on any of them sees every statement the process sends there."""
from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Table, and_, create_engine, event, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url

from worker.config.settings import get_settings

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _sqlite_connect(dbapi_conn, _record) -> None:
    # Transactions are begun by _sqlite_begin, not by the driver's implicit BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # WAL lets the in-process tier workers read while one writes; busy_timeout
    # makes a writer wait for the lock instead of failing.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the lock up front (BEGIN IMMEDIATE): two in-process writers
    # then queue on busy_timeout instead of failing a lock upgrade mid-transaction.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


def no_disk_wait(sql: str) -> str:
    """The statement `sql` (`WITH .. SELECT ..`, its final SELECT without a WHERE) made to
    commit its own transaction without waiting for the disk (PostgreSQL): a CTE setting
    synchronous_commit for that transaction only (set_config's `true`), and a condition on
    the final SELECT that reads it (a CTE nothing reads is never run; the condition is
    always true)."""
    head, _, final = sql.strip().rpartition("\nSELECT ")
    if not sql.lstrip().startswith("WITH ") or not head or " WHERE " in final or "\n" in final:
        raise ValueError(f"no_disk_wait takes WITH .. and a one-line final SELECT without WHERE, got: {sql[:80]!r}")
    head = head.strip().replace("WITH ", "WITH nowait AS (SELECT set_config('synchronous_commit', 'off', true) AS s), ", 1)
    return f"{head}\nSELECT {final} WHERE (SELECT s FROM nowait) = 'off'\n"


def _postgres_connect_args(url: str) -> dict:
    # A network cut (a partition, a host gone) must surface as an error, not hang:
    # without these a statement sent into a dead link waits out TCP's retransmissions
    # (~15 min) and a connect waits for ever. A connect gives up after 10 s, an idle
    # connection is probed by keepalives, and data unacknowledged for 30 s ends the
    # connection (a long query is not unacknowledged data: it is not cut).
    args: dict = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                  "keepalives_count": 3, "tcp_user_timeout": 30000}
    if get_settings().db_prepared:
        # psycopg prepares a statement at its 5th run on a connection: PostgreSQL then skips
        # its parse and rewrite (the stage statements' long CTEs: the start on one job, in a
        # loop, 1.6-1.75 ms unprepared, 1.28-1.48 prepared). It must still plan each run for its own values: a generic plan, made
        # for a 256-job message, hash-joined the whole jobs table for a single job (a
        # stage's statements took 5-7 ms instead of 1 after a 20,000-job batch).
        given = make_url(url).query.get("options")
        given = " ".join(given) if isinstance(given, tuple) else given
        args["options"] = " ".join(filter(None, [given, "-c plan_cache_mode=force_custom_plan"]))
    else:
        args["prepare_threshold"] = None  # nothing prepared: each statement parsed and planned every run
    return args


def engine_for(url: str) -> Engine:
    with _engines_lock:
        eng = _engines.get(url)
        if eng is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
                event.listen(eng, "connect", _sqlite_connect)
                event.listen(eng, "begin", _sqlite_begin)
            else:
                # no pre-ping round trip per checkout: a dropped connection surfaces as an
                # OperationalError, and the stage task retries the whole (idempotent) stage.
                eng = create_engine(url, pool_recycle=1800, pool_size=5, max_overflow=10,
                                    connect_args=_postgres_connect_args(url))
            _engines[url] = eng
        return eng


def dispose_all() -> None:
    with _engines_lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()


def dialect_insert(conn: Connection, table: Table):
    """The connection's dialect's INSERT, the one with ON CONFLICT (an upsert)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


class Database:
    def __init__(self, url: str, *, keep_content: bool = True):
        self.url = url
        self.engine = engine_for(url)
        # off: a job's prompt and its tiers' answers are erased in the transaction that
        # finishes it; the final answer stays until its results are collected (erase_answers)
        self.keep_content = keep_content

    def read(self):
        """A connection for reads. On PostgreSQL in autocommit: no BEGIN/ROLLBACK round
        trips around the one or two SELECTs of a stage (each reads committed rows)."""
        if self.engine.dialect.name == "postgresql":
            return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self.engine.connect()

    def on_statement(self, callback) -> None:
        """Call `callback(sql)` before every statement sent on this store's engine, i.e. by
        every store of the process on this URL (the metrics count them)."""
        event.listen(self.engine, "before_cursor_execute",
                     lambda conn, cursor, statement, *rest: callback(statement))

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.read() as c:
            c.execute(text("SELECT 1"))

    def tx(self):
        """A write transaction (committed on success, rolled back on error)."""
        return self.engine.execution_options(write=True).begin()


def newest_first(c: Connection, table: Table, q, tenant: str, after: str | None, limit: int) -> list[dict]:
    """A page of a tenant's rows of `table` (a query `q` over it), newest first by
    (created_at, id), those after the row `after` (a cursor: its id); [] for a cursor
    that is not one of the tenant's rows."""
    if after:
        cur = c.execute(select(table.c.created_at, table.c.id).where(
            table.c.id == after, table.c.tenant == tenant)).one_or_none()
        if cur is None:
            return []
        q = q.where(or_(table.c.created_at < cur.created_at,
                        and_(table.c.created_at == cur.created_at, table.c.id < cur.id)))
    q = q.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit)
    return [dict(r) for r in c.execute(q).mappings()]
