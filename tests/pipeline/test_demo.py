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
    chain = ["tiny", "small", "medium"]
    for r in cascade:
        assert r["status"] == "succeeded"
        tiers = [a["tier"] for a in r["attempts"]]
        # the pre-call router picks where a question starts; from there it climbs the chain in order
        start = chain.index(tiers[0])
        assert tiers == chain[start:start + len(tiers)] and r["final_tier"] == tiers[-1]
        assert all(a["latency_ms"] > 0 and "logprob" in a["signals"] for a in r["attempts"])
    assert all([a["tier"] for a in r["attempts"]] == ["medium"] for r in medium)


@pytest.mark.models
def test_demo_json_line_holds_the_ratios_of_the_run_it_ends(tmp_path):
    from worker.cli import cli

    out = tmp_path / "table.txt"
    res = CliRunner().invoke(cli, ["demo", "--n", "4", "--seed", "5", "--out", str(out), "-q", "--json"])
    assert res.exit_code == 0, res.output
    last = json.loads(res.output.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.with_suffix(".jobs.jsonl").read_text().splitlines()]
    runs = {name: [r for r in rows if r["run"] == name] for name in ("cascade", "always-medium")}
    right = {k: sum(r["correct"] for r in v) for k, v in runs.items()}
    ms = {k: sum(a["latency_ms"] for r in v for a in r["attempts"]) for k, v in runs.items()}
    assert last["n"] == 4 and last["cascade"]["correct"] == right["cascade"]
    assert last["always_top"]["correct"] == right["always-medium"]
    if right["always-medium"]:
        assert last["accuracy_kept"] == pytest.approx(right["cascade"] / right["always-medium"])
    assert last["model_time_ratio"] == pytest.approx(ms["cascade"] / ms["always-medium"])
    c, t = last["cascade"], last["always_top"]
    assert c["serve_s"] > 0 and t["serve_s"] > 0 and c["start_s"] > 0
    assert last["wall_time_ratio"] == pytest.approx(c["serve_s"] / t["serve_s"])
    assert sum(c["answered"].values()) == 4 and c["calls"]["medium"] <= 4


def test_demo_figures_are_cascade_over_always_top():
    from worker.labwork.demo_report import figures

    def run(correct, ms, cost, tiers):
        return {"n": 10, "correct": correct, "accuracy": correct / 10, "ms": ms, "cost": cost,
                "tiers": {t: {"accepted": a, "calls": c} for t, (a, c) in tiers.items()}}

    cascade = run(9, 3000.0, 0.5, {"small": (6, 10), "medium": (4, 4)})
    top = run(10, 6000.0, 1.0, {"medium": (10, 10)})
    f = figures(cascade, top, {"cascade": {"start": 2.0, "serve": 4.0}, "top": {"start": 1.0, "serve": 8.0}})
    assert f["accuracy_kept"] == pytest.approx(0.9) and f["model_time_ratio"] == pytest.approx(0.5)
    assert f["wall_time_ratio"] == pytest.approx(0.5) and f["wall_time_ratio_with_loading"] == pytest.approx(6 / 9)
    assert f["cost_ratio_configured"] == pytest.approx(0.5)
    assert f["cascade"]["answered"] == {"small": 6, "medium": 4} and f["always_top"]["model_time_s"] == 6.0
    assert json.loads(json.dumps(f)) == f
    assert "accuracy_kept" not in figures(cascade, None, {"cascade": {"start": 2.0, "serve": 4.0}})


def test_demo_reports_unprepared_models_with_the_fix(tmp_path, monkeypatch):
    from worker.cli import cli
    from worker.config.settings import get_settings

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
