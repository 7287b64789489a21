"""Tuner of the routed threshold cascade: fit the pre-call router, then search its
alpha jointly with the cascade's thresholds (reads only the train table).

The router's regressions (one per chain tier, P(correct | query text)) are fitted
on the train rows; alpha and the thresholds are chosen on out-of-fold predictions
within them (`inner_folds` folds), since in-sample predictions of a learned router
are optimistic. The reported train accuracy and cost are those of the final router
(fitted on every train row) with the chosen knobs, computed with the policy's own
arithmetic, i.e. what `router.simulate` replays (`confirm` checks it).

A query routed to a chain tier skips the tiers before it: in the vectorised search
they neither cost nor accept (cost 0, signal NaN), which is what the policy does.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.features import DEFAULT_BUCKETS, QueryFeaturizer, fit_logistic, sigmoid
from router.core.policies import make_policy
from router.core.policies.logistic_router import weights_text
from router.core.policy import TierInfo
from router.lab.labelled import CONFIDENCE_SIGNALS, Table
from router.lab.tuning import Fitted, NotApplicable, Target, Tuner, TuningError, cost_order, given_chain, select_index

from .logistic_router import routes
from .threshold import _candidates, chain_grid

WEIGHT_DECIMALS = 4
ALPHAS = 41  # router alphas searched: as many evenly spaced and at quantiles of the out-of-fold predictions
THRESHOLDS = 30  # candidate thresholds per non-last chain tier
MAX_TIERS = 3  # the threshold grid grows as THRESHOLDS ** (tiers - 1)


def grid(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, start: np.ndarray,
         cands: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean cost of the chain (rows of conf/correct/cost, cheapest first)
    for every threshold combination, each query starting at chain position start[j]."""
    k = conf.shape[0]
    skipped = np.arange(k)[:, None] < start[None, :]
    c = np.where(skipped, np.nan, conf)
    s = np.where(skipped, 0.0, cost)
    return chain_grid(list(c), list(correct), list(s), cands)


