"""Features of a query's text alone, for pre-call routers (pure, deterministic).

    text_features(prompt, buckets) -> (indices, values)

Hashed bag of words and word bigrams: the prompt is lower-cased, split into runs
of letters/digits, and every unigram and bigram is hashed with CRC-32 (stable
across processes and machines, unlike Python's `hash`) into `buckets` buckets;
a bucket present is 1, and the vector is L2-normalised. `QueryFeaturizer` adds
log prompt length and a one-hot of the query's category (when the categories
are known) in the columns after the buckets.

The sparse training matrix and a small L2-regularised logistic regression
(L-BFGS in numpy) live here too, so the policy and its tuner share one copy.
"""
from __future__ import annotations

import math
import re
import zlib
from functools import lru_cache
from typing import Sequence

import numpy as np

from .errors import PolicyError

DEFAULT_BUCKETS = 4096
_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@lru_cache(maxsize=4096)
def text_features(prompt: str, buckets: int = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """Sorted bucket indices and their values (L2-normalised presence)."""
    toks = tokens(prompt)
    grams = toks + [f"{a} {b}" for a, b in zip(toks, toks[1:])]
    idx = np.unique(np.fromiter((zlib.crc32(g.encode()) % buckets for g in grams), dtype=np.int64, count=len(grams)))
    vals = np.full(idx.size, 1.0 / math.sqrt(idx.size)) if idx.size else np.zeros(0)
    idx.setflags(write=False)
    vals.setflags(write=False)
    return idx, vals


class QueryFeaturizer:
    """prompt + category -> sparse feature vector of width `dim`:
    [0, buckets): hashed text; buckets: log(1 + prompt chars) / 8; then one column
    per known category (none set for an unknown or absent category)."""

    def __init__(self, buckets: int = DEFAULT_BUCKETS, categories: Sequence[str] = ()):
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 16 <= buckets <= 1 << 20:
            raise PolicyError(f"buckets must be an integer in [16, 2**20], got {buckets!r}")
        self.buckets = buckets
        self.categories = tuple(str(c) for c in categories)
        self._cat = {c: buckets + 1 + j for j, c in enumerate(self.categories)}
        self.dim = buckets + 1 + len(self.categories)

    _shared: dict[tuple[int, tuple[str, ...]], "QueryFeaturizer"] = {}
    CACHE = 1 << 16

    @classmethod
    def shared(cls, buckets: int = DEFAULT_BUCKETS, categories: Sequence[str] = ()) -> "QueryFeaturizer":
        """One featurizer (and its cache of query vectors) per configuration, so the many
        policy instances an evaluation builds featurize each query once."""
        key = (buckets, tuple(str(c) for c in categories))
        f = cls._shared.get(key)
        if f is None:
            if len(cls._shared) >= 16:
                cls._shared.clear()
            f = cls._shared[key] = cls(*key)
        return f

    def __call__(self, prompt: str, category: str | None) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.setdefault("_cache", {})
        key = (prompt, category)
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= self.CACHE:
                cache.clear()
            hit = cache[key] = self._compute(prompt, category)
        return hit

    def _compute(self, prompt: str, category: str | None) -> tuple[np.ndarray, np.ndarray]:
        idx, vals = text_features(prompt, self.buckets)
        extra_i = [self.buckets]
        extra_v = [math.log1p(len(prompt)) / 8.0]
        c = self._cat.get(category) if category is not None else None
        if c is not None:
            extra_i.append(c)
            extra_v.append(1.0)
        idx, vals = np.concatenate([idx, extra_i]), np.concatenate([vals, extra_v])
        idx.setflags(write=False)
        vals.setflags(write=False)
        return idx, vals

    def matrix(self, items: Sequence[tuple[str, str | None]]) -> "Sparse":
        rows, cols, vals = [], [], []
        for r, (prompt, category) in enumerate(items):
            i, v = self(prompt, category)
            rows.append(np.full(i.size, r, dtype=np.int64))
            cols.append(i)
            vals.append(v)
        return Sparse(np.concatenate(rows) if rows else np.zeros(0, np.int64),
                      np.concatenate(cols) if cols else np.zeros(0, np.int64),
                      np.concatenate(vals) if vals else np.zeros(0), len(items), self.dim)


class Sparse:
    """A (n, dim) matrix as coordinate arrays, with the two products L-BFGS needs."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int, dim: int):
        self.rows, self.cols, self.vals, self.n, self.dim = rows, cols, vals, n, dim

    def take(self, which: np.ndarray) -> "Sparse":
        """The rows `which` (sorted row indices), renumbered 0..len-1."""
        pos = np.full(self.n, -1)
        pos[which] = np.arange(which.size)
        keep = pos[self.rows] >= 0
        return Sparse(pos[self.rows[keep]], self.cols[keep], self.vals[keep], int(which.size), self.dim)

    def dot(self, W: np.ndarray) -> np.ndarray:  # (k, dim) -> (k, n)
        return np.stack([np.bincount(self.rows, self.vals * w[self.cols], minlength=self.n) for w in W])

    def tdot(self, R: np.ndarray) -> np.ndarray:  # (k, n) -> (k, dim)
        return np.stack([np.bincount(self.cols, self.vals * r[self.rows], minlength=self.dim) for r in R])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_logistic(X: Sparse, Y: np.ndarray, l2: float, iters: int = 40, tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """k independent logistic regressions sharing X: minimise, per row m of Y (labels
    in [0, 1]), mean log-loss + l2/2 |w_m|^2 (bias not penalised), jointly by L-BFGS.
    Returns (W (k, dim), b (k,))."""
    k, n, d = Y.shape[0], X.n, X.dim

    def fg(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W, b = theta[:, :d], theta[:, d]
        Z = X.dot(W) + b[:, None]
        loss = float((np.logaddexp(0.0, Z) - Y * Z).sum() / n + 0.5 * l2 * (W * W).sum())
        R = (sigmoid(Z) - Y) / n
        g = np.empty_like(theta)
        g[:, :d] = X.tdot(R) + l2 * W
        g[:, d] = R.sum(axis=1)
        return loss, g

    theta = np.zeros((k, d + 1))
    mean = np.clip(Y.mean(axis=1), 1e-3, 1 - 1e-3)
    theta[:, d] = np.log(mean / (1 - mean))
    f, g = fg(theta)
    S: list[np.ndarray] = []
    Yk: list[np.ndarray] = []
    for _ in range(iters):
        if np.abs(g).max() < tol:
            break
        # two-loop recursion
        q = g.copy()
        alphas = []
        for s, y in zip(reversed(S), reversed(Yk)):
            a = (s * q).sum() / (y * s).sum()
            alphas.append(a)
            q -= a * y
        if S:
            q *= (S[-1] * Yk[-1]).sum() / (Yk[-1] * Yk[-1]).sum()
        for (s, y), a in zip(zip(S, Yk), reversed(alphas)):
            bb = (y * q).sum() / (y * s).sum()
            q += (a - bb) * s
        p = -q
        gp = (g * p).sum()
        if gp >= 0:
            p, gp = -g, -(g * g).sum()
            S.clear()
            Yk.clear()
        step = 1.0
        for _ls in range(30):
            new = theta + step * p
            f2, g2 = fg(new)
            if f2 <= f + 1e-4 * step * gp:
                break
            step *= 0.5
        else:
            break
        s, y = new - theta, g2 - g
        if (s * y).sum() > 1e-12:
            S.append(s)
            Yk.append(y)
            if len(S) > 8:
                S.pop(0)
                Yk.pop(0)
        converged = f - f2 < 1e-8 * max(1.0, abs(f))
        theta, f, g = new, f2, g2
        if converged:
            break
    return theta[:, :d], theta[:, d]
