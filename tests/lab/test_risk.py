"""Risk control: the p-values and testing procedures, and the coverage of the
risk-controlled threshold tuner on a synthetic population of known accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from router.core.policy import TierInfo
from router.lab import risk
from router.lab.labelled import Table
from router.lab.simulate import TierModel
from router.lab.tuners.ltt import RiskSpec, losses_against, subtable
from router.lab.tuners.threshold_ltt import RiskControlledThreshold, threshold_rows
from router.lab.tuning import Target


# -- p-values ------------------------------------------------------------------------
def test_binomial_pvalue_is_the_exact_lower_tail():
    # P(Bin(10, 0.1) <= 0) = 0.9^10; <= 1 adds 10 * 0.1 * 0.9^9
    assert risk.binomial_pvalue(0, 10, 0.1) == pytest.approx(0.9 ** 10)
    assert risk.binomial_pvalue(1, 10, 0.1) == pytest.approx(0.9 ** 10 + 0.9 ** 9)
    assert risk.binomial_pvalue(10, 10, 0.1) == 1.0


@pytest.mark.parametrize("kind", ["binomial", "hb"])
def test_pvalues_are_valid_when_the_risk_sits_at_the_bound(kind):
    # under H (risk = alpha exactly) P(p <= delta) must not exceed delta
    rng = np.random.default_rng(1)
    alpha, delta, n = 0.05, 0.1, 200
    hits = 0
    draws = 4000
    for _ in range(draws):
        k = rng.binomial(n, alpha)
        p = risk.binomial_pvalue(k, n, alpha) if kind == "binomial" else risk.hb_pvalue(k / n, n, alpha)
        hits += p <= delta
    assert hits / draws <= delta + 0.01
    # and the binomial one is not vacuous: a clearly smaller risk is certified
    assert risk.binomial_pvalue(2, n, alpha) < delta


def test_pvalue_picks_hb_for_fractional_losses():
    x = np.array([0.5] * 10 + [0.0] * 190)
    assert risk.pvalue(x, 0.05) == pytest.approx(risk.hb_pvalue(x.mean(), x.size, 0.05))
    with pytest.raises(risk.RiskError, match="at least one calibration row, got 0"):
        risk.pvalue(np.array([]), 0.05)
    with pytest.raises(risk.RiskError, match=r"\[0, 1\]"):
        risk.pvalue(np.array([1.5]), 0.05)


# -- procedures ----------------------------------------------------------------------
def test_fixed_sequence_stops_at_the_first_failure():
    p = [0.01, 0.02, 0.5, 0.01]
    assert risk.fixed_sequence(p, 0.1).tolist() == [True, True, False, False]


def test_holm_and_bonferroni():
    p = [0.01, 0.04, 0.03, 0.2]
    assert risk.bonferroni(p, 0.1).tolist() == [True, False, False, False]  # 0.1/4 = 0.025
    # Holm: 0.01 <= 0.025, 0.03 <= 0.0333, 0.04 <= 0.05, 0.2 > 0.1
    assert risk.holm(p, 0.1).tolist() == [True, True, True, False]


def test_upper_bound_and_rows_needed():
    # zero losses in n rows certify 1 - delta^(1/n)
    assert risk.upper_bound(0, 100, 0.1) == pytest.approx(1 - 0.1 ** (1 / 100), rel=1e-6)
    assert risk.rows_needed(0.0, 0.01, 0.1) == math.ceil(math.log(0.1) / math.log(0.99))
    n = risk.rows_needed(0.005, 0.01, 0.1)
    assert n is not None and n > 230
    assert risk.critical_count(n, 0.01, 0.1) >= n * 0.005
    assert risk.critical_count(n - 50, 0.01, 0.1) < (n - 50) * 0.005
    assert risk.rows_needed(0.01, 0.01, 0.1) is None
    with pytest.raises(risk.RiskError, match="risk bound"):
        risk.check_levels(0.0, 0.1)


# -- the tuner on a synthetic population -----------------------------------------
def _population(n: int, seed: int) -> Table:
    """Three tiers; a cheap tier whose confidence is informative about its own
    correctness, a middle one, and an accurate dear reference."""
    rng = np.random.default_rng(seed)
    acc = [0.6, 0.75, 0.9]
    correct = np.array([(rng.random(n) < a).astype(float) for a in acc])
    conf = np.array([np.clip(0.35 * c + rng.normal(0.4, 0.2, n), 0, 1) for c in correct])
    cost = np.array([np.full(n, x) for x in (1.0, 3.0, 10.0)])
    tiers = [TierModel(f"t{i}", f"m{i}") for i in range(3)]
    return Table([str(j) for j in range(n)], tiers, correct, cost,
                 {"p_true": conf, "logprob": np.full((3, n), np.nan)}, np.full((3, n), np.nan), [])


def _infos() -> list[TierInfo]:
    return [TierInfo(f"t{i}", i) for i in range(3)]


def _take(t: Table, cols: np.ndarray) -> Table:
    return subtable(t, cols)


def test_coverage_on_a_population_of_known_risk():
    pop = _population(40_000, 0)
    alpha, delta = 0.05, 0.2
    rng = np.random.default_rng(3)
    bad = certified = 0
    draws = 60
    for d in range(draws):
        sample = _take(pop, rng.choice(pop.n, 300, replace=False))
        tuner = RiskControlledThreshold(sample, _infos(), risk_spec=RiskSpec(alpha, delta, reference="t2", seed=d),
                                        signal="p_true")
        f = tuner.select(Target.match_best())
        chain = tuple(int(c[1]) for c in f.params["chain"])
        th = tuple(f.params["thresholds"][f"t{i}"] for i in chain[:-1])
        correct, _ = threshold_rows(pop, "p_true", chain, th)
        true_risk = losses_against(pop.correct[2], correct).mean()
        bad += true_risk > alpha
        certified += len(chain) > 1
    assert bad / draws <= delta
    assert certified / draws >= 0.5  # the guarantee is not bought by never certifying


def test_chosen_cascade_is_cheaper_than_the_reference_and_reports_the_guarantee():
    sample = _take(_population(600, 5), np.arange(600))
    tuner = RiskControlledThreshold(sample, _infos(), risk_spec=RiskSpec(0.08, 0.1, reference="t2"), signal="p_true")
    f = tuner.select(Target.match_best())
    assert f.params["chain"][-1] == "t2" and len(f.params["chain"]) > 1
    assert f.train_cost < 10.0
    rc = f.search["risk_control"]
    assert rc["p_value"] <= 0.1 and rc["upper_bound"] <= 0.08
    assert "exchangeable" in rc["assumption"] and "2110.01052" in f.note


def test_too_few_rows_and_one_class_are_named():
    small = _take(_population(40, 1), np.arange(40))
    with pytest.raises(risk.RiskError, match="40 rows"):
        RiskControlledThreshold(small, _infos(), risk_spec=RiskSpec(0.05), signal="p_true")
    one = _take(_population(200, 1), np.arange(200))
    one.correct[:] = 1.0
    with pytest.raises(risk.RiskError, match="200 rows have the same correctness"):
        RiskControlledThreshold(one, _infos(), risk_spec=RiskSpec(0.05), signal="p_true")
