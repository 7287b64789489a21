"""Tuner of the hybrid-llm policy, on train rows only.

Pairs searched: each model on the train (cost, accuracy) front with the most
accurate one. Labels (all three searched; the choice is made per target on
out-of-fold predictions like the threshold):
- deterministic: 1[H >= 0], H = small's outcome - large's on that row;
- probabilistic: the share of the row's `neighbours` most similar train queries
  (cosine on the query vector, among at most `reference` rows) where H >= 0;
- transformed: 1[H~ >= -t] with H~ the neighbours' mean gap and t the value that
  balances the labels (the paper's t; ours is read off the train rows).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.policies import make_policy
from router.core.policy import TierInfo
from router.core.quality import predictor_from_params
from router.lab.labelled import Table
from router.lab.quality_fit import fit_linear
from router.lab.tuning import Fitted, NotApplicable, Target, Tuner, select_index

from .quality_routing import Encoded, folds_of

LABELS = ("deterministic", "probabilistic", "transformed")


def neighbour_mean(X: np.ndarray, V: np.ndarray, neighbours: int, reference: int, seed: int) -> np.ndarray:
    """Per row of X, the mean of V (n, ...) over its most similar reference rows (itself included)."""
    n = X.shape[0]
    ref = np.sort(np.random.default_rng(seed).permutation(n)[:reference])
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    R = Xn[ref]
    k = min(neighbours, ref.size)
    out = np.empty((n,) + V.shape[1:])
    for s in range(0, n, 1000):
        sim = Xn[s : s + 1000] @ R.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[s : s + 1000] = V[ref[top]].mean(axis=1)
    return out


class HybridLLMTuner(Tuner):
    policy = "hybrid-llm"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, text: str | None = None, buckets: int = 512,
                 l2: float = 1e-3, neighbours: int = 20, reference: int = 1500, inner_folds: int = 3,
                 holdout_above: int = 1500, seed: int = 0, **options: Any):
        super().__init__(table, infos, **options)
        e = Encoded(table, infos, "policy 'hybrid-llm'", text, buckets)
        acc, cost = table.accuracy()[e.order], table.mean_cost()[e.order]
        k, n = len(e.order), table.n
        front = [j for j in range(k) if not any(acc[u] >= acc[j] and cost[u] <= cost[j] and
                                                 (acc[u] > acc[j] or cost[u] < cost[j]) for u in range(k))]
        top = max(front, key=lambda j: (acc[j], -j))
        pairs = [(j, top) for j in front if j != top]
        if not pairs:
            raise NotApplicable("policy 'hybrid-llm': no model on the train front is cheaper than the most "
                                f"accurate one ({e.names[top]}), so there is nothing to route to")
        rows, folds = np.arange(n), folds_of(n, inner_folds, holdout_above, seed)
        self.configs, a_in, c_in, a_sel, c_sel = [], [], [], [], []
        self.search = {"pairs": [[e.names[s], e.names[l]] for s, l in pairs], "text": e.encoder.text,
                       "labels": [], "skipped": []}
        for s, l in pairs:
            H = e.Y[s] - e.Y[l]
            smooth = neighbour_mean(e.X, np.stack([(H >= 0).astype(float), H], axis=1), neighbours, reference, seed)
            t = -float(np.quantile(smooth[:, 1], 0.5))
            labels = {"deterministic": ((H >= 0).astype(float), 0.0), "probabilistic": (smooth[:, 0], 0.0),
                      "transformed": ((smooth[:, 1] >= -t).astype(float), t)}
            for kind, (y, tt) in labels.items():
                pos = int((y >= 0.5).sum())
                if pos in (0, n) or y.min() == y.max():
                    self.search["skipped"].append(f"{e.names[s]}/{kind}: all {n} labels one class ({pos} positive)")
                    continue
                oof = np.full(n, np.nan)
                for tr, te in folds:
                    oof[te] = predictor_from_params(fit_linear(e.X[tr], y[None, tr], l2), 1, e.encoder.dim).predict(e.X[te])[:, 0]
                sel = np.flatnonzero(np.isfinite(oof))
                params = {"small": e.names[s], "large": e.names[l], "labels": kind, "t": tt,
                          "features": e.encoder.params(), "predictor": fit_linear(e.X, y[None, :], l2)}
                pol = make_policy(self.policy, infos, {**params, "threshold": 0.5})
                p_in = np.array([pol.p_small(r.query()) for r in table.records])
                ths = np.unique(np.concatenate([np.quantile(oof[sel], np.linspace(0, 1, 101), method="lower"),
                                                [0.0, 1.0 + 1e-9]]))
                for th in ths:
                    ci, cs = np.where(p_in >= th, s, l), np.where(oof[sel] >= th, s, l)
                    a_in.append(e.Y[ci, rows].mean())
                    c_in.append(e.C[ci, rows].mean())
                    a_sel.append(e.Y[cs, sel].mean())
                    c_sel.append(e.C[cs, sel].mean())
                    self.configs.append({**params, "threshold": float(th)})
                self.search["labels"].append(f"{e.names[s]}/{kind}")
        if not self.configs:
            raise NotApplicable("policy 'hybrid-llm': " + "; ".join(self.search["skipped"]))
        self._acc_in, self._cost_in = np.array(a_in), np.array(c_in)
        self._acc_sel, self._cost_sel = np.array(a_sel), np.array(c_sel)

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc_sel, self._cost_sel, self.resolve(target), "hybrid-llm (out-of-fold on train)")
        return self._fitted(target, self.configs[i], self._acc_in[i], self._cost_in[i], search=dict(self.search),
                            note="labels and threshold chosen on out-of-fold train predictions")
