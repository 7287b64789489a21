"""The demo's calibration goes through the lab: records, the threshold tuner, simulate."""
from __future__ import annotations

import pytest

from router.core.errors import UserError
from router.lab.demo_calibration import calibrate, records_of
from router.lab.labelled import build_table
from router.lab.simulate import TierModel

TIERS = ["tiny", "small", "medium"]


def _rows(small_ms: float = 50.0):
    # tiny is right when sure (>= -0.5), small right when >= -1, medium always right but slow
    rows = []
    for i in range(20):
        t_sig = -0.1 if i < 6 else -2.0
        s_sig = -0.2 if i < 15 else -3.0
        rows.append({
            "id": f"q{i}",
            "tiny": {"ok": i < 6, "ms": 10.0, "sig": {"sum_logprob": t_sig}},
            "small": {"ok": i < 15, "ms": small_ms, "sig": {"sum_logprob": s_sig}},
            "medium": {"ok": True, "ms": 100.0, "sig": {}},
        })
    return rows


def test_measured_rows_become_records_with_model_time_as_cost():
    recs = records_of(_rows(), TIERS)
    table = build_table(recs, [TierModel(t, t) for t in TIERS])
    assert table.cost[:, 0].tolist() == [0.01, 0.05, 0.1]
    assert table.conf["sum_logprob"][0, 0] == -0.1 and table.correct[2].all()


def test_calibrate_finds_the_least_model_time_that_keeps_accuracy():
    c = calibrate(_rows(), TIERS, signals=("sum_logprob",), keep=1.0)
    assert c.accuracy == 1.0 and c.baseline_accuracy == 1.0
    assert c.params["chain"] == TIERS and c.signal == "sum_logprob"
    assert c.accepted == {"tiny": 6, "small": 9, "medium": 5}
    th = c.params["thresholds"]
    assert -2.0 < th["tiny"] <= -0.1 and -3.0 < th["small"] <= -0.2
    assert c.time_ratio == pytest.approx((20 * 10 + 14 * 50 + 5 * 100) / 2000)


def test_calibrate_drops_a_tier_that_does_not_pay_for_itself():
    # with small at 30 ms, calling tiny first costs more model time than it saves
    c = calibrate(_rows(small_ms=30.0), TIERS, signals=("sum_logprob",), keep=1.0)
    assert c.params["chain"] == ["small", "medium"]
    assert c.accepted == {"tiny": 0, "small": 15, "medium": 5}
    assert c.time_ratio == pytest.approx((20 * 30 + 5 * 100) / 2000)


def test_calibrate_can_always_fall_back_to_the_last_tier():
    rows = _rows()
    for r in rows:
        r["tiny"]["ok"] = r["small"]["ok"] = False
    c = calibrate(rows, TIERS, signals=("sum_logprob",), keep=1.0)
    assert c.accepted["medium"] == 20 and c.accuracy == 1.0 and c.params["chain"] == ["medium"]


def test_calibrate_without_rows_is_a_clear_error():
    with pytest.raises(UserError, match="at least one"):
        calibrate([], TIERS)


def test_median_time_charges_every_call_its_tiers_median():
    rows = _rows()
    for i, r in enumerate(rows):
        r["small"]["ms"] = 50.0 + (400.0 if i == 3 else 0.0)  # one call slowed down by the machine's load
    table = build_table(records_of(rows, TIERS, time="median"), [TierModel(t, t) for t in TIERS])
    assert set(table.cost[1].tolist()) == {0.05}
    assert calibrate(rows, TIERS, signals=("sum_logprob",), keep=1.0, time="median").time_ratio == pytest.approx(
        (20 * 10 + 14 * 50 + 5 * 100) / 2000)
    with pytest.raises(UserError, match="median"):
        records_of(rows, TIERS, time="mean")
