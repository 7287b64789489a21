"""The embedded mode (SQLite + in-process Celery workers): the same stage code,
bad input that names its line, resuming a killed run, fallback on a failing tier."""
from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import cascade
from helpers.env import REPO
from helpers.portfolios import write_portfolio

from router.core.portfolio import load_portfolio
from router.core.records import load_dataset
from router.lab.simulate import simulate, tiers_of
from worker.config.settings import Settings
from worker.queue.items import read_items
from worker.queue.run import run_batch

MODELS = ["llama3.2-3b", "llama3.1-70b", "llama3.1-405b"]


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_embedded_run_equals_offline(bench, tmp_path):
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    portfolio = load_portfolio(path)
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=300)
    report = run_batch(items, portfolio, settings=Settings(home=tmp_path / "home"), batch_id="emb", progress=False,
                       timeout=300)
    rows = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")[:300]
    outcomes = simulate(portfolio.built_policy, tiers_of(portfolio), rows)
    assert [(j["final_tier"], j["answer"], j["cost_usd"], j["correct"]) for j in report.jobs] == [
        (o.final_tier, o.answer, o.cost_usd, o.correct) for o in outcomes]
    assert report.batch["done"] == report.batch["succeeded"] == 300


def test_bad_lines_fail_alone_and_name_the_line(bench, tmp_path):
    good = [json.loads(line) for line, _ in zip(gzip.open(bench / "rc-mmlu.jsonl.gz", "rt"), range(3))]
    lines = [
        json.dumps(good[0]),
        "{not json",
        json.dumps({"id": "empty", "prompt": "   "}),
        "[1, 2]",
        json.dumps({"id": "noprompt"}),
        json.dumps(good[1]),
        json.dumps({**good[2], "id": good[1]["id"]}),  # an id used twice
        json.dumps({"id": "unrecorded", "prompt": "a prompt no replay file has"}),
        json.dumps(good[2]),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    out = tmp_path / "out.jsonl"
    p = cascade("run", str(inp), "--portfolio", str(path), "--out", str(out), "--quiet", home=tmp_path / "h")
    res = {r["id"]: r for r in results(out)}
    assert len(res) == 9
    assert res[good[0]["id"]]["status"] == res[good[1]["id"]]["status"] == res[good[2]["id"]]["status"] == "succeeded"
    assert "line 2: not valid JSON" in res["line-2"]["error"]
    assert "line 3: prompt: must not be empty" in res["empty"]["error"]
    assert "line 4: expected a JSON object" in res["line-4"]["error"]
    assert "line 5: prompt: missing" in res["noprompt"]["error"]
    assert f"line 7: id {good[1]['id']!r} already used on line 6" in res["line-7"]["error"]
    unrec = res["unrecorded"]
    assert unrec["status"] == "failed" and "every tier tried failed" in unrec["error"]
    assert [a["decision"] for a in unrec["attempts"]] == ["escalate", "escalate", "reject"]
    assert all("no recorded row" in a["error"] for a in unrec["attempts"])
    assert "9 items, 3 succeeded, 6 failed" in p.stdout
    assert "failed line-2: in.jsonl: line 2: not valid JSON" in p.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("threshold = -0.3", "thresold = -0.3"), "unknown field 'thresold' (did you mean 'threshold'?)"),
    (lambda t: t.replace('model = "llama3.1-70b"', 'model = "llama3.1-7b"'), "model 'llama3.1-7b' is not in"),
    (lambda t: t.replace('kind = "replay"', 'kind = "replya"', 1), "unknown backend kind 'replya' (did you mean 'replay'?)"),
    (lambda t: t.replace('signal = "logprob"', 'signal = "logprb"'), "unknown confidence signal 'logprb' (did you mean 'logprob'?)"),
    (lambda t: t + '\n[policy.thresholds]\nxl = 0.5\n', "threshold for tier 'xl' is not a tier of this portfolio"),
    (lambda t: t.replace('name = "threshold"', 'name = "treshold"'), "unknown policy 'treshold' (did you mean 'threshold'?)"),
])
def test_portfolio_mistakes_are_named(bench, tmp_path, edit, message):
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    path.write_text(edit(path.read_text()))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n")
    p = cascade("run", str(inp), "--portfolio", str(path), "--quiet", home=tmp_path / "h", check=False)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr


