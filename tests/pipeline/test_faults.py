"""The fault-injection suite (worker/bench/faults.py) in the test command: real worker
processes and the real submitter against this suite's OWN Redis and PostgreSQL on
spare ports. Every job finishes without a human step, none has two final results,
and counts, costs and backend calls reconcile with the attempts.

Shorter than `cascade bench faults`, with the same behaviour: 80 jobs (the bench: 300),
kill -9 of one tier's worker (the bench: SIGTERM and kill -9 of each tier's), the
database stopped for 5 s (the bench: 20 s and 3 min; the code path is the same,
stage retries and the stage waiting to record), and a lost message re-sent after
10 s without a heartbeat (CASCADE_STALE_AFTER; default 60 s)."""
from __future__ import annotations

import pytest

from worker.bench.faults import FaultConfig, Lab, run_scenario

pytestmark = pytest.mark.services

THREADS = 4


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cfg = FaultConfig(jobs=80, threads=THREADS, outage_short=5.0, budget=120.0,
                      env={"CASCADE_STALE_AFTER": "10"}, log=print)
    with Lab(tmp_path_factory.mktemp("faults"), cfg) as lab:
        yield lab


def check(r: dict, unrecorded: int = 0) -> None:
    assert "error" not in r, r
    assert r["finished"] == r["submitted"] and r["lost"] == 0, r
    assert r["duplicated"] == 0, r
    assert 0 <= r["unrecorded_calls"] <= unrecorded, r


@pytest.mark.slow
def test_tier_worker_killed_mid_batch(lab):
    r = run_scenario(lab, "worker_kill9_t1")  # SIGTERM and the other tiers: `cascade bench faults`
    # the kill lands with calls in flight (a stage calls its jobs together and records them
    # together: at most one message per thread): each was recorded as started before it was
    # made, so none is invisible; they stay started-not-finished, their estimate in their
    # jobs' costs (reconciled in `duplicated`), and only they are called again, once their
    # dead holder's lease expired
    check(r)
    assert 1 <= r["calls_started_not_finished"] <= THREADS * lab.cfg.chunk, r
    assert r["est_unfinished_usd"] > 0, r
    assert r["duplicate_model_calls"] <= r["calls_started_not_finished"], r
    assert r["worker_restarts"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["redis_restart_aof", "redis_kill9_empty"])
def test_broker_restarted_mid_batch(lab, name):
    r = run_scenario(lab, name)
    check(r)
    # the workers reconnect by themselves; one whose consumer got stuck (seen after a
    # kill -9 of Redis) is ended by its watchdog and restarted, at most once per tier
    assert r["worker_restarts"] <= 3, r
    assert r["submitter_exit"] == 0


@pytest.mark.slow
def test_database_stopped_mid_batch(lab):
    r = run_scenario(lab, "postgres_stop_short")
    check(r)
    assert r["worker_restarts"] == 0 and r["submitter_exit"] == 0  # the waiting submitter rode it out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["backend_hang", "poison_item", "submitter_kill9"])
def test_bad_backends_poison_and_a_killed_submitter(lab, name):
    check(run_scenario(lab, name))


def test_bench_faults_names_an_unknown_scenario():
    from click.testing import CliRunner

    from worker.cli.bench_cmd import bench

    r = CliRunner().invoke(bench, ["faults", "--scenario", "redis_restart"])
    assert r.exit_code != 0 and "unknown scenario(s) redis_restart; known: baseline, worker_kill9_t0" in r.output
