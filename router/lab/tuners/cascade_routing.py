"""Tuner of the cascade-routing policy.

Tuners for the cascade-routing and automix policies (registered in
router.tuning.TUNERS).

Both fit their estimators on the rows of the table they are given (the train
split, or the k-1 tuning folds) and nothing else, then sweep lam (and the chain):
every configuration is replayed on those rows with `router.simulate`, so the
search's figures are simulate's by construction (`confirm` re-checks them).

- cascade-routing: per tier, a binned-then-isotonic calibration of
  P(correct | own confidence) (`bins` quantile bins, one pseudo-count towards the
  tier's train accuracy, pooled-adjacent-violators for monotonicity); the
  ex-ante distribution of that estimate (per category where a category has at
  least `min_category_rows` train rows); the mean train cost. Chains: the tiers
  not dominated on train in cost order (as the threshold tuner prunes), all of
  them and every pair of them; lam: 0, `lambdas` quantiles of the first step's
  gain/cost ratios on train, and one above them all.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core.policies.cascade_routing import Estimates
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.tuning import (
    NotApplicable,
    SweepTuner,
    TuningError,
    bin_index,
    given_chain,
    pav,
    pick_signal,
    quantile_edges,
    round6,
    undominated_pool,
)


def fit_estimates(x: np.ndarray, y: np.ndarray, cost: np.ndarray, categories: Sequence[str | None],
                  bins: int = 10, min_category_rows: int = 40) -> dict[str, Any]:
    """One tier's estimates for the cascade-routing params, from its train rows."""
    m = float(y.mean())
    edges = quantile_edges(x, bins)
    b = bin_index(x, edges)
    fin = b >= 0
    k = len(edges) + 1
    n_b = np.bincount(b[fin], minlength=k).astype(float)
    s_b = np.bincount(b[fin], weights=y[fin], minlength=k)
    levels = [round6(v) for v in pav(list((s_b + m) / (n_b + 1)), list(n_b + 1))]
    n_m = float((~fin).sum())
    missing = round6((y[~fin].sum() + m) / (n_m + 1))

    def dist(rows: np.ndarray) -> list[list[float]]:
        w: dict[float, float] = {}
        for lv, cnt in zip(levels, np.bincount(b[rows & fin], minlength=k)):
            if cnt:
                w[lv] = w.get(lv, 0.0) + float(cnt)
        cnt_m = float((rows & ~fin).sum())
        if cnt_m:
            w[missing] = w.get(missing, 0.0) + cnt_m
        z = sum(w.values())
        return [[v, round6(c / z)] for v, c in sorted(w.items())]

    every = np.ones(len(y), dtype=bool)
    cats = np.array([c if c is not None else "" for c in categories], dtype=object)
    by_cat = {}
    for c in sorted({c for c in categories if c is not None}):
        rows = cats == c
        if rows.sum() >= min_category_rows:
            by_cat[c] = dist(rows)
    out = {"cost": float(cost.mean()), "accuracy": round6(m), "edges": edges, "levels": levels,
           "missing": missing, "dist": dist(every)}
    if by_cat:
        out["by_category"] = by_cat
    return out


class CascadeRoutingTuner(SweepTuner):
    policy = "cascade-routing"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 chain: Sequence[str] | None = None, prune: bool = True, bins: int = 10,
                 min_category_rows: int = 40, lambdas: int = 24, **options: Any):
        super().__init__(table, infos)
        if options:
            raise TuningError(f"policy 'cascade-routing': unknown tuning option(s) {sorted(options)}")
        self.signal = pick_signal(table, signal, "cascade routing")
        conf = table.conf[self.signal]
        if not np.isfinite(conf).any():
            raise NotApplicable(f"no finite {self.signal!r} confidence is recorded, so cascade routing cannot run")
        cats = [r.category for r in table.records]
        est = {infos[i].name: fit_estimates(conf[i], table.correct[i], table.cost[i], cats, bins, min_category_rows)
               for i in range(len(infos))}
        by_name = {t.name: t.index for t in infos}
        self.search: dict[str, Any] = {"signal": self.signal, "bins": bins}
        if chain is not None:
            chains = [given_chain(chain, by_name)]
        else:
            pool, pruned = undominated_pool(table, infos, prune)
            self.search.update({"models": [infos[i].name for i in pool], "pruned": pruned})
            chains = [tuple(pool)] + [c for c in itertools.combinations(pool, 2) if len(pool) > 2]
        configs = []
        for c in chains:
            names = [infos[i].name for i in c]
            sub = {n: est[n] for n in names}
            lams = [0.0]
            if len(c) > 1:
                e0 = Estimates(names[0], sub[names[0]])
                q0 = [e0.post(None if not np.isfinite(v) else float(v)) for v in conf[c[0]]]
                ratios = []
                for n in names[1:]:
                    ej = Estimates(n, sub[n])
                    if ej.cost > 0:
                        ratios += [ej.gain(q, cat) / ej.cost for q, cat in zip(q0, cats)]
                r = np.array([x for x in ratios if x > 0])
                if r.size:
                    lams += [float(v) for v in np.unique(np.quantile(r, np.linspace(0, 1, lambdas)))]
                    lams.append(float(r.max()) * 2.0)
            for lam in lams:
                configs.append({"signal": self.signal, "lam": lam, "chain": names, "estimates": sub})
        self.search["chains"] = len(chains)
        self._sweep(configs)


