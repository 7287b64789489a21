"""Drift: a tier whose accept rate or confidences moved is flagged, unchanged
traffic is not (Holm over the tier tests)."""
from __future__ import annotations

import numpy as np

from router.lab.drift import compare


def _reference(rng, n=300):
    conf = rng.beta(5, 2, n)
    return {"signal": "p_true", "rows": n, "tiers": {
        "small": {"reached": n, "accepted": int((conf >= 0.7).sum()), "confidences": sorted(conf.round(6).tolist())},
        "big": {"reached": 120, "accepted": 120, "confidences": []}}}


def _production(rng, n, a=5, b=2):
    conf = rng.beta(a, b, n)
    return {"small": {"calls": n, "accepted": int((conf >= 0.7).sum()), "confidences": conf.tolist()},
            "big": {"calls": int((conf < 0.7).sum()), "accepted": int((conf < 0.7).sum()), "confidences": []}}


def test_unchanged_traffic_raises_no_warning_and_shifted_traffic_does():
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    false_alarms = 0
    for _ in range(50):
        findings, _ = compare(ref, _production(rng, 500), level=0.05)
        false_alarms += any(f.drift for f in findings)
    assert false_alarms <= 5  # Holm keeps any-warning at <= 5% on unchanged traffic (+ sampling slack)
    findings, _ = compare(ref, _production(rng, 500, a=2, b=2), level=0.05)
    moved = {(f.tier, f.test) for f in findings if f.drift}
    assert ("small", "confidence") in moved and ("small", "accept rate") in moved
    assert not any(f.tier == "big" and f.drift for f in findings)


def test_too_few_calls_are_not_tested_and_say_so():
    rng = np.random.default_rng(1)
    findings, notes = compare(_reference(rng), {"small": {"calls": 12, "accepted": 3, "confidences": [0.5] * 12}})
    assert findings == []
    assert "small: 12 production call(s), fewer than 30: not tested" in notes
    assert "big: 0 production call(s)" in notes[1]