class RoutedThresholdTuner(Tuner):
    policy = "routed-threshold"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 chain: Sequence[str] | None = None, l2: float = 1e-2, buckets: int = DEFAULT_BUCKETS,
                 shapes: bool = True, inner_folds: int = 5, seed: int = 0, **options: Any):
        super().__init__(table, infos, **options)
        n = table.n
        if n < 20:
            raise NotApplicable(f"{n} train rows are too few to fit a router")
        by_name = {t.name: t.index for t in infos}
        if chain is None and len(infos) > MAX_TIERS:
            raise NotApplicable(f"routed-threshold searches one chain of at most {MAX_TIERS} tiers; "
                                f"name it (chain=[...]) among the {len(infos)} tiers")
        ch = given_chain(chain, by_name) if chain is not None else tuple(cost_order(table))
        if len(ch) > MAX_TIERS:
            raise TuningError(f"routed-threshold: a chain of at most {MAX_TIERS} tiers, got {len(ch)}")
        if len(ch) < 2:
            raise NotApplicable("a routed cascade needs a chain of at least two tiers")
        if signal is None:  # as the threshold tuner: the recorded confidence most rows have
            counts = {s: int(np.isfinite(table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
            signal = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
        if signal not in table.conf:
            raise TuningError(f"signal {signal!r} is not recorded; recorded: {', '.join(table.conf)}")
        conf = table.conf[signal][list(ch)]
        if not np.isfinite(conf[:-1]).any(axis=1).all():
            raise NotApplicable(f"a non-last chain tier has no finite {signal!r}")
        correct, cost = table.correct[list(ch)], table.cost[list(ch)]
        names = [infos[i].name for i in ch]
        feats = {"buckets": buckets, "categories": [], **({"shapes": True} if shapes else {})}
        X = QueryFeaturizer.shared(buckets, (), shapes).matrix([(r.prompt, None) for r in table.records])

        k = max(2, min(int(inner_folds), n // 10))
        perm = np.random.default_rng(seed).permutation(n)
        fold = np.empty(n, dtype=int)
        fold[perm] = np.arange(n) % k
        oof = np.empty((len(ch), n))
        for f in range(k):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            W, b = fit_logistic(X[tr], correct[:, tr], l2)
            oof[:, te] = sigmoid((X[te] @ W.T).T + b[:, None])
        W, b = fit_logistic(X, correct, l2)
        models = {}
        for j, name in enumerate(names):
            w = np.round(W[j], WEIGHT_DECIMALS)
            models[name] = {"bias": round(float(b[j]), WEIGHT_DECIMALS),
                            "w": weights_text((c, w[c]) for c in np.flatnonzero(w))}
        self.names, self.signal = names, signal
        self.router = {"order": names, "features": feats, "models": models}
        base = {"signal": signal, "chain": names, "thresholds": {t: 0.0 for t in names[:-1]}}
        pol = make_policy(self.policy, infos, {**base, "router": {"alpha": 0.5, **self.router}})
        p_in = np.array([pol.router.probs(r.query()) for r in table.records]).T

        qs = np.quantile(oof, np.linspace(0, 1, ALPHAS), method="lower").ravel()
        self.alphas = np.unique(np.concatenate([np.linspace(0.0, 1.0, ALPHAS), [1.0 + 1e-6], qs]))
        self.cands = [_candidates(conf[i], THRESHOLDS) for i in range(len(ch) - 1)]
        acc_sel, cost_sel, acc_in, cost_in = [], [], [], []
        for start_in, start_oof in zip(routes(p_in, self.alphas), routes(oof, self.alphas)):
            a, c = grid(conf, correct, cost, start_oof, self.cands)
            acc_sel.append(a)
            cost_sel.append(c)
            a, c = grid(conf, correct, cost, start_in, self.cands)
            acc_in.append(a)
            cost_in.append(c)
        self._acc_sel, self._cost_sel = np.concatenate(acc_sel), np.concatenate(cost_sel)
        self._acc_in, self._cost_in = np.concatenate(acc_in), np.concatenate(cost_in)
        self._per_alpha = acc_sel[0].size
        self.search = {"signal": signal, "chain": names, "alphas": int(self.alphas.size), "l2": l2,
                       "features": feats, "configurations": int(self._acc_sel.size),
                       "chosen_on": f"out-of-fold router predictions ({k} folds of {n} train rows)"}

    def params_of(self, flat: int) -> dict[str, Any]:
        ai, local = divmod(int(flat), self._per_alpha)
        idx = np.unravel_index(local, tuple(len(c) for c in self.cands))
        return {"signal": self.signal, "chain": list(self.names),
                "thresholds": {self.names[j]: float(self.cands[j][idx[j]]) for j in range(len(self.cands))},
                "router": {"alpha": float(self.alphas[ai]), **self.router}}

    def _widest_margin(self, i: int) -> int:
        """Of the run of neighbouring alphas that give the same thresholds the same
        figures as configuration i, the middle one: the router's cut then sits as far
        from the train predictions either side of it as the search allows."""
        ai, local = divmod(i, self._per_alpha)
        same = lambda a: (self._acc_sel[a * self._per_alpha + local] == self._acc_sel[i]  # noqa: E731
                          and self._cost_sel[a * self._per_alpha + local] == self._cost_sel[i])
        lo, hi = ai, ai
        while lo > 0 and same(lo - 1):
            lo -= 1
        while hi < len(self.alphas) - 1 and same(hi + 1):
            hi += 1
        return ((lo + hi) // 2) * self._per_alpha + local

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc_sel, self._cost_sel, self.resolve(target), "routed cascade (out-of-fold on train)")
        i = self._widest_margin(i)
        search = {**self.search, "out_of_fold": {"accuracy": float(self._acc_sel[i]), "cost": float(self._cost_sel[i])}}
        return self._fitted(target, self.params_of(i), self._acc_in[i], self._cost_in[i], search=search,
                            note="alpha and thresholds chosen on out-of-fold router predictions; "
                                 "train figures: final router in-sample")
