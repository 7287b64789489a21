"""Where things are: the repository, the shared data, and the machine's services."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CASCADE_SHARED", REPO.parent / "shared"))
BENCH = SHARED / "benchmarks"
PG_ADMIN = os.environ.get("CASCADE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("CASCADE_TEST_REDIS", "redis://127.0.0.1:6379/0")


@contextlib.contextmanager
def private_database():
    """A fresh PostgreSQL database's URL, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"cascade_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from worker.store.engine import dispose_all

        dispose_all()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def private_redis_prefix():
    """A Redis key prefix of its own; its keys are deleted afterwards."""
    import redis

    prefix = f"cascade-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        r = redis.Redis.from_url(REDIS)
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
