"""Per-model quality predictors for the pre-call routers, rebuilt from plain JSON.

    QueryEncoder(text, buckets, categories): query -> dense vector x
    predictor_from_params(d, k, dim).predict(x) -> (k,) predicted quality per model

The encoder concatenates a text part (all-MiniLM sentence embeddings,
`router.core.embeddings`, 384 columns; or, where those are not installed, hashed
words and bigrams, `buckets` columns), log(1 + prompt chars) / 8, and a one-hot of
the query's category when the categories are known.

Predictors (the `kind` key), each fitted in the lab (`router.lab.quality_fit`):
- "linear": p_m = link(W_m . x + b_m), link "logit" (a classifier) or "identity"
  (a regression, CARGO's score).
- "mf": RouteLLM's matrix factorisation, s_m = V_m . (P^T x) + b_m, p = sigmoid(s):
  a shared projection of the query into `h` dimensions, one vector per model.
- "sw": RouteLLM's similarity-weighted ranking: the stored train queries are
  weighted 10 ** (10 * sim / max sim) by their cosine similarity to this query,
  a Bradley-Terry rating per model is fitted on the weighted pairwise outcomes
  (a win where one model was right and the other wrong, half a win each on a tie),
  and p_m = mean over the other models of sigmoid(r_m - r_other).
- "bootstrap": B linear classifiers fitted on bootstrap resamples (OptLLM): the mean
  prediction minus `kappa` times their standard deviation.

Arrays travel as {"shape", "dtype", "b64"} (little-endian bytes, base64): compact,
and bit-exact, so a policy rebuilt from its file predicts what the tuner replayed.
"""
from __future__ import annotations

import base64
import math
from typing import Any, Mapping, Sequence

import numpy as np

from . import embeddings
from .errors import PolicyError
from .features import hashed

TEXT_KINDS = ("embed", "hashed")
_DTYPES = {"f4": "<f4", "f2": "<f2", "u1": "u1"}


