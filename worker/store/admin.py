"""A PostgreSQL server as the benchmarks, the fault drill and the tests use it: a
private database created and dropped through an administrator's URL (each on an
engine of its own, disposed at once: no session stays open on the server's
maintenance database), and a probe of what a commit costs there."""
from __future__ import annotations

import statistics
import time

from sqlalchemy import create_engine, text

from worker.store.engine import engine_for


def create_database(admin_url: str, name: str, *, replace: bool = False) -> None:
    """Create database `name` on the server of `admin_url`; with replace, drop one of that name first."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        if replace:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()


def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name`, ending whatever sessions it still has."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def commit_ms(url: str, n: int = 50) -> dict:
    """Median time of a one-row UPDATE in its own transaction, durable and not (synchronous_commit off),
    on a table of the bench's own database (dropped with it)."""
    out = {}
    with engine_for(url).connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("CREATE TABLE IF NOT EXISTS bench_commit_probe (id int PRIMARY KEY, v int)"))
        c.execute(text("INSERT INTO bench_commit_probe VALUES (1, 0) ON CONFLICT DO NOTHING"))
        for mode in ("on", "off"):
            c.execute(text(f"SET synchronous_commit = {mode}"))
            took = []
            for _ in range(n):
                t = time.perf_counter()
                c.execute(text("UPDATE bench_commit_probe SET v = v + 1 WHERE id = 1"))
                took.append((time.perf_counter() - t) * 1000)
            out["durable" if mode == "on" else "not_waiting"] = round(statistics.median(took), 2)
        c.execute(text("RESET synchronous_commit"))
    return out
