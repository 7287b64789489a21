"""The stage's bulk statements are planned for the ids they are given. The store keeps a
statement it runs again and again prepared on its connection (parsed once), but PostgreSQL
must plan each run for its own values: a generic plan, made for a message of hundreds of
jobs, once hash-joined the whole jobs table for a single job. Behind a pooler that cannot
keep prepared statements, CASCADE_DB_PREPARED=false prepares none."""
from __future__ import annotations

import pytest
from helpers.env import private_database
from sqlalchemy import text

from worker.config.settings import get_settings
from worker.ops.migrate import upgrade
from worker.store.schema import now
from worker.store.stages import _START_STAGE, StageStore

pytestmark = pytest.mark.services


def _run_starts(store: StageStore):
    with store.engine.connect() as c:
        for i in range(12):  # psycopg prepares a statement at its 5th run; messages of 256 jobs, then single jobs
            ids = [f"job-{i}-{k}" for k in range(256 if i < 8 else 1)]
            c.execute(_START_STAGE, {"ids": ids, "tier": "t0", "t": now(), "holder": "h:1", "until": now()}).all()
        return c.execute(text("SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0), count(*) "
                              "FROM pg_prepared_statements WHERE statement LIKE '%WITH started AS%'")).one()


@pytest.fixture
def prepared_setting(monkeypatch):
    def set_(value: str | None):
        if value is None:
            monkeypatch.delenv("CASCADE_DB_PREPARED", raising=False)
        else:
            monkeypatch.setenv("CASCADE_DB_PREPARED", value)
        get_settings.cache_clear()
    yield set_
    get_settings.cache_clear()


def test_stage_statement_is_prepared_and_planned_for_each_run(prepared_setting):
    prepared_setting(None)
    with private_database() as url:
        upgrade(url)
        generic, custom, prepared = _run_starts(StageStore(url))
        assert prepared == 1
        assert generic == 0 and custom >= 6  # every run since it was prepared had a plan of its own


def test_nothing_is_prepared_when_the_setting_is_off(prepared_setting):
    prepared_setting("false")
    with private_database() as url:
        upgrade(url)
        generic, custom, prepared = _run_starts(StageStore(url))
        assert prepared == 0
