"""The calibration job plan: every tier answers, in order, and the last is accepted."""
from __future__ import annotations

import pytest

from router.core.attempt import Attempt, Query
from router.core.errors import PolicyError
from router.core.policies import make_policy
from router.core.policy import TierInfo


def test_every_tier_policy_calls_each_named_tier_once_in_order():
    tiers = [TierInfo(n, i) for i, n in enumerate(["a", "b", "c"])]
    p = make_policy("every-tier", tiers, {"signals": ["logprob"]})
    q = Query("1", "x")
    assert p.plan(q).first == 0 and p.plan(q).allowed == (0, 1, 2)
    assert p.needs(1).signals == ("logprob",)
    at = [Attempt(t.name, t.index, t.name, "A") for t in tiers]
    assert [(d.action, d.next_tier) for d in (p.decide(q, at[:1]), p.decide(q, at[:2]), p.decide(q, at))] == [
        ("escalate", 1), ("escalate", 2), ("accept", None)]
    lower = make_policy("every-tier", tiers, {"tiers_called": ["a", "b"]})
    assert lower.plan(q).allowed == (0, 1) and lower.decide(q, at[:2]).action == "accept"
    assert make_policy("every-tier", tiers, lower.params()).params() == lower.params()
    with pytest.raises(PolicyError, match="tiers_called tier 'z'"):
        make_policy("every-tier", tiers, {"tiers_called": ["a", "z"]})
