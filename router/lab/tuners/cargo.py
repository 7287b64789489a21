"""Tuner of the cargo policy: a ridge regression of each model's score on the train
rows, pairwise tie-break classifiers, and (lam, delta) chosen on out-of-fold
predictions (tie-breaks of each fold fitted on that fold's training rows only)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.features import fit_logistic
from router.core.quality import pack, sigmoid, unpack
from router.lab.quality_fit import fit_linear

from .quality_routing import QualityRoutingTuner

DELTAS = (0.0, 0.02, 0.05, 0.1, 0.2)
MIN_PAIR_ROWS = 20


def fit_tiebreaks(X: np.ndarray, Y: np.ndarray, names: Sequence[str], l2: float) -> dict[str, dict[str, Any]]:
    """Per pair a (cheaper) < b (dearer): P(a right and b wrong | they differ), fitted on the
    rows where exactly one of them was right (pairs with too few such rows of either
    kind get none: the cheaper model is taken)."""
    out = {}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            differ = np.flatnonzero(Y[a] != Y[b])
            y = (Y[a, differ] > Y[b, differ]).astype(float)
            if min(y.sum(), (1 - y).sum()) < MIN_PAIR_ROWS // 2 or differ.size < MIN_PAIR_ROWS:
                continue
            W, bias = fit_logistic(X[differ], y[None, :], l2)
            out[f"{names[a]}|{names[b]}"] = {"w": pack(W[0]), "b": float(np.float32(bias[0]))}
    return out


def choices(score: np.ndarray, delta: float, tb_prob: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """Vectorised `Cargo.choose`: the top score, or within delta the tie-break's pick."""
    n, k = score.shape
    ranked = np.argsort(-score, axis=1, kind="stable")
    top = ranked[:, 0]
    if k < 2:
        return top
    rows = np.arange(n)
    second = ranked[:, 1]
    gap = score[rows, top] - score[rows, second]
    a, b = np.minimum(top, second), np.maximum(top, second)
    pick = a.copy()
    for (i, j), p in tb_prob.items():
        m = (a == i) & (b == j)
        pick[m] = np.where(p[m] >= 0.5, i, j)
    return np.where(gap >= delta, top, pick)


class CargoTuner(QualityRoutingTuner):
    policy = "cargo"

    def configure(self, l2: float = 1e-3, deltas: Sequence[float] = DELTAS, **options: Any) -> None:
        self.l2, self.deltas = float(l2), tuple(float(d) for d in deltas)
        super().configure(**options)

    def fit_predictor(self, X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
        return fit_linear(X, Y, l2=self.l2, link="identity")

    def extra_params(self) -> dict[str, Any]:
        if not hasattr(self, "_tiebreak"):
            e = self.enc
            self._tiebreak = fit_tiebreaks(e.X, e.Y, e.names, self.l2)
        return {"tiebreak": self._tiebreak, "delta": 0.0}

    def _probs(self, tiebreak: dict[str, dict[str, Any]], X: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        names = self.enc.names
        out = {}
        for key, m in tiebreak.items():
            a, _, b = key.partition("|")
            w = unpack(m["w"], "w", (X.shape[1],))
            out[(names.index(a), names.index(b))] = sigmoid(np.array([x @ w + m["b"] for x in X]))
        return out

    def decision_rules(self, pol, q_in, q_sel, sel):
        e, c = self.enc, self.enc.rel_cost
        p_in = self._probs(self.extra_params()["tiebreak"], e.X)
        p_oof: dict[tuple[int, int], np.ndarray] = {}
        n = e.X.shape[0]
        for _, te in self.fold_fits:
            tr = np.setdiff1d(np.arange(n), te)
            for pair, p in self._probs(fit_tiebreaks(e.X[tr], e.Y[:, tr], e.names, self.l2), e.X[te]).items():
                p_oof.setdefault(pair, np.full(n, 0.5))[te] = p
        p_sel = {pair: p[sel] for pair, p in p_oof.items()}
        for d in self.deltas:
            yield ({"delta": d},
                   (lambda lam, d=d: choices(q_in - lam * c, d, p_in)),
                   (lambda lam, d=d: choices(q_sel - lam * c, d, p_sel)))
