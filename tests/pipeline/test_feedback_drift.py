"""Production feedback and drift, on the real PostgreSQL: a tuned policy file
records its tuning distributions; `cascade status --drift` stays quiet on traffic
like the tuning rows and warns on harder traffic; `cascade feedback` stores grades
and exports them in the benchmarks format."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.env import REPO

from router.core.records import load_dataset

MODELS = ["gpt-4o-mini", "llama3.1-70b", "llama3.1-405b"]


def cascade(*args, env: dict[str, str], check=True):
    p = subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"cascade {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def _env(pg_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update({"CASCADE_DATABASE_URL": pg_url, "CASCADE_HOME": str(home)})
    return env


def _items(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_drift_and_feedback_round_trip(bench, pg_url, tmp_path):
    env = _env(pg_url, tmp_path / "home")
    data = bench / "rc-triviaqa.jsonl.gz"
    policy = tmp_path / "policy.json"
    cascade("tune", "--data", str(data), "--policy", "threshold", "--chain", ",".join(MODELS), "--match-best",
            "--out", str(policy), env=env)
    ref = json.loads(policy.read_text())["fitted"]["reference"]
    assert ref["rows"] == 300 and ref["tiers"]["gpt-4o-mini"]["reached"] == 300
    portfolio = tmp_path / "p.toml"
    portfolio.write_text(f'[policy]\nfile = "{policy}"\n' + "".join(
        f'[[tiers]]\nname = "{m}"\nbackend = {{ kind = "replay", file = "{data}", model = "{m}" }}\n' for m in MODELS))

    ds = load_dataset(data)
    test = ds.split("test")
    # traffic like the tuning rows: a random sample of the test split
    rng = np.random.default_rng(0)
    like = [test[i] for i in sorted(rng.choice(len(test), 400, replace=False))]
    cascade("run", str(_items(like, tmp_path / "like.jsonl")), "--portfolio", str(portfolio), "--batch", "like",
            "--quiet", env=env)
    quiet = cascade("status", "like", "--drift", str(policy), env=env).stdout
    assert "WARNING drift" not in quiet and "drift: no tier moved beyond what sampling explains" in quiet

    # harder traffic: the questions the cheapest tier is least sure of
    hard = sorted(test, key=lambda r: r.responses[MODELS[0]].p_true)[:300]
    cascade("run", str(_items(hard, tmp_path / "hard.jsonl")), "--portfolio", str(portfolio), "--batch", "hard",
            "--quiet", env=env)
    warned = cascade("status", "hard", "--drift", str(policy), env=env).stdout
    assert "WARNING drift: tier gpt-4o-mini accept rate" in warned
    assert "WARNING drift: tier gpt-4o-mini confidence" in warned
    assert "re-tune on live traffic with `cascade retune --portfolio PORTFOLIO`" in warned  # the command to run
    assert "cascade retune" not in quiet
    js = json.loads(cascade("status", "hard", "--drift", str(policy), "--json", env=env).stdout)
    assert js["drift"]["drifted"] is True

    # feedback: grades by item id, stored, exported in the benchmarks format
    graded = like[:50]
    grades = tmp_path / "grades.jsonl"
    grades.write_text("".join(json.dumps({"id": r.id, "correct": 1.0 - r.responses[MODELS[-1]].correct,
                                          "gold": "g", "tiers": {m: r.responses[m].correct for m in MODELS}}) + "\n"
                              for r in graded))
    assert "recorded 50 grade(s)" in cascade("feedback", "add", "like", "--file", str(grades), env=env).stdout
    out = tmp_path / "export.jsonl.gz"
    assert "wrote 50 graded row(s)" in cascade("feedback", "export", "like", "--out", str(out), env=env).stdout
    exported = load_dataset(out)
    assert len(exported.records) == 50 and set(exported.models) <= set(MODELS)
    by_id = {r.id: r for r in graded}
    results = {json.loads(line)["id"]: json.loads(line)
               for line in (tmp_path / "home" / "like.results.jsonl").read_text().splitlines()}
    for row in exported.records:
        src = by_id[row.id]
        final = results[row.id]["final_tier"]
        for m, resp in row.responses.items():
            if resp.text is None:
                continue  # a tier this job never called
            want = 1.0 - src.responses[MODELS[-1]].correct if m == final else src.responses[m].correct
            assert resp.correct == want
            assert resp.p_true == src.responses[m].p_true
    # a re-grade replaces the earlier one
    cascade("feedback", "add", "--job", _job_of(env, "like", graded[0].id), "--correct", "1", env=env)
    again = {r.id: r for r in load_dataset(_export(env, tmp_path)).records}
    first = again[graded[0].id]
    assert first.responses[results[graded[0].id]["final_tier"]].correct == 1.0


def _job_of(env, batch, item) -> str:
    from sqlalchemy import create_engine, text

    eng = create_engine(env["CASCADE_DATABASE_URL"])
    with eng.connect() as c:
        job = c.execute(text("select id from jobs where batch_id = :b and item_key = :k"), {"b": batch, "k": item}).scalar()
    eng.dispose()
    return job


def _export(env, tmp_path) -> Path:
    out = tmp_path / "again.jsonl"
    cascade("feedback", "export", "like", "--out", str(out), env=env)
    return out


def test_bad_grades_name_the_line(bench, pg_url, tmp_path):
    env = _env(pg_url, tmp_path / "home")
    data = bench / "rc-triviaqa.jsonl.gz"
    portfolio = tmp_path / "p.toml"
    portfolio.write_text('[policy]\nname = "single"\ntier = "a"\n'
                         f'[[tiers]]\nname = "a"\nbackend = {{ kind = "replay", file = "{data}", model = "gpt-4o" }}\n')
    rows = load_dataset(data).split("test")[:5]
    cascade("run", str(_items(rows, tmp_path / "in.jsonl")), "--portfolio", str(portfolio), "--batch", "b",
            "--quiet", env=env)
    cases = [
        (json.dumps({"id": rows[0].id, "correct": 2}), "grades.jsonl: line 1: a grade must be a number in [0, 1]"),
        (json.dumps({"id": "nope", "correct": 1}), "grades.jsonl: line 1: item 'nope' is not in batch 'b'"),
        (json.dumps({"id": rows[0].id}), "grades.jsonl: line 1: missing field 'correct'"),
        ("{bad", "grades.jsonl: line 1: not valid JSON"),
    ]
    for text, message in cases:
        (tmp_path / "grades.jsonl").write_text(text + "\n")
        p = cascade("feedback", "add", "b", "--file", str(tmp_path / "grades.jsonl"), env=env, check=False)
        assert p.returncode == 1 and message in p.stderr, p.stderr
    p = cascade("feedback", "export", "b", "--out", str(tmp_path / "x.jsonl"), env=env, check=False)
    assert p.returncode == 1 and "has no graded jobs" in p.stderr
