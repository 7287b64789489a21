"""Risk-controlled tuning from the command line: `cascade tune --risk-bound`,
`cascade evaluate --risk-bound` and `cascade bench risk`."""
from __future__ import annotations

import json
import random

from click.testing import CliRunner
from helpers.env import BENCH

from worker.cli.bench_cmd import bench
from worker.cli.evaluate_cmd import evaluate
from worker.cli.tune_cmd import tune

TRIVIA = BENCH / "rc-triviaqa.jsonl.gz"


def run(cmd, *args):
    return CliRunner().invoke(cmd, [str(a) for a in args])


def test_tune_certifies_a_cascade_and_states_the_guarantee(tmp_path):
    out = tmp_path / "p.json"
    r = run(tune, "--data", TRIVIA, "--policy", "threshold", "--risk-bound", "0.03", "--delta", "0.1", "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    rc = doc["fitted"]["search"]["risk_control"]
    assert rc["alpha"] == 0.03 and rc["delta"] == 0.1 and rc["procedure"] == "fixed-sequence"
    assert doc["params"]["chain"][-1] == rc["reference"] and len(doc["params"]["chain"]) > 1
    assert rc["p_value"] <= 0.1 and rc["upper_bound"] <= 0.03
    assert "with probability >= 0.9" in r.output and "exchangeable" in r.output
    assert "rows: even a cascade with no loss needs 76 calibration rows" in r.output


def test_a_bound_the_rows_cannot_support_falls_back_to_the_reference_and_says_how_many_rows(tmp_path):
    out = tmp_path / "p.json"
    r = run(tune, "--data", TRIVIA, "--policy", "threshold", "--risk-bound", "0.01", "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert len(doc["params"]["chain"]) == 1
    assert "no cascade cheaper than" in r.output and "the reference model alone is used" in r.output
    assert "needs 230 calibration rows to certify 0.01" in r.output


def test_automix_with_nothing_certified_falls_back_to_the_reference_policy(tmp_path):
    out = tmp_path / "p.json"
    r = run(tune, "--data", TRIVIA, "--policy", "automix", "--risk-bound", "0.03", "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    rc = doc["fitted"]["search"]["risk_control"]
    assert rc["path"] >= 1 and rc["certified"] == 0 and rc["chosen"] == "reference alone"
    assert doc["name"] == "single" and doc["params"] == {"tier": rc["reference"]}


def test_too_few_rows_name_the_count(tmp_path):
    rng = random.Random(0)
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "p", "split": "train", "responses": {
        m: {"text": "a", "correct": float(rng.random() < acc), "cost_usd": cost, "logprob": -rng.random()}
        for m, acc, cost in (("s", 0.6, 1.0), ("l", 0.9, 10.0))}}) + "\n" for i in range(40)))
    r = run(tune, "--data", data, "--policy", "threshold", "--risk-bound", "0.05", "--out", tmp_path / "p.json")
    assert r.exit_code == 1
    assert "40 rows split at learn fraction 0.33 give 13 and 27" in r.output
    r = run(tune, "--data", data, "--policy", "logistic-router", "--risk-bound", "0.05", "--out", tmp_path / "p.json")
    assert r.exit_code == 1 and "policy 'logistic-router' has no risk-controlled tuner" in r.output


def test_evaluate_reports_the_test_loss_beside_the_bound():
    r = run(evaluate, "--data", TRIVIA, "--policy", "threshold", "--risk-bound", "0.03", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.splitlines()[-1])
    e = next(p for p in res["policies"] if p["name"] == "threshold-ltt")
    rk = e["risk"]
    assert rk["alpha"] == 0.03 and rk["certified"] and 0.0 <= rk["test_loss"] <= 1.0
    assert rk["within_bound"] == (rk["test_loss"] <= 0.03)
    assert "threshold-ltt: loss against" in r.output


def test_bench_risk_prints_the_exceedance_share_and_delta():
    r = run(bench, "risk", "--data", TRIVIA, "--resplits", "10", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.splitlines()[-1])["results"][0]
    assert res["resplits"] == 10 and res["train_rows"] == 300 and res["test_rows"] == 1000
    assert res["holds"] == (res["exceed_share"] <= res["delta"])
    assert "exceed" in r.output and "delta" in r.output
