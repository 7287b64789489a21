"""Fitting the per-model quality predictors of `router.core.quality` on train rows.

Each function takes X (n, dim) and outcomes Y (k, n) in [0, 1] and returns the
predictor's JSON params. scikit-learn fits the linear models; the matrix
factorisation is fitted here by L-BFGS (scipy) on the mean log-loss of every
(query, model) outcome.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize
from sklearn.linear_model import Ridge

from router.core.features import fit_logistic
from router.core.quality import pack, sigmoid
from router.lab.tuning import NotApplicable

MIN_ROWS = 20


def check_trainable(Y: np.ndarray, names: list[str], what: str) -> None:
    """Too few rows, or nothing to learn (every model's outcomes of one class): a
    NotApplicable naming the counts."""
    n = Y.shape[1]
    if n < MIN_ROWS:
        raise NotApplicable(f"{what}: {n} train rows are too few to fit a router (at least {MIN_ROWS})")
    if all(np.all(y == y[0]) for y in Y):
        raise NotApplicable(f"{what}: every model's {n} train outcomes are of one class ("
                            + ", ".join(f"{m}: all {'right' if y[0] >= 0.5 else 'wrong'}" for m, y in zip(names, Y))
                            + "): nothing to learn")


def _sparse(X: np.ndarray) -> np.ndarray | sp.csr_matrix:
    """Hashed-word query vectors are mostly zeros: the solver runs on them much faster as
    CSR (same arithmetic)."""
    return sp.csr_matrix(X) if X.size and np.count_nonzero(X) < 0.3 * X.size else X


def fit_linear(X: np.ndarray, Y: np.ndarray, l2: float = 1e-3, link: str = "logit") -> dict[str, Any]:
    if link == "logit":
        W, b = fit_logistic(_sparse(X), Y, l2)
    else:
        r = Ridge(alpha=l2 * X.shape[0]).fit(X, Y.T)
        W, b = np.atleast_2d(r.coef_), np.atleast_1d(r.intercept_)
    return {"kind": "linear", "link": link, "W": pack(W), "b": pack(b)}


def fit_mf(X: np.ndarray, Y: np.ndarray, h: int = 16, l2: float = 1e-3, seed: int = 0,
           iters: int = 300) -> dict[str, Any]:
    """s = (X P) V^T + b, p = sigmoid(s): minimise mean log-loss + l2/2 (|P|^2 + |V|^2)."""
    n, d = X.shape
    k = Y.shape[0]
    T = Y.T
    rng = np.random.default_rng(seed)
    mean = np.clip(T.mean(axis=0), 1e-3, 1 - 1e-3)
    x0 = np.concatenate([rng.normal(0, 0.1, d * h), rng.normal(0, 0.1, k * h), np.log(mean / (1 - mean))])

    def split(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return theta[: d * h].reshape(d, h), theta[d * h : d * h + k * h].reshape(k, h), theta[d * h + k * h :]

    def fg(theta: np.ndarray) -> tuple[float, np.ndarray]:
        P, V, b = split(theta)
        Z = X @ P
        S = Z @ V.T + b
        loss = (np.logaddexp(0.0, S) - T * S).sum() / (n * k) + 0.5 * l2 * ((P * P).sum() + (V * V).sum())
        R = (sigmoid(S) - T) / (n * k)
        gV = R.T @ Z + l2 * V
        gP = X.T @ (R @ V) + l2 * P
        return float(loss), np.concatenate([gP.ravel(), gV.ravel(), R.sum(axis=0)])

    res = minimize(fg, x0, jac=True, method="L-BFGS-B", options={"maxiter": iters})
    P, V, b = split(res.x)
    return {"kind": "mf", "P": pack(P), "V": pack(V), "b": pack(b)}


def fit_sw(X: np.ndarray, Y: np.ndarray, max_rows: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Store the train queries (at most `max_rows`, a random subset, to keep the policy
    file small) and their outcomes; the ranking is computed per query at run time."""
    n = X.shape[0]
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:max_rows]) if n > max_rows else np.arange(n)
    return {"kind": "sw", "X": pack(X[keep], "f2"), "Y": pack(Y[:, keep], "f2")}


def fit_bootstrap(X: np.ndarray, Y: np.ndarray, members: int = 8, l2: float = 1e-3, kappa: float = 1.0,
                  seed: int = 0) -> dict[str, Any]:
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    Ws, bs = [], []
    for _ in range(members):
        idx = rng.integers(0, n, n)
        W, b = fit_logistic(_sparse(X[idx]), Y[:, idx], l2)
        Ws.append(W)
        bs.append(b)
    return {"kind": "bootstrap", "kappa": float(kappa), "W": pack(np.stack(Ws)), "b": pack(np.stack(bs))}