def pack(a: np.ndarray, dtype: str = "f4") -> dict[str, Any]:
    arr = np.ascontiguousarray(np.asarray(a), dtype=_DTYPES[dtype])
    return {"shape": list(arr.shape), "dtype": dtype, "b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def unpack(d: Any, what: str, shape: Sequence[int | None] | None = None) -> np.ndarray:
    """A packed array as float64 (checked against `shape`, None = any size there)."""
    try:
        dt = _DTYPES[d["dtype"]]
        arr = np.frombuffer(base64.b64decode(d["b64"]), dtype=dt).reshape([int(s) for s in d["shape"]])
    except (KeyError, TypeError, ValueError) as e:
        raise PolicyError(f"{what}: not a packed array ({e})") from None
    if shape is not None and (arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape))):
        raise PolicyError(f"{what}: shape {list(arr.shape)}, expected {['any' if s is None else s for s in shape]}")
    out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise PolicyError(f"{what}: holds NaN or infinite values")
    return out


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class QueryEncoder:
    _cache: dict[tuple[str, int, str], np.ndarray] = {}
    CACHE = 1 << 17

    def __init__(self, text: str = "embed", buckets: int = 256, categories: Sequence[str] = ()):
        if text not in TEXT_KINDS:
            raise PolicyError(f"features.text must be one of {', '.join(TEXT_KINDS)}, got {text!r}")
        if text == "embed" and not embeddings.available():
            raise PolicyError("this router was fitted on sentence embeddings, which are not installed here: "
                              + embeddings.INSTALL_HINT)
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 16 <= buckets <= 4096:
            raise PolicyError(f"features.buckets must be an integer in [16, 4096], got {buckets!r}")
        self.text, self.buckets = text, buckets
        self.categories = tuple(str(c) for c in categories)
        self._cat = {c: j for j, c in enumerate(self.categories)}
        self.text_dim = embeddings.DIM if text == "embed" else buckets
        self.dim = self.text_dim + 1 + len(self.categories)

    def params(self) -> dict[str, Any]:
        return {"text": self.text, "buckets": self.buckets, "categories": list(self.categories)}

    def _text(self, prompts: Sequence[str]) -> np.ndarray:
        keys = [(self.text, self.buckets, p) for p in prompts]
        miss = list(dict.fromkeys(k[2] for k in keys if k not in self._cache))
        if miss:
            vecs = (embeddings.embed(miss).astype(np.float64) if self.text == "embed"
                    else hashed(miss, self.buckets).toarray())
            if len(self._cache) + len(miss) > self.CACHE:
                QueryEncoder._cache.clear()
            for p, v in zip(miss, vecs):
                QueryEncoder._cache[(self.text, self.buckets, p)] = v
        return np.stack([self._cache[k] for k in keys]) if keys else np.zeros((0, self.text_dim))

    def warm(self, texts: Sequence[str]) -> None:
        """Hash a replay's texts in one batch (one call per query costs more than the
        hashing); embeddings are left to be computed for the prompts a policy reads."""
        if self.text == "hashed":
            self._text(list(dict.fromkeys(texts))[: self.CACHE // 2])

    def matrix(self, prompts: Sequence[str], categories: Sequence[str | None]) -> np.ndarray:
        n = len(prompts)
        X = np.zeros((n, self.dim))
        X[:, : self.text_dim] = self._text(prompts)
        X[:, self.text_dim] = [math.log1p(len(p)) / 8.0 for p in prompts]
        for r, c in enumerate(categories):
            j = self._cat.get(c) if c is not None else None
            if j is not None:
                X[r, self.text_dim + 1 + j] = 1.0
        return X

    def vector(self, prompt: str, category: str | None) -> np.ndarray:
        return self.matrix([prompt], [category])[0]


# -- predictors ----------------------------------------------------------------------
class Predictor:
    kind = ""

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, dim) -> (n, k) predicted quality per model."""
        raise NotImplementedError


class Linear(Predictor):
    kind = "linear"

    def __init__(self, d: Mapping[str, Any], k: int, dim: int):
        self.W = unpack(d.get("W"), "predictor.W", (k, dim))
        self.b = unpack(d.get("b"), "predictor.b", (k,))
        self.link = d.get("link", "logit")
        if self.link not in ("logit", "identity"):
            raise PolicyError(f"predictor.link must be 'logit' or 'identity', got {self.link!r}")

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = X @ self.W.T + self.b
        return sigmoid(z) if self.link == "logit" else z


class MatrixFactorization(Predictor):
    kind = "mf"

    def __init__(self, d: Mapping[str, Any], k: int, dim: int):
        self.P = unpack(d.get("P"), "predictor.P", (dim, None))
        self.V = unpack(d.get("V"), "predictor.V", (k, self.P.shape[1]))
        self.b = unpack(d.get("b"), "predictor.b", (k,))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return sigmoid((X @ self.P) @ self.V.T + self.b)


def bradley_terry(wins: np.ndarray, iters: int = 100) -> np.ndarray:
    """Ratings r (mean 0) from a (k, k) matrix of (weighted) wins of row over column,
    by the minorisation-maximisation updates of the Bradley-Terry likelihood."""
    k = wins.shape[0]
    games = wins + wins.T
    pi = np.ones(k)
    for _ in range(iters):
        denom = (games / (pi[:, None] + pi[None, :])).sum(axis=1)
        new = wins.sum(axis=1) / np.maximum(denom, 1e-300)
        new = np.maximum(new, 1e-12)
        new /= np.exp(np.log(new).mean())
        if np.abs(new - pi).max() < 1e-10:
            pi = new
            break
        pi = new
    r = np.log(pi)
    return r - r.mean()


def pairwise_wins(Y: np.ndarray, w: np.ndarray, prior: float = 1.0) -> np.ndarray:
    """(k, k) weighted wins from outcomes Y (k, m) in [0, 1] with row weights w (m,):
    a beats b by Y_a - Y_b where positive; a tie splits its weight; plus `prior`
    half-wins both ways so every rating is finite."""
    diff = Y[:, None, :] - Y[None, :, :]
    win = (np.clip(diff, 0, None) + 0.5 * (1.0 - np.abs(diff))) @ w
    np.fill_diagonal(win, 0.0)
    return win + prior * 0.5 * (1 - np.eye(Y.shape[0]))


class SimilarityWeighted(Predictor):
    kind = "sw"

    def __init__(self, d: Mapping[str, Any], k: int, dim: int):
        self.X = unpack(d.get("X"), "predictor.X", (None, dim))
        self.Y = unpack(d.get("Y"), "predictor.Y", (k, self.X.shape[0]))
        norms = np.linalg.norm(self.X, axis=1)
        self.Xn = self.X / np.where(norms > 0, norms, 1.0)[:, None]

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((X.shape[0], self.Y.shape[0]))
        for i, x in enumerate(X):
            nx = np.linalg.norm(x)
            sim = self.Xn @ (x / nx if nx > 0 else x)
            top = sim.max()
            w = 10.0 ** (10.0 * sim / top) if top > 0 else np.ones_like(sim)
            r = bradley_terry(pairwise_wins(self.Y, w / w.sum() * len(w)))
            p = 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))
            np.fill_diagonal(p, 0.0)
            out[i] = p.sum(axis=1) / max(1, len(r) - 1)
        return out


class Bootstrap(Predictor):
    kind = "bootstrap"

    def __init__(self, d: Mapping[str, Any], k: int, dim: int):
        self.W = unpack(d.get("W"), "predictor.W", (None, k, dim))
        self.b = unpack(d.get("b"), "predictor.b", (self.W.shape[0], k))
        try:
            self.kappa = float(d.get("kappa", 0.0))
        except (TypeError, ValueError):
            raise PolicyError(f"predictor.kappa must be a number, got {d.get('kappa')!r}") from None
        if not math.isfinite(self.kappa):
            raise PolicyError("predictor.kappa must be finite")

    def members(self, X: np.ndarray) -> np.ndarray:
        """(B, n, k) predictions of every bootstrap member."""
        return sigmoid(np.einsum("nd,bkd->bnk", X, self.W) + self.b[:, None, :])

    def predict(self, X: np.ndarray) -> np.ndarray:
        m = self.members(X)
        return m.mean(axis=0) - self.kappa * m.std(axis=0)


PREDICTORS: dict[str, type[Predictor]] = {
    c.kind: c for c in (Linear, MatrixFactorization, SimilarityWeighted, Bootstrap)
}


def predictor_from_params(d: Any, k: int, dim: int, kinds: Sequence[str] = tuple(PREDICTORS)) -> Predictor:
    if not isinstance(d, Mapping):
        raise PolicyError("predictor must be an object with a 'kind' (fit it with `cascade tune`)")
    kind = d.get("kind")
    if kind not in kinds:
        raise PolicyError(f"predictor.kind must be one of {', '.join(kinds)}, got {kind!r}")
    return PREDICTORS[kind](d, k, dim)
