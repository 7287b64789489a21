"""Fitting the post-hoc scorers and calibrations that policies evaluate in core.

- `fit_logistic_scorer`: an L2-regularised logistic regression (scikit-learn) on
  standardised features, returned as raw-feature weights and bias, so core
  evaluates sigmoid(x . w + b) with no scaler (`router.core.scorers`).
- `oof_scores`: out-of-fold predictions within the train rows, for choosing
  thresholds on scores the model did not see while fitting.
- `fit_platt`: affine (Platt) calibration of a scalar confidence, a logistic
  regression on one input.

Bad input is a `ScorerError` naming the count: too few rows, or one class only.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits  # comes with scikit-learn

from router.core.errors import UserError

MIN_ROWS = 20
MIN_PER_CLASS = 2


class ScorerError(UserError):
    """A scorer or calibration that the given labelled rows cannot support."""


def check_labels(y: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if y.ndim != 1:
        raise ScorerError(f"{what}: labels must be one number per row, got shape {y.shape}")
    if not np.isfinite(y).all():
        raise ScorerError(f"{what}: {int((~np.isfinite(y)).sum())} label(s) are not finite numbers")
    n = y.size
    if n < MIN_ROWS:
        raise ScorerError(f"{what}: {n} labelled rows are too few to fit on (need at least {MIN_ROWS})")
    right = int((y >= 0.5).sum())
    wrong = n - right
    if min(right, wrong) < MIN_PER_CLASS:
        only = "right" if wrong < MIN_PER_CLASS else "wrong"
        raise ScorerError(f"{what}: {right} of {n} rows are right and {wrong} wrong; a scorer needs at least "
                          f"{MIN_PER_CLASS} of each class, and these rows are (nearly) all {only}")
    return (y >= 0.5).astype(int)


def fit_logistic_scorer(X: np.ndarray, y: np.ndarray, C: float = 0.1, what: str = "scorer",
                        raw: int = 0) -> tuple[float, np.ndarray]:
    """(bias, weights) on raw features: P(right) = sigmoid(X @ w + bias).

    The last `raw` columns (hashed words, rows already L2-normalised and mostly
    zero) are not standardised, which would blow a word seen on two rows up to the
    size of a whole feature; they are fitted as a sparse block."""
    X = np.asarray(X, dtype=float)
    labels = check_labels(y, what)
    if X.shape[0] != labels.size:
        raise ScorerError(f"{what}: {X.shape[0]} feature rows for {labels.size} labels")
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd < 1e-12] = 1.0
    if raw:
        mu[-raw:], sd[-raw:] = 0.0, 1.0
        Z = sp.csr_matrix((X - mu) / sd)
        model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000)
    else:
        Z = (X - mu) / sd
        model = LogisticRegression(C=C, solver="newton-cholesky", max_iter=200)
    # small problems: one BLAS thread is faster than several fighting over the cores
    with threadpool_limits(1):
        model.fit(Z, labels)
    w = model.coef_[0] / sd
    return float(model.intercept_[0] - (w * mu).sum()), w


def fold_ids(n: int, k: int, seed: int = 0) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(n)
    fold = np.empty(n, dtype=int)
    fold[perm] = np.arange(n) % k
    return fold


def oof_scores(X: np.ndarray, y: np.ndarray, fold: np.ndarray, C: float, what: str, raw: int = 0) -> np.ndarray:
    """Out-of-fold P(right) per row; a fold whose training rows hold one class
    predicts that class's share (a constant scorer)."""
    out = np.empty(len(y))
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        try:
            b, w = fit_logistic_scorer(X[tr], y[tr], C, what, raw)
            out[te] = 1.0 / (1.0 + np.exp(-np.clip(X[te] @ w + b, -700, 700)))
        except ScorerError:
            out[te] = float(np.mean(np.asarray(y)[tr] >= 0.5))
    return out


def fit_platt(x: np.ndarray, y: np.ndarray, what: str = "calibration") -> tuple[float, float]:
    """(a, b) with P(right) = sigmoid(a * x + b), x finite; a >= 0 (a confidence that
    falls as accuracy rises carries no usable order here: then a = 0 and b the
    log-odds of the rows' accuracy)."""
    x = np.asarray(x, dtype=float)
    labels = check_labels(y, what)
    if not np.isfinite(x).all():
        raise ScorerError(f"{what}: {int((~np.isfinite(x)).sum())} confidence value(s) are not finite")
    model = LogisticRegression(C=100.0, max_iter=1000)
    model.fit(x.reshape(-1, 1), labels)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a < 0:
        p = labels.mean()
        a, b = 0.0, float(np.log(p / (1 - p)))
    return a, b
