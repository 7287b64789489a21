"""Tuner of the logistic-router policy (reads only the train table; `confirm` replays the choice)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.features import DEFAULT_BUCKETS, QueryFeaturizer, fit_logistic, sigmoid
from router.core.policies import make_policy
from router.core.policies.logistic_router import weights_text
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.tuning import (
    NotApplicable,
    Tuner,
    cost_order,
    select_index,
)

WEIGHT_DECIMALS = 4


def routes(P: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """P (k, n): predicted success per order position -> (A, n) chosen positions:
    the first position with P >= alpha, else the argmax (first on ties)."""
    ok = P[None, :, :] >= alphas[:, None, None]
    return np.where(ok.any(axis=1), ok.argmax(axis=1), np.argmax(P, axis=0)[None, :])


class LogisticRouterTuner(Tuner):
    """Fit the per-model regressions on the train rows only, then sweep alpha.

    In-sample predictions of a learned router are optimistic, so alpha is chosen
    on out-of-fold predictions within the train rows (`inner_folds` folds; above
    `holdout_above` rows one fold only, as a hold-out, to stay fast); the reported
    train accuracy and cost are those of the final model (fitted on every train
    row) on the train rows, i.e. what `router.simulate` replays."""

    policy = "logistic-router"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, l2: float = 1e-3, buckets: int = DEFAULT_BUCKETS,
                 inner_folds: int = 5, holdout_above: int = 4000, seed: int = 0, **options: Any):
        super().__init__(table, infos, **options)
        n = table.n
        if n < 10:
            raise NotApplicable(f"{n} train rows are too few to fit a router")
        order = cost_order(table)
        names = [infos[i].name for i in order]
        cats = sorted({r.category for r in table.records if r.category is not None})
        X = QueryFeaturizer.shared(buckets, cats).matrix([(r.prompt, r.category) for r in table.records])
        correct, costs = table.correct[order], table.cost[order]

        k = max(2, min(int(inner_folds), n // 5))
        perm = np.random.default_rng(seed).permutation(n)
        fold = np.empty(n, dtype=int)
        fold[perm] = np.arange(n) % k
        oof = np.full((len(order), n), np.nan)
        for f in ([0] if n > holdout_above else range(k)):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            W, b = fit_logistic(X[tr], correct[:, tr], l2)
            oof[:, te] = sigmoid((X[te] @ W.T).T + b[:, None])
        sel = np.flatnonzero(np.isfinite(oof[0]))

        W, b = fit_logistic(X, correct, l2)
        models = {}
        for j, name in enumerate(names):
            w = np.round(W[j], WEIGHT_DECIMALS)
            models[name] = {"bias": round(float(b[j]), WEIGHT_DECIMALS),
                            "w": weights_text((c, w[c]) for c in np.flatnonzero(w))}
        self.base = {"order": names, "features": {"buckets": buckets, "categories": cats}, "models": models}
        # in-sample predictions with the policy's own arithmetic on the rounded weights
        pol = make_policy("logistic-router", infos, {"alpha": 0.5, **self.base})
        p_in = np.array([pol.probs(r.query()) for r in table.records]).T

        # routable sets searched: every model; the models not dominated on train (cost, accuracy);
        # each of those with the most accurate one; the most accurate one alone (= the best single)
        acc = table.accuracy()
        pos_of = {t: j for j, t in enumerate(order)}
        front = [t for t in order if not any(
            acc[u] >= acc[t] and table.mean_cost()[u] <= table.mean_cost()[t] and
            (acc[u] > acc[t] or table.mean_cost()[u] < table.mean_cost()[t]) for u in order if u != t)]
        top = max(front, key=lambda t: (acc[t], -pos_of[t]))
        subsets = [tuple(order), tuple(front)] + [(t, top) for t in front if t != top] + [(top,)]
        subsets = list(dict.fromkeys(subsets))
        qs = np.quantile(oof[:, sel], np.linspace(0, 1, 101), method="lower").ravel()
        alphas = np.unique(np.concatenate([np.linspace(0.0, 1.0, 101), qs, [1.0 + 1e-6]]))
        cols, sc = np.arange(n), np.arange(sel.size)
        self.configs: list[tuple[tuple[int, ...], float]] = []
        a_in, c_in, a_sel, c_sel = [], [], [], []
        for sub in subsets:
            rows = [pos_of[t] for t in sub]
            al = alphas if len(sub) > 1 else np.array([0.0])
            r_in = np.array(rows)[routes(p_in[rows], al)]
            a_in.append(correct[r_in, cols].mean(axis=1))
            c_in.append(costs[r_in, cols].mean(axis=1))
            r_oof = np.array(rows)[routes(oof[rows][:, sel], al)]
            a_sel.append(correct[:, sel][r_oof, sc].mean(axis=1))
            c_sel.append(costs[:, sel][r_oof, sc].mean(axis=1))
            self.configs += [(sub, float(x)) for x in al]
        self._acc_in, self._cost_in = np.concatenate(a_in), np.concatenate(c_in)
        self._acc_sel, self._cost_sel = np.concatenate(a_sel), np.concatenate(c_sel)
        self.search = {"alphas": int(alphas.size), "order": names, "l2": l2, "buckets": buckets,
                       "categories": len(cats), "routable_sets": [[infos[t].name for t in sub] for sub in subsets],
                       "alpha_chosen_on": f"out-of-fold predictions on {sel.size} of {n} train rows"}

    def select(self, target):
        i = select_index(self._acc_sel, self._cost_sel, self.resolve(target), "router (out-of-fold on train)")
        sub, alpha = self.configs[i]
        names = [self.infos[t].name for t in sub]
        params = {"alpha": alpha, "order": names, "features": self.base["features"],
                  "models": {m: self.base["models"][m] for m in names}}
        return self._fitted(target, params, self._acc_in[i], self._cost_in[i],
                            search=dict(self.search),
                            note="alpha chosen on out-of-fold train predictions; train figures: final model in-sample")