def test_worker_for_unknown_tier_is_refused(bench, tmp_path):
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    env_home = tmp_path / "h"
    p = cascade("worker", "--tier", "t9", "--portfolio", str(path), home=env_home, check=False)
    assert p.returncode != 0 and "no broker configured" in p.stderr


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(bench, tmp_path):
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2])
    path.write_text(path.read_text().replace('model = "llama3.1-70b" }', 'model = "llama3.1-70b", sleep = true }'))
    home = tmp_path / "h"
    out = tmp_path / "out.jsonl"
    args = [str(bench / "rc-mmlu.jsonl.gz"), "--portfolio", str(path), "--split", "test", "--limit", "40",
            "--out", str(out), "--quiet", "--chunk", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env["CASCADE_HOME"] = str(home)
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "run", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = home / "cascade.sqlite"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and done < 5:
        time.sleep(0.1)
        if db.exists():
            try:
                with sqlite3.connect(db) as c:
                    done = c.execute("select coalesce(sum(done), 0) from batches").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= done < 40, done
    p = cascade("run", *args, home=home)
    assert "40 items, 40 succeeded" in p.stdout
    portfolio = load_portfolio(path)
    rows = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")[:40]
    outcomes = simulate(portfolio.built_policy, tiers_of(portfolio), rows)
    with sqlite3.connect(db) as c:
        # the killed run's calls in flight were recorded as started: now lost, their estimate in their job's cost
        lost = dict(c.execute("select j.item_key, sum(m.est_cost_usd) from model_calls m join jobs j on j.id = m.job_id "
                              "where m.state = 'lost' group by j.item_key").fetchall())
        assert all(state in ("finished", "lost") for (state,) in c.execute("select state from model_calls"))
    got = results(out)
    assert [(r["final_tier"], r["answer"]) for r in got] == [(o.final_tier, o.answer) for o in outcomes]
    assert [r["cost_usd"] for r in got] == pytest.approx(
        [o.cost_usd + lost.get(r["id"], 0.0) for r, o in zip(got, outcomes)])
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from jobs").fetchone()[0] == 40
        assert c.execute("select count(*), count(distinct job_id || tier) from attempts").fetchone() == (
            sum(len(o.calls) for o in outcomes),) * 2


def test_failing_tier_falls_back_and_last_tier_failure_fails_the_job(bench, tmp_path):
    rows = [json.loads(line) for line, _ in zip(gzip.open(bench / "rc-mmlu.jsonl.gz", "rt"), range(6))]
    for r in rows[:3]:
        del r["responses"]["llama3.1-70b"]  # the middle tier cannot answer these
    del rows[3]["responses"]["llama3.1-70b"]
    del rows[3]["responses"]["llama3.1-405b"]  # nor can the last, for this one
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # thresholds that escalate everything from the first tier
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [0.0, -0.2], data=str(data))
    portfolio = load_portfolio(path)
    report = run_batch(read_items(data), portfolio, settings=Settings(home=tmp_path / "home"), batch_id="fb",
                       progress=False, timeout=120)
    by = {j["id"]: j for j in report.jobs}
    fell = by[rows[0]["id"]]
    assert fell["status"] == "succeeded" and fell["final_tier"] == "t2"
    mid = fell["attempts"][1]
    assert mid["tier"] == "t1" and mid["decision"] == "escalate" and mid["reason"].startswith("fallback: t1 failed")
    dead = by[rows[3]["id"]]
    assert dead["status"] == "failed" and "every tier tried failed" in dead["error"]
    assert "t2: replay: model 'llama3.1-405b' has no recorded response" in dead["error"]
    outcomes = simulate(portfolio.built_policy, tiers_of(portfolio), load_dataset(data).records)
    assert [(j["status"], j["final_tier"], j["cost_usd"]) for j in report.jobs] == [
        (o.status, o.final_tier, o.cost_usd) for o in outcomes]


def test_cancel_stops_unfinished_jobs_and_keeps_finished_ones(bench, tmp_path):
    # the first tier waits its recorded latencies, so most jobs are still open when the workers stop
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3, -0.2], slow_first=True)
    portfolio = load_portfolio(path)
    home = tmp_path / "h"
    # messages of 8 jobs: the workers stop after the one in hand (one of 200 jobs would keep
    # the first tier's worker sleeping past the 30 s the embedded workers are given to stop)
    settings = Settings(home=home, chunk_size=8)
    items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=200)
    # submitted, mostly never worked on: the embedded workers stop when run_batch returns
    run_batch(items, portfolio, settings=settings, batch_id="c", progress=False, wait=False)
    p = cascade("cancel", "c", home=home)
    from worker.store.batches import BatchStore
    from worker.store.jobs import JobStore

    b = BatchStore(settings.db_url).batch("c")
    n = int(p.stdout.split(":")[1].split()[0])
    assert n > 0 and b["cancelled"] == n and b["done"] == b["total"] == 200
    assert b["succeeded"] + b["cancelled"] == 200
    statuses = {j["status"] for j in JobStore(settings.db_url).batch_jobs("c")}
    assert statuses <= {"succeeded", "cancelled"}
    assert "no batch 'nope'" in cascade("cancel", "nope", home=home, check=False).stderr


@pytest.mark.parametrize("policy", ["threshold", "cascade-routing", "automix", "logistic-router", "select-then-route",
                                    "routellm", "hybrid-llm", "optllm", "cargo", "agreement", "frugalgpt", "gatekeeper"])
def test_every_tuned_policy_runs_in_the_workers_as_in_the_evaluator(bench, tmp_path, policy):
    """Fit on train, load the policy into a replay portfolio, run test rows through
    the embedded workers: the same decisions as router.simulate, row for row."""
    from router.core.portfolio import parse_portfolio
    from router.lab.simulate import TierModel
    from router.lab.tuners import fit
    from router.lab.tuning import Target

    data = bench / "rc-triviaqa.jsonl.gz"
    models = ["gpt-4o-mini", "llama3.1-70b", "llama3.1-405b"]
    ds = load_dataset(data)
    tiers = [TierModel(f"t{i}", m) for i, m in enumerate(models)]
    # agreement always pays two tiers, so its cheapest configuration costs more
    fitted = fit(policy, ds.split("train"), tiers, Target.budget(8e-4 if policy == "agreement" else 4e-4))
    portfolio = parse_portfolio({
        "policy": {"name": policy, "params": fitted.params},
        "tiers": [{"name": t.name, "backend": {"kind": "replay", "file": str(data), "model": t.model}} for t in tiers],
    }, where="tuned")
    rows = ds.split("test")[:80]
    report = run_batch(read_items(data, split="test", limit=80), portfolio, settings=Settings(home=tmp_path / "h"),
                       batch_id=policy, progress=False, timeout=120)
    outcomes = simulate(portfolio.built_policy, tiers_of(portfolio), rows)
    assert [(j["status"], j["final_tier"], j["answer"], j["cost_usd"], [a["tier"] for a in j["attempts"]])
            for j in report.jobs] == [(o.status, o.final_tier, o.answer, o.cost_usd, o.calls) for o in outcomes]
