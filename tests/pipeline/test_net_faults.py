"""Faults between machines (worker/bench/netfaults.py) in the test command: the parts on
hosts of their own in Linux network namespaces this suite creates (root needed: CI runs
as root; elsewhere it is skipped, saying why), its own Redis and PostgreSQL, the model
calls going on while a path is cut. Shorter than `cascade bench faults --network`: 80
jobs, 8-second cuts, STALE_AFTER 20 s (the bench: 300 jobs, 30 s, 15 s, and 5-minute cuts
with --long); the code paths
are the same. Every job finishes without a human step, none twice, every model call
the model server answered is recorded, and a call is made twice only where its first
holder's lease expired (it was cut from the database longer than STALE_AFTER)."""
from __future__ import annotations

import pytest

from worker.bench.faults import FaultConfig, run_scenario
from worker.bench.netfaults import NET_SCENARIOS, NetLab, NetRun, network_unavailable

WHY = network_unavailable()
pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.network,
              pytest.mark.skipif(WHY is not None, reason=f"network namespaces unavailable: {WHY}")]

THREADS = 4


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    # STALE_AFTER 20 s: an 8 s cut plus TCP's retransmission backoff after it stays inside one
    # lease; net_heal_after_resend cuts for longer than it on purpose
    cfg = FaultConfig(jobs=80, threads=THREADS, outage_short=8.0, budget=120.0, env={"CASCADE_STALE_AFTER": "20"},
                      log=print)
    with NetLab(tmp_path_factory.mktemp("netfaults"), cfg) as lab:
        yield lab


def run(lab, name: str) -> dict:
    r = run_scenario(lab, name, NET_SCENARIOS, NetRun)
    assert "error" not in r, r
    assert r["finished"] == r["submitted"] and r["lost"] == 0, r
    assert r["duplicated"] == 0, r
    assert r["unrecorded_calls"] == 0, r
    return r


@pytest.mark.parametrize("name", ["net_worker_redis_cut", "net_worker_pg_cut", "net_slow_links", "net_resets",
                                  "net_submitter_redis_cut", "net_submitter_pg_cut"])
def test_a_cut_or_a_bad_link_loses_nothing_and_calls_nothing_twice(lab, name):
    r = run(lab, name)
    # the worker was cut for less than STALE_AFTER: its leases held, nobody called its jobs again
    assert r["duplicate_model_calls"] == 0, r
    assert r["calls_started_not_finished"] == 0, r


def test_a_partition_healing_after_the_sweepers_resend(lab):
    r = run(lab, "net_heal_after_resend")
    # cut from the database longer than its lease: the other t1 worker re-sent and ran its
    # jobs (a duplicate call where the lease expired, no more than were in flight at the cut)
    assert r["duplicate_model_calls"] <= THREADS * lab.cfg.chunk, r
    # and once healed, the cut worker's calls were recorded (late): none left unknown
    assert r["calls_started_not_finished"] == 0, r


@pytest.mark.parametrize("name", ["net_api_redis_cut", "net_api_pg_cut"])
def test_the_api_cut_off_while_clients_submit(lab, name):
    r = run(lab, name)
    api = r["api"]
    # every request ended accepted (after 503s and retries with the same key), one job per key, all finished
    assert api["accepted"] == api["requests"] == api["distinct_jobs"] == api["jobs_finished"], r
    assert not {k for k in api["answers"] if k.startswith("5") and k != "503"}, r  # no 500s
    # (a cut shorter than tcp_user_timeout, 30 s, is ridden out by TCP: the request in flight
    # is answered late, not 503; the 503 itself: tests/api/test_api_outage.py)


def test_a_tiers_host_gone_then_a_replacement(lab):
    r = run(lab, "net_host_gone")
    assert r["after_fault_s"] <= 120, r  # finished within 2 minutes of the replacement's start
