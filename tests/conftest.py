"""Fixtures that give each test its own real PostgreSQL database and Redis key
prefix (created here, dropped after), so runs never collide."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers.env import BENCH, REDIS, private_database, private_redis_prefix
from helpers.llama import llama_server  # noqa: F401 - a session fixture: llama-cpp-python's server, the tiny model
from helpers.workers import Workers


@pytest.fixture(scope="session")
def bench() -> Path:
    if not (BENCH / "rc-mmlu.jsonl.gz").exists():
        pytest.fail(f"the shared benchmarks are missing at {BENCH} (set CASCADE_SHARED)")
    return BENCH


@pytest.fixture
def pg_url():
    with private_database() as url:
        yield url


@pytest.fixture
def redis_prefix():
    with private_redis_prefix() as prefix:
        yield prefix


def _distributed(pg_url: str, redis_prefix: str, home: Path):
    from worker.config.settings import Settings
    from worker.ops.migrate import upgrade

    env = {
        "CASCADE_BROKER_URL": REDIS,
        "CASCADE_DATABASE_URL": pg_url,
        "CASCADE_REDIS_PREFIX": redis_prefix,
        "CASCADE_HOME": str(home),
        "CASCADE_VISIBILITY_TIMEOUT": "10",
        "CASCADE_STALE_AFTER": "10",  # the sweeper re-sends a lost message after 10 s here (default 60)
    }
    upgrade(pg_url)
    settings = Settings(broker_url=REDIS, database_url=pg_url, redis_prefix=redis_prefix,
                        home=home, visibility_timeout=10)
    return settings, env


@pytest.fixture
def distributed(pg_url, redis_prefix, tmp_path):
    """Settings (and the matching environment) of a private distributed deployment."""
    return _distributed(pg_url, redis_prefix, tmp_path / "home")


@pytest.fixture(scope="module")
def distributed_module(tmp_path_factory):
    """`distributed`, one for the whole module: for tests that share worker processes
    (starting them is most of such a test's time). Each test keeps its own batch ids,
    idempotency keys and jobs, and asserts only on those."""
    with private_database() as url, private_redis_prefix() as prefix:
        yield _distributed(url, prefix, tmp_path_factory.mktemp("deployment") / "home")


@pytest.fixture
def workers(distributed, tmp_path):
    made: list[Workers] = []

    def factory(portfolio: Path) -> Workers:
        w = Workers(distributed[1], portfolio, tmp_path)
        made.append(w)
        return w

    yield factory
    for w in made:
        w.kill_all()
