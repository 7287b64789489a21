"""The decision layer on its own: portfolio validation, the threshold cascade,
and the engine rules every policy runs under."""
from __future__ import annotations

import json

import pytest

from router.core import cascade
from router.core.attempt import Attempt, Query
from router.core.policies import make_policy
from router.core.policy import Decision, Plan, Policy, TierInfo
from router.core.portfolio import (
    PortfolioError,
    load_portfolio,
    parse_portfolio,
    portfolio_from_spec,
)
from router.core.records import RecordsError, load_dataset

TIERS = [TierInfo("a", 0), TierInfo("b", 1), TierInfo("c", 2)]
Q = Query("q1", "what?")


def att(tier: int, value: float | None = None, error: str | None = None, cost: float = 1.0) -> Attempt:
    sig = {} if value is None else {"logprob": value}
    return Attempt("abc"[tier], tier, f"m{tier}", None if error else f"ans{tier}", sig, cost, error=error)


def raw(**policy):
    return {
        "policy": {"name": "threshold", **policy},
        "tiers": [
            {"name": "a", "threshold": -0.5, "backend": {"kind": "replay", "file": "x.jsonl", "model": "m0"}},
            {"name": "b", "backend": {"kind": "replay", "file": "x.jsonl", "model": "m1"},
             "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
        ],
    }


def test_portfolio_round_trips_through_its_stored_spec(tmp_path):
    p = parse_portfolio(raw(signal="logprob"), base=tmp_path)
    assert p.policy.params == {"signal": "logprob", "thresholds": {"a": -0.5}}
    assert p.tiers[0].backend.options["file"] == str(tmp_path / "x.jsonl")  # resolved against the file's folder
    assert p.tiers[1].queue_name == "cascade.b"
    again = portfolio_from_spec(p.spec())
    assert again == p and again.digest == p.digest
    assert p.tiers[1].price.cost(1000, 500) == pytest.approx(0.002)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["tiers"][0].update(nmae="x"), "p.toml: tiers[0].nmae: unknown field 'nmae' (did you mean 'name'?)"),
    (lambda r: r["tiers"][1].update(name="a"), "tier name 'a' is used twice"),
    (lambda r: r["tiers"][1]["price"].update(input_per_mtok=-1), "tiers[1].price.input_per_mtok"),
    (lambda r: r["tiers"].clear(), "p.toml: tiers: Tuple should have at least 1 item"),
    (lambda r: r["tiers"][0].pop("threshold"), "no threshold for tier(s) ['a']"),
    (lambda r: r["policy"].update(chain=["a", "zz"]), "chain tier 'zz' is not a tier"),
    (lambda r: r["policy"].update(thresholds={"a": 0.1}), "given both in the tier and in policy.thresholds"),
    (lambda r: r["tiers"][0].update(name="bad name!"), "tiers[0].name"),
])
def test_portfolio_errors_name_the_field(tmp_path, mutate, message):
    r = raw()
    mutate(r)
    with pytest.raises(PortfolioError) as e:
        parse_portfolio(r, base=tmp_path, where="p.toml")
    assert message in str(e.value)


def test_portfolio_files_toml_yaml_and_tuned_policy_file(tmp_path):
    (tmp_path / "tuned.json").write_text(json.dumps({"name": "threshold", "params": {"signal": "p_true", "thresholds": {"a": 0.7}}}))
    (tmp_path / "p.toml").write_text(
        '[policy]\nfile = "tuned.json"\n\n[[tiers]]\nname = "a"\nbackend = { kind = "replay", file = "d", model = "m" }\n'
        '[[tiers]]\nname = "b"\nbackend = { kind = "replay", file = "d", model = "n" }\n')
    p = load_portfolio(tmp_path / "p.toml")
    assert p.policy.params == {"signal": "p_true", "thresholds": {"a": 0.7}}
    (tmp_path / "p.yaml").write_text(
        "policy: {name: threshold, thresholds: {a: 0.2}}\ntiers:\n"
        "  - {name: a, backend: {kind: replay, file: d, model: m}}\n  - {name: b, backend: {kind: replay, file: d, model: n}}\n")
    assert load_portfolio(tmp_path / "p.yaml").policy.params["thresholds"] == {"a": 0.2}
    (tmp_path / "bad.toml").write_text("[policy\nname=1")
    with pytest.raises(PortfolioError, match="bad.toml: not valid TOML"):
        load_portfolio(tmp_path / "bad.toml")
    with pytest.raises(PortfolioError, match="does not exist"):
        load_portfolio(tmp_path / "missing.toml")


