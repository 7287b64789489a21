"""`cascade calibrate` end to end in the embedded mode (replay tiers over a shared file):
every tier's answer as ordinary jobs, labels = agreement with the top tier's answer,
resumable, a spend cap, stored top-tier answers reused, and bad input named."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers.cli import cascade

from router.core.answers import same_answer
from router.core.records import load_dataset
from worker.config.settings import Settings
from worker.store.batches import BatchStore
from worker.store.jobs import JobStore

MODELS = ["llama3.2-1b", "llama3.1-8b", "gpt-4o"]  # tiers t0, t1 and the top, t2


def portfolio(path: Path, bench: Path, models=MODELS, price: float = 0.0) -> Path:
    lines = ['[policy]\nname = "threshold"\nsignal = "logprob"\n']
    for i, m in enumerate(models):
        lines.append(f'[[tiers]]\nname = "t{i}"\n' + ("threshold = -0.1\n" if i < len(models) - 1 else "")
                     + f'backend = {{ kind = "replay", file = "{bench / "rc-mmlu.jsonl.gz"}", model = "{m}" }}\n'
                     + (f"price = {{ per_call = {price} }}\n" if price else ""))
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def traffic(bench, tmp_path) -> Path:
    """60 MMLU prompts (no answers, no grades; two rows share a prompt) and one bad line."""
    rows = [json.loads(line) for line, _ in zip(gzip.open(bench / "rc-mmlu.jsonl.gz", "rt"), range(60))]
    lines = [json.dumps({"id": r["id"], "prompt": r["prompt"]}) for r in rows]
    lines.insert(7, '{"id": "broken", "prompt": ')
    p = tmp_path / "traffic.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def labelled(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_calibrate_labels_every_tier_by_agreement_with_the_top_tier(bench, tmp_path, traffic):
    pf, out, home = portfolio(tmp_path / "p.toml", bench), tmp_path / "cal.jsonl", tmp_path / "h"
    args = ("calibrate", "--portfolio", str(pf), "--input", str(traffic), "--sample", "50", "--out", str(out),
            "--quiet")
    p = cascade(*args, home=home)
    assert "1 unusable lines" in p.stderr and "line 8" in p.stderr
    assert "estimated spend" in p.stdout and "not a grade against the truth" in p.stdout
    rows = labelled(out)
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50 and "broken" not in {r["id"] for r in rows}
    recorded = {r.id: r for r in load_dataset(bench / "rc-mmlu.jsonl.gz").records}
    for row in rows:
        src = recorded[row["id"]]
        top = src.responses["gpt-4o"].text
        assert row["labels"] == "agreement with 't2'" and row["gold"] is None
        for tier, model in zip(("t0", "t1", "t2"), MODELS):
            got = row["responses"][tier]
            assert got["text"] == src.responses[model].text
            assert got["logprob"] == pytest.approx(src.responses[model].logprob)  # the signal is kept
            assert got["correct"] == float(same_answer(got["text"], top, "choice"))
    assert {r["split"] for r in rows} == {"train", "test"}

    # a re-run resumes the same batch: no job is run (or paid) twice
    again = cascade(*args, home=home)
    assert labelled(out) == rows
    store = JobStore(Settings(home=home).db_url)
    (batch_id,) = {j.split(":")[0] for j in (r["job"] for r in rows)}
    assert BatchStore(store.url).batch(batch_id)["total"] == 50
    assert sum(len(a) for a in store.attempts_of([r["job"] for r in rows]).values()) == 150
    assert "batch " + batch_id in again.stdout

    # tuning on it works as on graded data and says what its accuracy means
    t = cascade("tune", "--data", str(out), "--policy", "threshold", "--fit-split", "all", "--risk-bound", "0.3",
                "--delta", "0.2", "--learn-fraction", "0.4", "--out", str(tmp_path / "tuned.json"), home=home)
    assert "agreement with 't2'" in t.stdout and "not accuracy against the truth" in t.stdout
    assert "guarantee: the cascade agrees with the top model t2 on at least 0.7 of traffic, with probability 0.8" \
        in t.stdout
    assert json.loads((tmp_path / "tuned.json").read_text())["fitted"]["labels"] == "agreement with 't2'"


def test_top_tier_answers_of_a_previous_batch_are_reused_not_paid_again(bench, tmp_path, traffic):
    pf, home = portfolio(tmp_path / "p.toml", bench), tmp_path / "h"
    cascade("run", str(traffic), "--portfolio", str(pf), "--batch", "earlier", "--quiet",
            "--out", str(tmp_path / "r.jsonl"), home=home)
    store = JobStore(Settings(home=home).db_url)
    earlier = store.attempts_of([j["id"] for j in store.batch_jobs("earlier")])
    answered_by_top = {a["job_id"].split(":", 1)[1] for atts in earlier.values() for a in atts if a["tier"] == "t2"}
    assert 0 < len(answered_by_top) < 60  # the threshold cascade stopped early on some

    out = tmp_path / "cal.jsonl"
    p = cascade("calibrate", "--portfolio", str(pf), "--input", str(traffic), "--sample", "60", "--out", str(out),
                "--reuse-batch", "earlier", "--quiet", home=home)
    assert f"{len(answered_by_top)} top-tier answers reused from earlier" in p.stdout, p.stdout.splitlines()[0]
    rows = labelled(out)
    assert len(rows) == 60
    reused = [r for r in rows if r["job"].split(":")[0].endswith("-reuse")]
    assert {r["id"] for r in reused} == answered_by_top
    calls = store.attempts_of([r["job"] for r in reused])
    assert all({a["tier"] for a in atts} == {"t0", "t1"} for atts in calls.values())  # t2 never called again
    recorded = {r.id: r for r in load_dataset(bench / "rc-mmlu.jsonl.gz").records}
    assert all(r["responses"]["t2"]["text"] == recorded[r["id"]].responses["gpt-4o"].text for r in reused)
    assert all(r["responses"]["t2"]["correct"] == 1.0 for r in rows)


def test_spend_is_estimated_and_capped_before_anything_runs(bench, tmp_path, traffic):
    pf, home = portfolio(tmp_path / "p.toml", bench, price=0.01), tmp_path / "h"
    p = cascade("calibrate", "--portfolio", str(pf), "--input", str(traffic), "--sample", "20", "--out",
                str(tmp_path / "c.jsonl"), "--max-spend", "0.5", home=home, check=False)
    assert p.returncode == 1
    assert "estimated spend $0.6 exceeds --max-spend $0.5" in p.stderr  # 20 requests x 3 tiers x $0.01
    assert not (tmp_path / "c.jsonl").exists() and not (home / "cascade.sqlite").exists()


@pytest.mark.parametrize("case, message", [
    ("sample", "--sample 61 is larger than the traffic: 60 usable requests (1 more lines are unusable"),
    ("one-tier", "the portfolio has one tier ('t0'): calibration compares cheaper tiers with the top one"),
    ("reuse", "--reuse-batch: no batch 'nope' in the database"),
])
def test_bad_input_is_a_clear_error(bench, tmp_path, traffic, case, message):
    pf = portfolio(tmp_path / "p.toml", bench, MODELS[-1:] if case == "one-tier" else MODELS)
    extra = ("--reuse-batch", "nope") if case == "reuse" else ()
    p = cascade("calibrate", "--portfolio", str(pf), "--input", str(traffic), "--sample",
                "61" if case == "sample" else "10", "--out", str(tmp_path / "c.jsonl"), *extra,
                home=tmp_path / "h", check=False)
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr
