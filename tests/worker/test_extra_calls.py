"""The live signals' extra calls go through the tier's backend and are paid for:
their tokens, cost and latency are part of the attempt, as the offline replay counts them."""
from __future__ import annotations

import json
import math

import pytest

from router.core.attempt import Query
from router.core.policy import Needs
from router.core.portfolio import BackendSpec, Price, Tier, parse_portfolio
from router.core.records import attempt_from_response, load_dataset
from router.lab import demo_questions as dq
from worker.config.settings import Settings
from worker.models.backends import build_backend
from worker.models.extra_calls import SAMPLES, VERIFY_K
from worker.queue.stage import call_backend

PRICE = 1000.0  # USD per 1M tokens: 0.001 per token, so token counts show in the cost


def call(text, n_in, n_out, ms, cost=None, lps=None):
    c = {"text": text, "tokens_in": n_in, "tokens_out": n_out, "latency_ms": ms, "cost_usd": cost}
    if lps:
        c["token_logprobs"] = lps
    return c


@pytest.fixture
def recorded(tmp_path):
    row = {"id": "q1", "prompt": "What is 6 x 7?", "gold": "42", "split": "test", "responses": {"m": {
        "text": "42", "correct": 1.0, "cost_usd": None, "latency_ms": 100.0, "tokens_in": 30, "tokens_out": 2,
        "token_logprobs": [[" 42", math.log(0.9)], ["\n", -0.01]],
        "calls": {
            "samples": [call("42", 30, 2, 20.0), call("41", 30, 2, 21.0), call("42", 30, 2, 22.0)],
            "verify": [call("Yes", 60, 1, 30.0), call("No", 60, 1, 31.0), call("Yes", 60, 1, 32.0)],
            "self_ref": [call(" certain", 50, 1, 40.0, cost=0.5, lps=[[" certain", math.log(0.7)]])],
        }}}}
    path = tmp_path / "rec.jsonl"
    path.write_text(json.dumps(row) + "\n")
    pf = parse_portfolio({"tiers": [{"name": "t", "backend": {"kind": "replay", "file": str(path), "model": "m"},
                                     "price": {"input_per_mtok": PRICE, "output_per_mtok": PRICE}}],
                          "policy": {"name": "single", "params": {"tier": "t"}}}, where="test")
    return path, pf.tiers[0]


def test_extra_calls_are_counted_in_the_attempt(recorded, tmp_path):
    path, tier = recorded
    b = build_backend(tier)
    q = Query("q1", "What is 6 x 7?")
    plain, _ = call_backend(b, tier, 0, q, Needs(signals=("min_logprob",)), Settings(home=tmp_path))
    assert plain.cost_usd == pytest.approx(32 * 0.001)  # the answer alone, at the tier's price
    assert (plain.tokens_in, plain.tokens_out, plain.latency_ms) == (30, 2, 100.0)
    assert "p_verify" not in plain.signals and plain.signals["min_logprob"] == pytest.approx(math.log(0.9))

    a, meta = call_backend(b, tier, 0, q, Needs(signals=("p_verify",)), Settings(home=tmp_path))
    assert len(meta["extra_calls"]["outputs"]["verify"]) == VERIFY_K == meta["extra_calls"]["calls"]
    assert a.signals["p_verify"] == pytest.approx(2 / 3)
    assert a.tokens_in == 30 + 3 * 60 and a.tokens_out == 2 + 3
    assert a.cost_usd == pytest.approx((32 + 3 * 61) * 0.001)
    assert a.latency_ms == pytest.approx(100 + 30 + 31 + 32)

    every, meta = call_backend(b, tier, 0, q, Needs(signals=("p_verify", "neg_semantic_entropy", "self_ref")),
                               Settings(home=tmp_path))
    assert meta["extra_calls"]["calls"] == (SAMPLES - 1) + VERIFY_K + 1
    # the self_ref call recorded its own cost (0.5): used as it is, not re-priced
    assert every.cost_usd == pytest.approx((32 + 3 * 32 + 3 * 61) * 0.001 + 0.5)
    assert every.signals["self_ref"] == pytest.approx(0.7)
    assert every.signals["neg_semantic_entropy"] == pytest.approx((0.75 * math.log(0.75) + 0.25 * math.log(0.25)))

    # the offline replay charges the same calls for the same signals
    resp = load_dataset(path).records[0].responses["m"]
    off = attempt_from_response("t", 0, "m", resp, price=tier.price, signals=("p_verify", "neg_semantic_entropy",
                                                                               "self_ref"))
    assert off.cost_usd == pytest.approx(every.cost_usd) and off.latency_ms == pytest.approx(every.latency_ms)
    assert {k: off.signals[k] for k in ("p_verify", "self_ref", "neg_semantic_entropy")} == pytest.approx(
        {k: every.signals[k] for k in ("p_verify", "self_ref", "neg_semantic_entropy")})
    assert attempt_from_response("t", 0, "m", resp, price=tier.price).cost_usd == pytest.approx(plain.cost_usd)


def test_a_missing_recorded_call_fails_the_attempt(recorded, tmp_path):
    path, tier = recorded
    row = json.loads(path.read_text())
    row["responses"]["m"]["calls"]["verify"] = row["responses"]["m"]["calls"]["verify"][:1]
    path.write_text(json.dumps(row) + "\n")
    a, _ = call_backend(build_backend(tier), tier, 0, Query("q1", "What is 6 x 7?"), Needs(signals=("p_verify",)),
                        Settings(home=tmp_path))
    assert not a.ok and "no recorded verify call 1" in a.error


@pytest.mark.models
def test_extra_calls_on_a_local_model(tmp_path):
    """The same calls through llama.cpp, unchanged backend: samples at temperature > 0,
    verdicts and the confidence token come back and are counted."""
    tier = Tier(name="tiny", backend=BackendSpec.model_validate(
        {"kind": "llamacpp", "model": "tiny", "n_threads": 2, "n_ctx": 1024, "max_tokens": 8, "stop": ["\n"],
         "prompt_template": dq.FEW_SHOT}), price=Price(input_per_mtok=PRICE, output_per_mtok=PRICE))
    b = build_backend(tier)
    try:
        a, meta = call_backend(b, tier, 0, Query("q", "What is 2 + 3?"),
                               Needs(signals=("p_verify", "neg_semantic_entropy", "self_ref")), Settings(home=tmp_path))
    finally:
        b.close()
    extra = meta["extra_calls"]
    assert a.ok and extra["calls"] == (SAMPLES - 1) + VERIFY_K + 1
    assert [len(extra["outputs"][k]) for k in ("samples", "verify", "self_ref")] == [SAMPLES - 1, VERIFY_K, 1]
    assert a.tokens_in > extra["tokens_in"] > 0 and a.tokens_out > extra["tokens_out"] > 0
    assert a.cost_usd == pytest.approx((a.tokens_in + a.tokens_out) * PRICE / 1e6)
    assert -math.log(SAMPLES) - 1e-9 <= a.signals["neg_semantic_entropy"] <= 0.0