def test_threshold_cascade_decisions():
    pol = make_policy("threshold", TIERS, {"signal": "logprob", "thresholds": {"a": -0.5, "b": -0.2}})
    assert cascade.start(pol, Q).tier == 0
    plan = cascade.start(pol, Q).plan
    assert cascade.step(pol, Q, plan, [att(0, -0.4)]).action == "accept"
    d = cascade.step(pol, Q, plan, [att(0, -0.6)])
    assert (d.action, d.next_tier) == ("escalate", 1)
    d = cascade.step(pol, Q, plan, [att(0, None)])  # a missing (or NaN) signal escalates, never accepts
    assert (d.action, d.reason) == ("escalate", "logprob missing")
    assert cascade.step(pol, Q, plan, [att(0, -0.6), att(1, -0.9), att(2, -5.0)]).action == "accept"
    assert cascade.step(pol, Q, plan, [att(0, float("nan"))]).action == "escalate"


def test_chain_skips_tiers_and_params_rebuild_the_policy():
    pol = make_policy("threshold", TIERS, {"thresholds": {"a": -0.5}, "chain": ["a", "c"]})
    plan = cascade.start(pol, Q).plan
    assert cascade.step(pol, Q, plan, [att(0, -0.9)]).next_tier == 2
    again = make_policy("threshold", TIERS, pol.params())
    assert again.params() == pol.params() == {"signal": "logprob", "thresholds": {"a": -0.5}, "chain": ["a", "c"]}


def test_failed_call_falls_back_then_fails_with_every_error():
    pol = make_policy("threshold", TIERS, {"thresholds": {"a": -0.5, "b": -0.2}})
    plan = cascade.start(pol, Q).plan
    d = cascade.step(pol, Q, plan, [att(0, error="timeout")])
    assert (d.action, d.next_tier, d.reason) == ("escalate", 1, "fallback: a failed: timeout")
    # the policy sees only the successful attempts
    d = cascade.step(pol, Q, plan, [att(0, error="timeout"), att(1, -0.1)])
    assert d.action == "accept"
    d = cascade.step(pol, Q, plan, [att(0, error="e0"), att(1, error="e1"), att(2, error="e2")])
    assert d.action == "reject" and d.reason == "every tier tried failed (a: e0; b: e1; c: e2)"


class Backwards(Policy):
    name = "backwards"

    def plan(self, query):
        return Plan(first=1)

    def decide(self, query, attempts):
        return Decision("escalate", "go back", next_tier=1)

    def params(self):
        return {}


class PickFirst(Policy):
    name = "pick-first"

    def plan(self, query):
        return Plan(first=0)

    def decide(self, query, attempts):
        if len(attempts) < 2:
            return Decision("escalate", "look further", next_tier=1)
        return Decision("accept", "the first was better", answer_from=0)

    def params(self):
        return {}


def test_engine_rejects_a_policy_that_revisits_a_tier():
    pol = Backwards(TIERS)
    d = cascade.step(pol, Q, cascade.start(pol, Q).plan, [att(1, 0.0)])
    assert d.action == "reject" and "tried already" in d.reason


def test_accept_can_return_an_earlier_answer_and_indexes_map_past_failures():
    pol = PickFirst(TIERS)
    history = [att(0, 0.0), att(2, error="down"), att(1, 0.0)]
    d = cascade.step(pol, Q, cascade.start(pol, Q).plan, history)
    assert d.action == "accept" and cascade.final_attempt(history, d).tier == "a"


def test_records_errors_name_line_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"id": "1", "prompt": "p", "responses": {"m": {"correct": 1.0}}}\n'
                 '{"id": "2", "prompt": "p", "responses": {"m": {"correct": 2.0}}}\n')
    # a score outside [0, 1] is kept aside, not taken as a score (the evaluator drops the row, counted)
    bad = load_dataset(f).records[1].responses["m"]
    assert bad.correct is None and bad.bad_correct == 2.0
    f.write_text('{"id": "1", "prompt": "p", "responses": {"m": {"cost": 1}}}\n')
    with pytest.raises(RecordsError, match=r"unknown field\(s\) \['cost'\]"):
        load_dataset(f)
    f.write_text('{"id": "1", "responses": {"m": {}}}\n')
    with pytest.raises(RecordsError, match="d.jsonl:1: missing field 'prompt'"):
        load_dataset(f)
