"""`cascade retune`, `cascade policy ...` on the real PostgreSQL (embedded workers):
live jobs labelled by grades and by agreement with the top tier (an audit sends a
share of the early-stopped ones through every tier, under its cap), a candidate
stored and compared in shadow, promoted after the signal check, rolled back; bad
input named."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.env import REPO
from helpers.portfolios import write_portfolio

from router.core.records import load_dataset

pytestmark = pytest.mark.services

MODELS = ["llama3.2-3b", "llama3.1-70b", "llama3.1-405b"]


def cascade(env, *args, check=True):
    p = subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"cascade {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def live(bench, pg_url, tmp_path):
    """A 3-tier replay portfolio and 300 live jobs run through it (embedded, on PostgreSQL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update({"CASCADE_DATABASE_URL": pg_url, "CASCADE_HOME": str(tmp_path / "home")})
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    rows = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")[:300]
    traffic = tmp_path / "live.jsonl"
    traffic.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in rows))
    cascade(env, "run", str(traffic), "--portfolio", str(path), "--batch", "live", "--quiet")
    return env, path, rows


def test_retune_shadow_promote_rollback(live, tmp_path):
    env, path, rows = live
    p = ["--portfolio", str(path)]
    # grades for 40 jobs: every tier's true correctness
    grades = tmp_path / "grades.jsonl"
    grades.write_text("".join(json.dumps({"id": r.id, "correct": r.responses[MODELS[-1]].correct,
                                          "tiers": {f"t{i}": r.responses[m].correct for i, m in enumerate(MODELS)}})
                              + "\n" for r in rows[:40]))
    cascade(env, "feedback", "add", "live", "--file", str(grades))

    out = cascade(env, "retune", *p, "--audit-share", "0.5", "--audit-max-usd", "0.02", "--json")
    r = json.loads(out.stdout)
    log = out.stderr
    assert r["version"] == 2 and r["from_version"] == 1 and r["policy"]["name"] == "threshold"
    assert "audit:" in log and "sent through every tier" in log
    assert "tier label(s) from grades" in log and "0 tier label(s) from grades" not in log
    spent = float(log.split("audit: ")[-1].split("): $")[1].split(" ")[0])
    assert 0 < spent <= 0.02 * 1.5  # the cap holds (the jobs in flight when it was reached may finish)
    sh = r["shadow"]
    assert sh["version"] == 2 and sh["live_version"] == 1 and sh["compared"] > 0
    assert sh["fitted_on"] > 0 and 0 <= sh["candidate_accuracy"] <= 1 and sh["candidate_cost"] > 0

    listed = cascade(env, "policy", "list", *p).stdout.splitlines()
    assert listed[0].split()[:3] == ["1", "promoted", "portfolio"]
    assert listed[1].split()[:3] == ["2", "candidate", "retune"] and "shadow on" in listed[1]
    text = cascade(env, "policy", "shadow", "2", *p).stdout
    assert "shadow: version 2 against the promoted version 1" in text and "cost ratio" in text

    promoted = cascade(env, "policy", "promote", "2", *p)
    assert "promoted version 2 (was 1)" in promoted.stdout and "check: skipped" in promoted.stderr
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in rows[:20]))
    cascade(env, "run", str(more), *p, "--batch", "after", "--quiet")
    st = json.loads(cascade(env, "status", "after", "--json").stdout)
    assert [v["version"] for v in st["policy_versions"]] == [2] and st["policy_versions"][0]["accept"] == 20
    assert "version 1 promoted again (was 2)" in cascade(env, "policy", "rollback", *p).stdout
    assert cascade(env, "policy", "list", *p).stdout.splitlines()[1].split()[:2] == ["2", "retired"]


def test_bad_input_is_named(live, tmp_path):
    env, path, _ = live
    p = ["--portfolio", str(path)]

    def fails(*args) -> str:
        got = cascade(env, *args, check=False)
        assert got.returncode == 1, (got.stdout, got.stderr)
        return got.stderr

    assert "no policy version 7 for this portfolio; versions: 1" in fails("policy", "promote", "7", *p)
    assert "no policy version 7 for this portfolio" in fails("policy", "shadow", "7", *p)
    assert "nothing to roll back to" in fails("policy", "rollback", *p)
    assert "fewer than 100000" in fails("retune", *p, "--min-rows", "100000")

    # a version reading a signal the replay tiers cannot give: refused at promotion, nothing changes
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "threshold", "params": {"signal": "mean_logprob",
                                                                "thresholds": {"t0": -0.3, "t1": -0.2}}}))
    assert "stored candidate version 2" in cascade(env, "policy", "add", *p, "--file", str(bad)).stdout
    err = fails("policy", "promote", "2", *p)
    assert "version 2 not promoted" in err and "mean_logprob" in err and "'t0'" in err
    assert cascade(env, "policy", "list", *p).stdout.splitlines()[0].split()[:2] == ["1", "promoted"]
    assert "version 1 is already the promoted one" in fails("policy", "promote", "1", *p)

    # a policy that does not fit the portfolio's tiers is not stored
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": "threshold", "params": {"chain": ["t0", "t7"], "thresholds": {"t0": 0}}}))
    assert "wrong.json: does not fit this portfolio's tiers" in fails("policy", "add", *p, "--file", str(wrong))
    assert len(cascade(env, "policy", "list", *p).stdout.splitlines()) == 2


def test_policy_commands_need_the_schema(bench, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update({"CASCADE_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}", "CASCADE_HOME": str(tmp_path)})
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    got = cascade(env, "policy", "list", "--portfolio", str(path), check=False)
    assert got.returncode == 1 and "the database has no schema yet" in got.stderr


def test_shadow_calls_the_tiers_never_recorded_up_to_its_cap(live, tmp_path):
    env, path, rows = live
    p = ["--portfolio", str(path)]
    # graded jobs, some stopped at t0: a version starting at t1 needs t1's answer, never recorded for them
    grades = tmp_path / "grades.jsonl"
    grades.write_text("".join(json.dumps({"id": r.id, "correct": 1.0}) + "\n" for r in rows[:60]))
    cascade(env, "feedback", "add", "live", "--file", str(grades))
    v = tmp_path / "v.json"
    v.write_text(json.dumps({"name": "threshold", "params": {"signal": "logprob", "chain": ["t1", "t2"],
                                                             "thresholds": {"t1": -0.3}}}))
    cascade(env, "policy", "add", *p, "--file", str(v))

    def shadow(*extra):
        return json.loads(cascade(env, "policy", "shadow", "2", *p, "--json", *extra).stdout)

    none = shadow()
    missing = none["not_replayable"]["candidate"]
    assert missing > 2 and none["called"] == 0 and none["reasons"] == {"tier t1 never called": missing}
    assert none["not_replayable"]["live"] == 0  # version 1 ran them: all recorded
    capped = shadow("--max-calls", "2")
    assert capped["called"] == 2 and capped["called_usd"] > 0
    assert missing - 2 <= capped["not_replayable"]["candidate"] < missing
    assert capped["compared"] > none["compared"]
    full = shadow("--max-calls", "1000")
    assert full["not_replayable"]["candidate"] == 0 and missing <= full["called"] <= 2 * missing
    # each job called for is compared now, or counted as unlabelled (an answer the comparator cannot read)
    assert full["compared"] + full["unlabelled"] == none["compared"] + none["unlabelled"] + missing
    assert full["compared"] > capped["compared"]
