"""The stage's bulk statements are planned for the ids they are given: the store's
connections keep no server-side prepared statements, whose generic plan (made for a
message of hundreds of jobs) PostgreSQL would reuse for a single job."""
from __future__ import annotations

import pytest
from helpers.env import private_database
from sqlalchemy import text

from worker.ops.migrate import upgrade
from worker.store.schema import now
from worker.store.stages import _START_STAGE, StageStore

pytestmark = pytest.mark.services


def test_no_statement_is_prepared_on_the_server():
    with private_database() as url:
        upgrade(url)
        store = StageStore(url)
        with store.engine.connect() as c:
            for i in range(12):  # psycopg's default prepares a statement at its 5th run
                c.execute(_START_STAGE, {"ids": [f"job-{i}"], "tier": "t0", "t": now(), "holder": "h:1",
                                         "until": now()}).all()
            prepared = c.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar()
            assert prepared == 0
