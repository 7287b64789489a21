"""Finite-sample risk control: p-values for "the risk of this setting exceeds alpha"
and the family-wise procedures that turn them into certified settings.

This is the testing half of Learn then Test (Angelopoulos, Bates, Candes, Jordan,
Lei, "Learn then Test: Calibrating Predictive Algorithms to Achieve Risk
Control", arXiv 2110.01052). Each candidate setting j carries the null
hypothesis H_j: risk(j) > alpha. A valid p-value for H_j from n exchangeable
losses in [0, 1], then a procedure controlling the family-wise error rate at
delta, gives: with probability >= 1 - delta over the calibration draw, every
rejected H_j is a setting whose risk is <= alpha.

p-values (both are valid for any loss distribution with the stated range):
- 0/1 losses: the exact binomial tail P(Binomial(n, alpha) <= k), k = losses seen;
  under H_j the count of losses is stochastically at least Binomial(n, alpha).
- losses in [0, 1]: Hoeffding-Bentkus, min(exp(-n h(min(rhat, alpha), alpha)),
  e * P(Binomial(n, alpha) <= ceil(n rhat))), h the Bernoulli KL divergence
  (Bates, Angelopoulos, Lei, Malik, Jordan, "Distribution-free, risk-controlling
  prediction sets", arXiv 2101.02703, and LTT section 3).

Procedures: fixed-sequence testing (hypotheses in an order fixed before the
calibration rows are seen; reject while p <= delta, stop at the first failure; no
multiplicity penalty), Bonferroni (p <= delta / m) and Holm (step-down).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from router.core.errors import UserError


class RiskError(UserError):
    """Risk-control input that cannot support the computation (named clearly)."""


def check_levels(alpha: float, delta: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise RiskError(f"the risk bound must lie strictly between 0 and 1, got {alpha!r}")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise RiskError(f"the failure probability delta must lie strictly between 0 and 1, got {delta!r}")


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (exact for the sizes used here)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    lg = math.lgamma
    terms = [lg(n + 1) - lg(i + 1) - lg(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _kl(a: float, b: float) -> float:
    """KL divergence between Bernoulli(a) and Bernoulli(b)."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def binomial_pvalue(losses: int, n: int, alpha: float) -> float:
    """p-value of H: risk > alpha after `losses` 0/1 losses in n rows."""
    if n <= 0:
        raise RiskError(f"a p-value needs at least one calibration row, got {n}")
    return binom_cdf(int(losses), int(n), alpha)


def hb_pvalue(mean_loss: float, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of H: risk > alpha for losses in [0, 1] with mean `mean_loss`."""
    if n <= 0:
        raise RiskError(f"a p-value needs at least one calibration row, got {n}")
    hoeffding = math.exp(-n * _kl(min(mean_loss, alpha), alpha))
    bentkus = math.e * binom_cdf(math.ceil(n * mean_loss - 1e-12), n, alpha)
    return min(1.0, hoeffding, bentkus)


def pvalue(losses: np.ndarray, alpha: float) -> float:
    """The exact binomial p-value when every loss is 0 or 1, Hoeffding-Bentkus otherwise."""
    x = np.asarray(losses, dtype=float)
    if x.size == 0:
        raise RiskError("a p-value needs at least one calibration row, got 0")
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
        raise RiskError("losses must lie in [0, 1]")
    if np.all((x == 0) | (x == 1)):
        return binomial_pvalue(int(x.sum()), x.size, alpha)
    return hb_pvalue(float(x.mean()), x.size, alpha)


def fixed_sequence(pvalues: Sequence[float], delta: float) -> np.ndarray:
    """Rejections of fixed-sequence testing: a leading run of p <= delta."""
    p = np.asarray(pvalues, dtype=float)
    fail = np.flatnonzero(p > delta)
    stop = int(fail[0]) if fail.size else p.size
    out = np.zeros(p.size, dtype=bool)
    out[:stop] = True
    return out


def bonferroni(pvalues: Sequence[float], delta: float) -> np.ndarray:
    p = np.asarray(pvalues, dtype=float)
    return p <= delta / max(p.size, 1)


def holm(pvalues: Sequence[float], delta: float) -> np.ndarray:
    """Holm's step-down: sorted p_(i) <= delta / (m - i), stopping at the first failure."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    out = np.zeros(m, dtype=bool)
    for rank, j in enumerate(order):
        if p[j] > delta / (m - rank):
            break
        out[j] = True
    return out


PROCEDURES = {"fixed-sequence": fixed_sequence, "holm": holm, "bonferroni": bonferroni}


def upper_bound(losses: int, n: int, delta: float) -> float:
    """The smallest alpha a 0/1 loss count certifies at level delta (the one-sided
    Clopper-Pearson upper bound): min {alpha : P(Bin(n, alpha) <= losses) <= delta}."""
    if n <= 0:
        raise RiskError(f"a bound needs at least one calibration row, got {n}")
    if losses >= n:
        return 1.0
    lo, hi = losses / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_cdf(losses, n, mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def critical_count(n: int, alpha: float, delta: float) -> int:
    """The most 0/1 losses in n rows that still certify risk <= alpha at level delta (-1: none)."""
    k, cdf = -1, 0.0
    lp, lq = math.log(alpha), math.log1p(-alpha)
    while k < n:
        j = k + 1
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq)
        if cdf > delta:
            break
        k = j
    return k


def rows_needed(rate: float, alpha: float, delta: float, limit: int = 1_000_000) -> int | None:
    """Calibration rows at which a setting with 0/1 loss rate `rate` is certified at
    (alpha, delta) when it shows its expected number of losses: the least n (found
    by bisection) with critical_count(n) >= n * rate. None when rate >= alpha (no
    number of rows certifies it) or beyond `limit` rows."""
    check_levels(alpha, delta)
    if rate >= alpha:
        return None
    rate = max(rate, 0.0)

    def ok(n: int) -> bool:
        return critical_count(n, alpha, delta) >= n * rate - 1e-9

    hi = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
