"""`cascade demo` end to end on a few questions: real models, embedded Celery workers."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


@pytest.mark.models
def test_demo_runs_the_cascade_and_the_baseline_and_writes_the_table(tmp_path):
    from worker.cli import cli

    out = tmp_path / "table.txt"
    res = CliRunner().invoke(cli, ["demo", "--n", "5", "--seed", "3", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "cascade vs always medium" in text and "SmolLM2-135M-Instruct" in text
    for tier in ("tiny", "small", "medium", "always medium"):
        assert tier in text
    rows = [json.loads(line) for line in out.with_suffix(".jobs.jsonl").read_text().splitlines()]
    cascade = [r for r in rows if r["run"] == "cascade"]
    medium = [r for r in rows if r["run"] == "always-medium"]
    assert len(cascade) == len(medium) == 5
    for r in cascade:
        assert r["status"] == "succeeded"
        assert r["attempts"][0]["tier"] == "tiny"
        assert all(a["latency_ms"] > 0 and "logprob" in a["signals"] for a in r["attempts"])
    assert all([a["tier"] for a in r["attempts"]] == ["medium"] for r in medium)


def test_demo_reports_unprepared_models_with_the_fix(tmp_path, monkeypatch):
    from worker.cli import cli
    from worker.settings import get_settings

    monkeypatch.setenv("CASCADE_MODEL_CACHE", str(tmp_path / "empty"))
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(cli, ["demo", "--n", "2"])
    finally:
        get_settings.cache_clear()
    assert res.exit_code != 0
    assert "cascade models prepare" in res.output and str(tmp_path / "empty") in res.output


def test_demo_rejects_an_unknown_tier():
    from worker.cli import cli

    res = CliRunner().invoke(cli, ["demo", "--chain", "tiny,huge"])
    assert res.exit_code != 0 and "unknown tier 'huge'" in res.output


def test_demo_rejects_a_threshold_for_a_tier_outside_the_chain():
    from worker.cli import cli

    res = CliRunner().invoke(cli, ["demo", "--threshold", "medium=-1"])
    assert res.exit_code != 0 and "thresholds are for the tiers before the last" in res.output
