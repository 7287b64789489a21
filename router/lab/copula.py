"""The Markov-copula model of confidences along a cascade (after Zellinger and
Thomson, "Rational Tuning of LLM Cascades via Probabilistic Modeling",
arXiv 2501.09345), used to choose thresholds from a fitted model rather than
from the raw train rows.

Per stage j of a chain:
- the marginal distribution of its confidence: the empirical distribution of the
  train confidences (ties and point masses, e.g. many p_true = 1.0, kept as they
  are; the paper fits beta mixtures with point masses instead);
- P(correct | confidence): a one-feature logistic regression on a monotone
  transform of the confidence (logit for p_true, log(-logprob) for logprob).
Between consecutive stages j, j+1: a Gaussian copula with correlation rho_j,
estimated from the normal scores of the mid-ranks. The chain is Markov: stage
j+2 depends on stage j only through j+1, so the latent Gaussian vector has
corr(z_i, z_j) = prod of the rhos between them (the paper uses a Gumbel copula
per pair; the Markov structure is the same).

`CascadeModel.evaluate(thresholds)` gives the model's accuracy and mean cost of a
threshold cascade on the chain by Monte Carlo over the fitted model (a fixed
seed, so the same thresholds always give the same figures): accept at the first
stage whose confidence >= its threshold, the last stage always, expected
correctness = the calibrated P(correct | confidence) of the accepting stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.special import expit, ndtr, ndtri

from router.core.errors import UserError


class ModelError(UserError):
    pass


def normal_scores(x: np.ndarray) -> np.ndarray:
    """Phi^-1 of the mid-rank pseudo-observations rank / (n + 1)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(1, x.size + 1)
    # ties share their mean rank
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return ndtri(ranks / (x.size + 1))


def fit_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Gaussian-copula correlation of two paired samples (normal-scores correlation)."""
    if x.size != y.size or x.size < 3:
        raise ModelError(f"a copula needs at least 3 paired rows, got {min(x.size, y.size)}")
    a, b = normal_scores(x), normal_scores(y)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.clip(np.corrcoef(a, b)[0, 1], -0.999, 0.999))


def transform(signal: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if signal == "p_true":
        p = np.clip(x, 1e-6, 1 - 1e-6)
        return np.log(p) - np.log1p(-p)
    # log-probs (<= 0): log(-logprob) spreads the values near 0 where the confident answers sit
    return -np.log(np.clip(-x, 1e-9, None))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> tuple[float, float]:
    """Intercept and slope of P(y=1 | x) = expit(a + b x), Newton steps with a small
    ridge on b (the intercept is free, so the fitted mean matches y's mean)."""
    if x.size < 2:
        raise ModelError(f"a calibration needs at least 2 rows, got {x.size}")
    mu, sd = float(x.mean()), float(x.std()) or 1.0
    z = (x - mu) / sd
    X = np.column_stack([np.ones_like(z), z])
    w = np.zeros(2)
    reg = np.diag([0.0, l2])
    for _ in range(iters):
        p = expit(X @ w)
        g = X.T @ (p - y) + reg @ w
        H = (X * (p * (1 - p))[:, None]).T @ X + reg + 1e-9 * np.eye(2)
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0] - w[1] * mu / sd), float(w[1] / sd)


@dataclass
class Stage:
    values: np.ndarray  # sorted finite train confidences (the marginal)
    a: float
    b: float
    cost: float

    def quantile(self, u: np.ndarray) -> np.ndarray:
        idx = np.minimum((u * self.values.size).astype(int), self.values.size - 1)
        return self.values[idx]


class CascadeModel:
    """Fitted marginals, calibrations and consecutive copulas of one chain."""

    def __init__(self, signal: str, conf: Sequence[np.ndarray], correct: Sequence[np.ndarray],
                 cost: Sequence[np.ndarray], samples: int = 20_000, seed: int = 0, min_rows: int = 8):
        self.signal = signal
        k = len(conf)
        if k < 2:
            raise ModelError("a cascade model needs a chain of at least 2 stages")
        self.stages: list[Stage] = []
        for j in range(k):
            x, y = np.asarray(conf[j], float), np.asarray(correct[j], float)
            ok = np.isfinite(x)
            if ok.sum() < min_rows:
                raise ModelError(f"stage {j}: {int(ok.sum())} rows with a finite confidence, at least {min_rows} needed")
            if j < k - 1 and np.unique(y[ok]).size < 2:
                raise ModelError(f"stage {j}: all {int(ok.sum())} rows are {'right' if y[ok][0] else 'wrong'} "
                                 f"(one class): P(correct | confidence) cannot be fitted")
            a, b = fit_logistic(transform(signal, x[ok]), y[ok]) if np.unique(y[ok]).size > 1 else (
                (30.0 if y[ok][0] else -30.0), 0.0)
            self.stages.append(Stage(np.sort(x[ok]), a, b, float(np.mean(cost[j]))))
        self.rhos = []
        for j in range(k - 1):
            ok = np.isfinite(conf[j]) & np.isfinite(conf[j + 1])
            self.rhos.append(fit_rho(np.asarray(conf[j])[ok], np.asarray(conf[j + 1])[ok]))
        rng = np.random.default_rng(seed)
        z = np.empty((samples, k))
        z[:, 0] = rng.standard_normal(samples)
        for j, r in enumerate(self.rhos):  # the Markov chain of latent normals
            z[:, j + 1] = r * z[:, j] + np.sqrt(1 - r * r) * rng.standard_normal(samples)
        u = ndtr(z)
        self.conf = np.column_stack([s.quantile(u[:, j]) for j, s in enumerate(self.stages)])
        self.p = np.column_stack([expit(s.a + s.b * transform(signal, self.conf[:, j]))
                                  for j, s in enumerate(self.stages)])

    def evaluate(self, thresholds: Sequence[float]) -> tuple[float, float]:
        """Model accuracy and mean cost of the threshold cascade on this chain."""
        k = len(self.stages)
        if len(thresholds) != k - 1:
            raise ModelError(f"a chain of {k} stages takes {k - 1} thresholds, got {len(thresholds)}")
        alive = np.ones(self.conf.shape[0], dtype=bool)
        acc = cost = 0.0
        for j, s in enumerate(self.stages):
            cost += alive.mean() * s.cost
            accept = alive if j == k - 1 else alive & (self.conf[:, j] >= thresholds[j])
            acc += self.p[accept, j].sum() / alive.size
            alive &= ~accept
        return float(acc), float(cost)
