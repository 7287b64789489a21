"""Issue #23: `cascade run` rides out a database outage while it submits, as the stages
do, and a batch never reads as finished while lines remain unsubmitted.

Its own PostgreSQL on a spare port (worker.bench.faults.OwnPostgres), stopped for 20 s
while `cascade run` submits 3,000 lines; the tier workers are the embedded ones, in the
submitter's process, on that database. To stop the database mid-submission on any
machine, however loaded, a trigger installed by the test holds the insert of the
second slice's first line (pg_sleep, once) until the database goes down under it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers.env import REPO
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from worker.bench.faults import OwnPostgres
from worker.ops.migrate import upgrade
from worker.queue.batch import SUBMIT_SLICE

pytestmark = pytest.mark.services

LINES = 3000
HOLD_AT = SUBMIT_SLICE[0] + 1  # the first line of the second slice
OUTAGE_S = 20.0

_HOLD = f"""
CREATE SEQUENCE hold_once;
CREATE FUNCTION hold_submission() RETURNS trigger AS $$
BEGIN
  IF NEW.seq = {HOLD_AT} AND nextval('hold_once') = 1 THEN PERFORM pg_sleep(600); END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER hold_submission BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION hold_submission();
"""


def replay_data(path, n: int):
    with open(path, "w") as f:
        for i in range(n):
            a = {"text": "A", "correct": 1.0, "cost_usd": 0.001, "latency_ms": 1.0, "tokens_in": 5, "tokens_out": 1,
                 "logprob": -0.01 if i % 3 else -2.0}
            b = {"text": "B", "correct": 1.0, "cost_usd": 0.01, "latency_ms": 1.0, "tokens_in": 5, "tokens_out": 1,
                 "logprob": -0.01}
            f.write(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "responses": {"a": a, "b": b}}) + "\n")
    return path


def wait(cond, timeout: float, what: str, proc=None, log=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 - the database may be starting
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"cascade run exited {proc.returncode} while waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:.0f}s" + (f"\n{log.read_text()[-4000:]}" if log else ""))


@pytest.fixture
def pg():
    server = OwnPostgres("outage-test")
    server.start()
    try:
        yield server
    finally:
        server.remove()


def test_cascade_run_rides_out_a_database_outage_while_it_submits(pg, tmp_path):
    pg.create_db("outage")
    url = pg.url("outage")
    upgrade(url)
    probe = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with probe.connect() as c:
        c.execute(text(_HOLD))
    data = replay_data(tmp_path / "data.jsonl", LINES)
    portfolio = tmp_path / "p.toml"
    portfolio.write_text(
        '[policy]\nname = "threshold"\nsignal = "logprob"\n\n'
        f'[[tiers]]\nname = "a"\nthreshold = -0.5\nbackend = {{ kind = "replay", file = "{data}", model = "a" }}\n\n'
        f'[[tiers]]\nname = "b"\nbackend = {{ kind = "replay", file = "{data}", model = "b" }}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(CASCADE_DATABASE_URL=url, CASCADE_HOME=str(tmp_path / "home"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "worker.cli", "run", str(data), "--portfolio", str(portfolio), "--batch", "outage",
           "--quiet", "--out", str(tmp_path / "out.jsonl")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        def batch():
            with probe.connect() as c:
                return c.execute(text("SELECT * FROM batches WHERE id = 'outage'")).mappings().one()

        # the first slice is in and run by the workers; the second is held at its first line
        wait(lambda: batch()["total"] == SUBMIT_SLICE[0] and batch()["done"] == SUBMIT_SLICE[0], 180,
             "the first slice done", proc, log)
        wait(lambda: probe.connect().execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")).scalar() == 1, 60,
            "the second slice held", proc, log)
        # 128 of 3,000 lines are in and every one of them is done: the batch is not finished
        status = subprocess.run([sys.executable, "-m", "worker.cli", "status", "outage"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        assert "finished" not in status.stdout and "submitting" in status.stdout, status.stdout
        probe.dispose()
        pg.stop()  # the held insert's connection goes with it
        time.sleep(OUTAGE_S)
        pg.start()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-6000:]
    # the submitter itself met the outage, mid-submission, and waited it out
    assert '"event": "database.unavailable"' in output and f'"during": "submit: lines {HOLD_AT}-' in output, output[-6000:]
    b = batch()
    probe.dispose()
    assert (b["total"], b["done"], b["succeeded"]) == (LINES, LINES, LINES), dict(b)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == LINES
    assert f"batch outage: {LINES} items, {LINES} succeeded" in output
