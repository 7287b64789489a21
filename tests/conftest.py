"""Fixtures that give each test its own real PostgreSQL database and Redis key
prefix (created here, dropped after), so runs never collide."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers.env import BENCH, PG_ADMIN, REDIS, REPO


@pytest.fixture(scope="session")
def bench() -> Path:
    if not (BENCH / "rc-mmlu.jsonl.gz").exists():
        pytest.fail(f"the shared benchmarks are missing at {BENCH} (set CASCADE_SHARED)")
    return BENCH


@pytest.fixture
def pg_url():
    from sqlalchemy import create_engine, text

    name = f"cascade_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from worker.store import dispose_all

        dispose_all()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def redis_prefix():
    import redis

    prefix = f"cascade-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    r = redis.Redis.from_url(REDIS)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture
def distributed(pg_url, redis_prefix, tmp_path):
    """Settings (and the matching environment) of a private distributed deployment."""
    from worker.migrate import upgrade
    from worker.settings import Settings

    env = {
        "CASCADE_BROKER_URL": REDIS,
        "CASCADE_DATABASE_URL": pg_url,
        "CASCADE_REDIS_PREFIX": redis_prefix,
        "CASCADE_HOME": str(tmp_path / "home"),
        "CASCADE_VISIBILITY_TIMEOUT": "10",
    }
    upgrade(pg_url)
    settings = Settings(broker_url=REDIS, database_url=pg_url, redis_prefix=redis_prefix,
                        home=tmp_path / "home", visibility_timeout=10)
    return settings, env


class Workers:
    """`cascade worker --tier NAME` processes, stopped (or killed) by the test."""

    def __init__(self, env: dict[str, str], portfolio: Path, logdir: Path):
        self.env = {**os.environ, **env}
        self.portfolio = portfolio
        self.logdir = logdir
        self.procs: dict[str, list[subprocess.Popen]] = {}

    def start(self, tier: str, *extra: str) -> subprocess.Popen:
        n = sum(len(v) for v in self.procs.values())
        log = open(self.logdir / f"worker-{tier}-{n}.log", "wb")
        p = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--tier", tier, "--portfolio", str(self.portfolio),
             "-l", "WARNING", *extra],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        self.procs.setdefault(tier, []).append(p)
        return p

    def stop_all(self) -> None:
        for ps in self.procs.values():
            for p in ps:
                if p.poll() is None:
                    p.terminate()
        deadline = time.time() + 20
        for ps in self.procs.values():
            for p in ps:
                try:
                    p.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(self.logdir.glob("worker-*.log")))


@pytest.fixture
def workers(distributed, tmp_path):
    made: list[Workers] = []

    def factory(portfolio: Path) -> Workers:
        w = Workers(distributed[1], portfolio, tmp_path)
        made.append(w)
        return w

    yield factory
    for w in made:
        w.stop_all()
