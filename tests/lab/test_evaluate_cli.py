"""`cascade evaluate` and `cascade tune` end to end: output format, the shared
benchmark files, reports, and bad input (clear errors or documented handling)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.env import BENCH

from worker.cli.evaluate_cmd import evaluate
from worker.cli.tune_cmd import tune

DATA = BENCH


def run(cmd, *args: str):
    return CliRunner().invoke(cmd, [str(a) for a in args])


def last_json(output: str) -> dict:
    return json.loads(output.rstrip("\n").splitlines()[-1])


def make_rows(n_train: int = 40, n_test: int = 40, seed: int = 0, split: bool = True) -> list[dict]:
    """Three models whose logprob is informative about their correctness."""
    rng = random.Random(seed)
    spec = {"s": (0.55, 1.0, 10.0), "m": (0.7, 3.0, 20.0), "l": (0.85, 12.0, 90.0)}
    rows = []
    for i in range(n_train + n_test):
        resp = {}
        for m, (p, cost, lat) in spec.items():
            right = rng.random() < p
            conf = -rng.random() * (0.3 if right else 2.0)
            resp[m] = {"text": "a", "correct": float(right), "cost_usd": cost, "latency_ms": lat, "logprob": conf}
        sp = ("train" if i < n_train else "test") if split else "test"
        rows.append({"id": f"q{i}", "prompt": f"question {i}", "split": sp, "responses": resp})
    return rows


def write(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw_lines or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the shared benchmark files ------------------------------------------------------
def test_evaluate_rc_mmlu_json():
    r = run(evaluate, "--data", DATA / "rc-mmlu.jsonl.gz", "--policy", "threshold", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r.output)
    assert {"data", "split", "best_single", "oracle", "policies"} <= set(res)
    assert res["data"] == "rc-mmlu.jsonl.gz"
    assert res["split"] == {"mode": "train/test", "train": 285, "test": 1531}
    # the README's reference rows
    assert res["best_single"]["name"] == "llama3.1-405b"
    assert res["best_single"]["accuracy"] == pytest.approx(0.8517, abs=5e-5)
    assert res["best_single"]["cost"] == pytest.approx(0.000574, rel=1e-3)
    assert res["oracle"]["accuracy"] == pytest.approx(0.9693, abs=5e-5)
    assert res["oracle"]["cost"] == pytest.approx(4.02e-05, rel=2e-3)
    names = [p["name"] for p in res["policies"]]
    assert names == ["threshold", "threshold-3plus", "threshold-2tier", "random"]
    for p in res["policies"]:
        assert p["applicable"] and p["parity"]["reachable"]
        par = p["parity"]
        assert set(par) >= {"accuracy", "accuracy_delta", "cost", "cost_ratio", "calls", "params"}
        assert par["accuracy_delta"] == pytest.approx(par["accuracy"] - res["best_single"]["accuracy"], abs=1e-5)
        assert 0 < p["aiq"] < 1
        assert len(p["frontier"]) >= 20
        assert all({"cost", "accuracy", "target_cost", "params"} <= set(pt) for pt in p["frontier"])
    three = res["policies"][1]["parity"]["params"]["chain"]
    assert 3 <= len(three) <= 4
    assert len(res["policies"][2]["parity"]["params"]["chain"]) == 2
    assert "parity" in r.output and "threshold-3plus" in r.output


def test_evaluate_routellm_file_without_costs_or_confidences():
    r = run(evaluate, "--data", DATA / "routellm-gsm8k.jsonl.gz", "--policy", "threshold", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r.output)
    assert res["split"]["mode"] == "5-fold cross-fitting" and res["split"]["rows"] == 1319
    assert "5-fold cross-fitting" in r.output
    assert res["cost_unit"] == "strong_calls"
    assert res["best_single"] == {"name": "gpt-4-1106-preview", "accuracy": pytest.approx(0.8567, abs=5e-5), "cost": 1.0}
    by = {p["name"]: p for p in res["policies"]}
    for name in ("threshold", "threshold-3plus", "threshold-2tier"):
        assert by[name]["applicable"] is False and "no confidence" in by[name]["reason"]
        assert by[name]["apgr"] is None and by[name]["aiq"] is None
    rnd = by["random"]
    assert rnd["applicable"] and 0.4 < rnd["apgr"] < 0.6
    assert rnd["cpt50"] is not None and rnd["cpt80"] is not None
    assert "not applicable" in r.output


def test_evaluate_with_report(tmp_path):
    data = write(tmp_path / "mine.jsonl", make_rows())
    r = run(evaluate, "--data", data, "--policy", "all", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    png, page = tmp_path / "rep" / "mine.png", tmp_path / "rep" / "mine.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert 'src="mine.png"' in html and "best single" in html and "threshold-2tier" in html
    assert "report:" in r.output


# -- tune -------------------------------------------------------------------------------
def test_tune_writes_a_policy_file(tmp_path):
    data = write(tmp_path / "mine.jsonl", make_rows())
    out = tmp_path / "p.json"
    r = run(tune, "--data", data, "--policy", "threshold", "--budget", "6", "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["name"] == "threshold" and set(doc["params"]) == {"signal", "thresholds", "chain"}
    f = doc["fitted"]
    assert f["target"] == {"kind": "budget", "value": 6.0} and f["train_rows"] == 40 and f["train_cost"] <= 6
    assert f["data"].endswith("mine.jsonl")
    r = run(tune, "--data", data, "--policy", "threshold", "--budget", "6", "--match-best", "--out", out)
    assert r.exit_code != 0 and "exactly one" in r.output


def test_tune_unreachable_target(tmp_path):
    data = write(tmp_path / "mine.jsonl", make_rows())
    r = run(tune, "--data", data, "--policy", "threshold", "--target-accuracy", "0.999", "--out", tmp_path / "p.json")
    assert r.exit_code == 1
    assert "target accuracy 0.9990 is not reachable" in r.output and "highest it reaches" in r.output
    assert not (tmp_path / "p.json").exists()


def test_no_train_split(tmp_path):
    data = write(tmp_path / "onlytest.jsonl", make_rows(split=False))
    r = run(tune, "--data", data, "--policy", "single", "--match-best", "--out", tmp_path / "p.json")
    assert r.exit_code == 1 and "no 'train' rows to fit on (splits: test)" in r.output and "--fit-split all" in r.output
    r = run(tune, "--data", data, "--policy", "single", "--match-best", "--fit-split", "all", "--out", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    r = run(evaluate, "--data", data, "--policy", "single", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r.output)
    assert res["split"]["mode"] == "5-fold cross-fitting" and res["split"]["rows"] == 80
    assert "cross-fitting" in r.output


# -- bad input ----------------------------------------------------------------------------
def test_missing_field_names_file_line_and_field(tmp_path):
    rows = make_rows()
    del rows[4]["responses"]
    r = run(evaluate, "--data", write(tmp_path / "bad.jsonl", rows))
    assert r.exit_code == 1 and "bad.jsonl:5: missing field 'responses'" in r.output
    rows = make_rows()
    rows[2]["responses"]["m"]["correct"] = "yes"
    r = run(evaluate, "--data", write(tmp_path / "bad2.jsonl", rows))
    assert r.exit_code == 1 and "bad2.jsonl:3: responses['m']: correct must be a number or null" in r.output


def test_a_score_outside_0_1_drops_its_row_with_a_counted_reason(tmp_path):
    # one metric of -0.033 in a file used to refuse the whole file; like a missing score, it drops its row
    rows = make_rows()
    rows[4]["responses"]["m"]["correct"] = -0.033
    rows[9]["responses"]["m"]["correct"] = 1.5
    rows[7]["responses"]["m"]["correct"] = "@@"
    line = json.dumps(rows[7]).replace('"@@"', "NaN")
    r = run(evaluate, "--data", write(tmp_path / "bad-scores.jsonl", rows, {7: line}), "--policy", "single", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r.output)
    assert res["rows"]["dropped"] == 3 and res["rows"]["scored"] == 77
    assert res["rows"]["dropped_reasons"] == {"`correct` outside [0, 1] for model 'm'": {"rows": 3, "first_line": 5}}
    assert "rows dropped: 3 (`correct` outside [0, 1] for model 'm'; first on line 5)" in r.output


def test_nan_and_infinite_confidences_are_absent_and_reported(tmp_path):
    rows = make_rows()
    raw = {}
    for i, tok in ((3, "NaN"), (5, "Infinity"), (41, "-Infinity"), (50, "NaN")):
        rows[i]["responses"]["s"]["logprob"] = "@@"
        raw[i] = json.dumps(rows[i]).replace('"@@"', tok)
    r = run(evaluate, "--data", write(tmp_path / "nanconf.jsonl", rows, raw), "--policy", "threshold", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r.output)
    assert res["confidence_missing"] == {"s": 4}
    assert "confidence absent/NaN/inf (the cascade escalates): s 4" in r.output
    assert all(p["applicable"] for p in res["policies"])


def test_model_in_some_rows_only(tmp_path):
    rows = make_rows()
    for i in (2, 9, 60):
        del rows[i]["responses"]["m"]
    r = run(evaluate, "--data", write(tmp_path / "partial.jsonl", rows), "--policy", "single", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r.output)
    assert res["rows"]["dropped"] == 3 and res["rows"]["scored"] == 77
    assert res["rows"]["dropped_reasons"] == {"model 'm' absent from the row": {"rows": 3, "first_line": 3}}
    assert "rows dropped: 3 (model 'm' absent from the row; first on line 3)" in r.output
    # a model missing from most rows: an error naming it, unless it is left out
    rows = make_rows()
    for i in range(50):
        del rows[i]["responses"]["l"]
    data = write(tmp_path / "sparse.jsonl", rows)
    r = run(evaluate, "--data", data)
    assert r.exit_code == 1 and "model 'l' absent from the row (50 rows, first on line 1)" in r.output
    assert "--models" in r.output
    r = run(evaluate, "--data", data, "--models", "s,m", "--policy", "single", "--json")
    assert r.exit_code == 0, r.output
    assert [s["name"] for s in last_json(r.output)["singles"]] == ["s", "m"]


def test_mixed_costs_are_an_error(tmp_path):
    rows = make_rows()
    rows[11]["responses"]["l"]["cost_usd"] = None
    r = run(evaluate, "--data", write(tmp_path / "mixed.jsonl", rows))
    assert r.exit_code == 1
    assert "cost_usd is recorded for 79 of 80 rows of model 'l' (first missing on line 12)" in r.output


def test_unknown_policy_and_model(tmp_path):
    data = write(tmp_path / "mine.jsonl", make_rows())
    r = run(evaluate, "--data", data, "--policy", "treshold")
    assert r.exit_code == 1 and "did you mean 'threshold'" in r.output
    r = run(evaluate, "--data", data, "--models", "s,xl")
    assert r.exit_code == 1 and "['xl'] are not in the file" in r.output
    r = run(evaluate, "--data", tmp_path / "nope.jsonl")
    assert r.exit_code == 1 and "no such data file" in r.output


def test_json_output_has_no_nan(tmp_path):
    r = run(evaluate, "--data", write(tmp_path / "mine.jsonl", make_rows()), "--json")
    assert r.exit_code == 0, r.output
    line = r.output.rstrip("\n").splitlines()[-1]
    assert "NaN" not in line and "Infinity" not in line

    def walk(x):
        if isinstance(x, float):
            assert math.isfinite(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(line))
