"""Features of a query's text alone, for pre-call routers (pure, deterministic).

    text_features(prompt, buckets) -> (indices, values)

Hashed bag of words and word bigrams (scikit-learn's `HashingVectorizer`): the
prompt is lower-cased, split into runs of letters/digits, and every unigram and
bigram is hashed (MurmurHash3, stable across processes and machines) into
`buckets` buckets; a bucket present is 1, and the vector is L2-normalised.
With `shapes`, the text's word shapes are hashed too: the prompt again with each
number written as its count of digits (`47 times 8` -> `num2 times num1`), so a
router can tell two-digit products from one-digit ones without having seen the
numbers.
`QueryFeaturizer` adds log prompt length and a one-hot of the query's category
(when the categories are known) in the columns after the buckets.

`fit_logistic` fits the per-model L2-regularised logistic regressions with
scikit-learn, so the policy and its tuner share one copy.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np
import scipy.sparse as sp

from .errors import PolicyError

if TYPE_CHECKING:
    from sklearn.feature_extraction.text import HashingVectorizer

DEFAULT_BUCKETS = 4096
TOKEN_PATTERN = r"[a-z0-9]+"


@lru_cache(maxsize=16)
def _vectorizer(buckets: int) -> HashingVectorizer:
    # scikit-learn (with scipy.stats) takes about a second to import, which every process
    # loading a portfolio (each `cascade` command, each tier worker) would pay otherwise
    from sklearn.feature_extraction.text import HashingVectorizer  # deferred: see above

    return HashingVectorizer(n_features=buckets, token_pattern=TOKEN_PATTERN, lowercase=True, ngram_range=(1, 2),
                             binary=True, norm="l2", alternate_sign=False, dtype=np.float64)


def hashed(prompts: Sequence[str], buckets: int = DEFAULT_BUCKETS) -> sp.csr_matrix:
    """(len(prompts), buckets) hashed unigrams and bigrams, rows L2-normalised."""
    return _vectorizer(buckets).transform(list(prompts))


_NUMBER = re.compile(r"\d+")


def shape(prompt: str) -> str:
    """The prompt with every run of digits replaced by num<its length>."""
    return _NUMBER.sub(lambda m: f" num{len(m.group())} ", prompt)


def hashed_text(prompts: Sequence[str], buckets: int = DEFAULT_BUCKETS, shapes: bool = False) -> sp.csr_matrix:
    """`hashed`, plus with `shapes` the hashed word shapes, each row L2-normalised again."""
    X = hashed(prompts, buckets)
    if not shapes:
        return X
    X = (X + hashed([shape(p) for p in prompts], buckets)).tocsr()
    X.data[:] = 1.0  # presence, as in `hashed`: a bucket present in both counts once
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ X)


@lru_cache(maxsize=4096)
def text_features(prompt: str, buckets: int = DEFAULT_BUCKETS, shapes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sorted bucket indices and their values (L2-normalised presence)."""
    row = hashed_text([prompt], buckets, shapes)
    row.sort_indices()
    idx, vals = row.indices.astype(np.int64), row.data.copy()
    idx.setflags(write=False)
    vals.setflags(write=False)
    return idx, vals


class QueryFeaturizer:
    """prompt + category -> sparse feature vector of width `dim`:
    [0, buckets): hashed text (and word shapes with `shapes`); buckets: log(1 + prompt
    chars) / 8; then one column per known category (none set for an unknown or absent
    category)."""

    def __init__(self, buckets: int = DEFAULT_BUCKETS, categories: Sequence[str] = (), shapes: bool = False):
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 16 <= buckets <= 1 << 20:
            raise PolicyError(f"buckets must be an integer in [16, 2**20], got {buckets!r}")
        if not isinstance(shapes, bool):
            raise PolicyError(f"shapes must be true or false, got {shapes!r}")
        self.buckets = buckets
        self.shapes = shapes
        self.categories = tuple(str(c) for c in categories)
        self._cat = {c: buckets + 1 + j for j, c in enumerate(self.categories)}
        self.dim = buckets + 1 + len(self.categories)

    _shared: dict[tuple[int, tuple[str, ...], bool], "QueryFeaturizer"] = {}
    CACHE = 1 << 16

    @classmethod
    def shared(cls, buckets: int = DEFAULT_BUCKETS, categories: Sequence[str] = (),
               shapes: bool = False) -> "QueryFeaturizer":
        """One featurizer (and its cache of query vectors) per configuration, so the many
        policy instances an evaluation builds featurize each query once."""
        key = (buckets, tuple(str(c) for c in categories), shapes)
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

    def _extras(self, prompt: str, category: str | None) -> tuple[list[int], list[float]]:
        cols, vals = [self.buckets], [math.log1p(len(prompt)) / 8.0]
        c = self._cat.get(category) if category is not None else None
        if c is not None:
            cols.append(c)
            vals.append(1.0)
        return cols, vals

    def _compute(self, prompt: str, category: str | None) -> tuple[np.ndarray, np.ndarray]:
        idx, vals = text_features(prompt, self.buckets, self.shapes)
        extra_i, extra_v = self._extras(prompt, category)
        idx, vals = np.concatenate([idx, extra_i]), np.concatenate([vals, extra_v])
        idx.setflags(write=False)
        vals.setflags(write=False)
        return idx, vals

    def matrix(self, items: Sequence[tuple[str, str | None]]) -> sp.csr_matrix:
        """(len(items), dim) CSR matrix of the same vectors `__call__` gives."""
        text = hashed_text([p for p, _ in items], self.buckets, self.shapes)
        rows, cols, vals = [], [], []
        for r, (prompt, category) in enumerate(items):
            c, v = self._extras(prompt, category)
            rows += [r] * len(c)
            cols += c
            vals += v
        extra = sp.csr_matrix((vals, (rows, cols)), shape=(len(items), self.dim))
        return (sp.hstack([text, sp.csr_matrix((len(items), self.dim - self.buckets))], format="csr") + extra).tocsr()


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_logistic(X: sp.spmatrix | np.ndarray, Y: np.ndarray, l2: float, iters: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """k independent logistic regressions sharing X (n, dim): per row m of Y (labels in
    [0, 1]) minimise mean log-loss + l2/2 |w_m|^2 (bias not penalised), i.e.
    scikit-learn's C = 1 / (l2 n). A fractional label y counts as a positive row of
    weight y and a negative row of weight 1 - y. Returns (W (k, dim), b (k,)).
    A label row of one class only gets the zero weights and the logit of its
    (clipped) mean, the regression's limit."""
    Y = np.asarray(Y, dtype=float)
    n, d = X.shape
    W, b = np.zeros((Y.shape[0], d)), np.zeros(Y.shape[0])
    from sklearn.linear_model import LogisticRegression  # deferred, see _vectorizer

    XX = sp.vstack([X, X], format="csr") if sp.issparse(X) else np.vstack([X, X])
    for m, y in enumerate(Y):
        if y.min() == y.max():
            p = float(np.clip(y[0], 1e-3, 1 - 1e-3))
            b[m] = math.log(p / (1 - p))
            continue
        labels = np.r_[np.ones(n), np.zeros(n)]
        weight = np.r_[y, 1.0 - y]
        keep = weight > 0
        lr = LogisticRegression(C=1.0 / (l2 * n), max_iter=iters, tol=1e-6)
        lr.fit(XX[keep], labels[keep], sample_weight=weight[keep])
        W[m], b[m] = lr.coef_[0], lr.intercept_[0]
    return W, b
