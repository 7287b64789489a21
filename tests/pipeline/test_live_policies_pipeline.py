"""Live-signal policies through the real pipeline (Redis, PostgreSQL, one worker per
tier) on the local benchmark file: the replay backend serves the recorded answers and
their recorded extra calls, the workers make those calls, and every job's cost, tier and
answer equal the offline simulation, extra calls included."""
from __future__ import annotations

import json

import pytest
from helpers.env import REPO

from router.core.portfolio import load_portfolio
from router.core.records import load_dataset
from router.lab.simulate import simulate, tiers_of
from worker.models.extra_calls import VERIFY_K
from worker.queue.items import read_items
from worker.queue.run import run_batch

pytestmark = pytest.mark.services

LOCAL_BENCH = REPO / "data" / "local-bench" / "local-bench.jsonl"
N = 24


def test_automix_verifier_through_workers_equals_offline(distributed, workers, tmp_path):
    settings, _ = distributed
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(LOCAL_BENCH.read_text().splitlines(keepends=True)[:N]))
    rows = load_dataset(data).records  # the question text joined from the shared files
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in rows))
    pf = tmp_path / "p.toml"
    pf.write_text('[policy]\nname = "threshold"\nsignal = "p_verify"\n' + "".join(
        f'[[tiers]]\nname = "{t}"\n' + (f"threshold = {th}\n" if th is not None else "")
        + f'backend = {{ kind = "replay", file = "{data}", model = "{t}" }}\n'
        for t, th in (("tiny", 0.6), ("small", 0.6), ("medium", None))))
    portfolio = load_portfolio(pf)
    w = workers(pf)
    for t in portfolio.tiers:
        w.start(t.name)
    try:
        report = run_batch(read_items(traffic), portfolio, settings=settings, batch_id="live", progress=False,
                           timeout=300)
    except Exception:
        print(w.logs())
        raise
    outcomes = simulate(portfolio.built_policy, tiers_of(portfolio), rows)
    assert [(j["id"], j["status"], j["final_tier"], j["answer"], j["correct"]) for j in report.jobs] == [
        (o.id, o.status, o.final_tier, o.answer, o.correct) for o in outcomes]
    assert [j["cost_usd"] for j in report.jobs] == pytest.approx([o.cost_usd for o in outcomes], rel=1e-9)
    by_id = {r.id: r for r in rows}
    verified = 0
    for j in report.jobs:
        for a in j["attempts"]:
            resp = by_id[j["id"]].responses[a["tier"]]
            if a["tier"] == "medium":  # the last tier is always accepted: no extra calls
                assert "extra_calls" not in a["meta"]
                assert a["cost_usd"] == pytest.approx(resp.cost_usd)
                continue
            extra = a["meta"]["extra_calls"]
            assert extra["calls"] == VERIFY_K and len(extra["outputs"]["verify"]) == VERIFY_K
            # the attempt pays for its answer and its verifications, and counts their tokens
            assert a["cost_usd"] == pytest.approx(resp.cost_usd + sum(c["cost_usd"] for c in resp.calls["verify"]))
            assert a["tokens_in"] == resp.tokens_in + sum(c["tokens_in"] for c in resp.calls["verify"])
            assert ("p_verify" in a["signals"]) == ("p_verify" in resp.signals)
            verified += 1
    assert verified >= len(rows)  # every job called tiny, with its verifications
    assert {o.final_tier for o in outcomes} >= {"tiny", "medium"}
