"""Decisions taken without a signal the policy reads (meta.missing_signals, written by
the stage) counted per tier in `cascade status` and in a batch's summary (the batch
view of the Python client, and GET /v1/batches/{id} under `cascade`), with a warning
above 1%; on SQLite and on PostgreSQL (the store's two JSON queries). The server
without log-probs is a canned one (fault injection), as in test_signal_preflight."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from helpers.servers import CannedServer

from router.core.portfolio import parse_portfolio
from worker.config.settings import Settings, get_settings
from worker.queue.run import run_batch
from worker.service.api import create_app
from worker.service.client import Client
from worker.service.views import signal_gap_view

WITH = {"choices": [{"message": {"role": "assistant", "content": "Yes"}, "finish_reason": "stop",
                     "logprobs": {"content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": [
                         {"token": "Yes", "logprob": -0.1}]}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
WITHOUT = {"choices": [{"message": {"role": "assistant", "content": "4"}, "finish_reason": "stop", "logprobs": None}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
ITEMS = [{"id": f"q{i}", "prompt": f"{i}+{i}?"} for i in range(3)]


def portfolio(cheap_url: str, top_url: str):
    return parse_portfolio({"policy": {"name": "threshold", "signal": "min_logprob"}, "tiers": [
        {"name": "cheap", "threshold": -1.0, "backend": {"kind": "openai", "base_url": cheap_url, "model": "m"}},
        {"name": "top", "backend": {"kind": "openai", "base_url": top_url, "model": "m"}}]}, where="test")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def settings(request, tmp_path):
    # the cheap server sends no log-probs: its workers start degraded on purpose (the preflight refuses it else)
    if request.param == "sqlite":
        yield Settings(broker_url=None, database_url=None, home=tmp_path, allow_missing_signals=True)
    else:
        pg_url = request.getfixturevalue("pg_url")
        yield Settings(broker_url=None, database_url=pg_url, home=tmp_path, allow_missing_signals=True)


@pytest.fixture
def two_batches(settings):
    """Batch `miss`: its cheap tier's server sends no log-probs (every decision there
    without its signal); batch `fine`: both servers send them."""
    with CannedServer(WITHOUT) as bare, CannedServer(WITH) as good:
        run_batch(ITEMS, portfolio(bare.base_url, good.base_url), settings=settings, batch_id="miss",
                  progress=False, timeout=60)
        run_batch(ITEMS, portfolio(good.base_url, good.base_url), settings=settings, batch_id="fine",
                  progress=False, timeout=60)
    return settings


def status(settings: Settings, monkeypatch, *args: str) -> str:
    from worker.cli import cli  # deferred: the CLI reads the environment set just above, through get_settings

    monkeypatch.setenv("CASCADE_HOME", str(settings.home))
    monkeypatch.delenv("CASCADE_BROKER_URL", raising=False)
    if settings.database_url:
        monkeypatch.setenv("CASCADE_DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("CASCADE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        r = CliRunner().invoke(cli, ["status", *args])
    finally:
        get_settings.cache_clear()
    assert r.exit_code == 0, r.output
    return r.output


def test_cascade_status_counts_decisions_without_their_signal_per_tier_and_warns(two_batches, monkeypatch):
    out = status(two_batches, monkeypatch, "miss")
    print(out)
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert rows["cheap"].rstrip().endswith("3 (100.0%)") and rows["top"].rstrip().endswith("0 (0.0%)")
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "tier cheap: 3 of 3 decisions (100.0%) were taken without a signal" in warnings[0]
    fine = status(two_batches, monkeypatch, "fine")
    assert "WARNING" not in fine and "0 (0.0%)" in fine
    js = json.loads(status(two_batches, monkeypatch, "miss", "--json"))
    assert {t["tier"]: t["without_signal"] for t in js["tiers"]} == {"cheap": 3, "top": 0} and len(js["warnings"]) == 1
    overall = status(two_batches, monkeypatch)  # the recent batches: 3 of 6 decisions at cheap
    assert "decisions taken without their signal (the batches above): cheap 3/6 (50.0%), top 0/3" in overall
    assert "WARNING tier cheap: 3 of 6 decisions (50.0%)" in overall


def test_a_batch_summary_counts_decisions_without_their_signal_and_warns(two_batches):
    with Client(two_batches) as c:
        miss, fine = c.batch("miss"), c.batch("fine")
        with TestClient(create_app(two_batches, client=c)) as http:
            obj = http.get("/v1/batches/miss").json()
    assert miss["missing_signals"] == {"cheap": {"decisions": 3, "without_signal": 3, "share": 1.0},
                                       "top": {"decisions": 3, "without_signal": 0, "share": 0.0}}
    assert len(miss["warnings"]) == 1 and miss["warnings"][0].startswith("tier cheap: 3 of 3 decisions (100.0%)")
    assert fine["missing_signals"]["cheap"] == {"decisions": 3, "without_signal": 0, "share": 0.0}
    assert fine["warnings"] == []
    assert obj["object"] == "batch" and obj["cascade"]["missing_signals"] == miss["missing_signals"]
    assert obj["cascade"]["warnings"] == miss["warnings"]


def test_the_warning_starts_above_one_percent():
    assert signal_gap_view({"t": {"decisions": 100, "without": 1}})[1] == []
    view, warnings = signal_gap_view({"t": {"decisions": 1000, "without": 11}})
    assert view["t"]["share"] == pytest.approx(0.011) and len(warnings) == 1
