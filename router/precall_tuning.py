"""Tuners of the pre-call policies (`router`, `select-then-route`), registered in
`router.tuning.TUNERS`. Like every tuner they read only the table they are given
(the train rows); their search figures only choose knobs, and `confirm` replays
the chosen policy with `router.simulate` for the reported train figures.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .features import DEFAULT_BUCKETS, QueryFeaturizer, fit_logistic, sigmoid
from .labelled import CONFIDENCE_SIGNALS, Table
from .policies.precall_router import weights_text
from .policy import TierInfo
from .tuning import NotApplicable, Tuner, TuningError, _select

WEIGHT_DECIMALS = 4


def cost_order(table: Table) -> list[int]:
    """Tiers cheapest first on train (ties: the less accurate, then file order)."""
    acc, cost = table.accuracy(), table.mean_cost()
    return sorted(range(len(table.tiers)), key=lambda i: (cost[i], acc[i], i))


# -- router -----------------------------------------------------------------------
def routes(P: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """P (k, n): predicted success per order position -> (A, n) chosen positions:
    the first position with P >= alpha, else the argmax (first on ties)."""
    ok = P[None, :, :] >= alphas[:, None, None]
    return np.where(ok.any(axis=1), ok.argmax(axis=1), np.argmax(P, axis=0)[None, :])


class RouterTuner(Tuner):
    """Fit the per-model regressions on the train rows only, then sweep alpha.

    In-sample predictions of a learned router are optimistic, so alpha is chosen
    on out-of-fold predictions within the train rows (`inner_folds` folds; above
    `holdout_above` rows one fold only, as a hold-out, to stay fast); the reported
    train accuracy and cost are those of the final model (fitted on every train
    row) on the train rows, i.e. what `router.simulate` replays."""

    policy = "router"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, l2: float = 1e-3, buckets: int = DEFAULT_BUCKETS,
                 inner_folds: int = 5, holdout_above: int = 4000, seed: int = 0, **options: Any):
        super().__init__(table, infos)
        from .policies import make_policy

        if options:
            raise TuningError(f"policy 'router': unknown tuning option(s) {sorted(options)}")
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
            W, b = fit_logistic(X.take(tr), correct[:, tr], l2)
            oof[:, te] = sigmoid(X.take(te).dot(W) + b[:, None])
        sel = np.flatnonzero(np.isfinite(oof[0]))

        W, b = fit_logistic(X, correct, l2)
        models = {}
        for j, name in enumerate(names):
            w = np.round(W[j], WEIGHT_DECIMALS)
            models[name] = {"bias": round(float(b[j]), WEIGHT_DECIMALS),
                            "w": weights_text((c, w[c]) for c in np.flatnonzero(w))}
        self.base = {"order": names, "features": {"buckets": buckets, "categories": cats}, "models": models}
        # in-sample predictions with the policy's own arithmetic on the rounded weights
        pol = make_policy("router", infos, {"alpha": 0.5, **self.base})
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
        i = _select(self._acc_sel, self._cost_sel, self.resolve(target), "router (out-of-fold on train)")
        sub, alpha = self.configs[i]
        names = [self.infos[t].name for t in sub]
        params = {"alpha": alpha, "order": names, "features": self.base["features"],
                  "models": {m: self.base["models"][m] for m in names}}
        return self._fitted(target, params, self._acc_in[i], self._cost_in[i],
                            search=dict(self.search),
                            note="alpha chosen on out-of-fold train predictions; train figures: final model in-sample")


# -- select-then-route ------------------------------------------------------------
DELTAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def shortlist(correct: np.ndarray, order: Sequence[int], delta: float) -> tuple[int, ...]:
    """Tiers (in `order`) whose mean of `correct` (k, rows) is within delta of the best."""
    a = correct.mean(axis=1)
    return tuple(i for i in order if a[i] >= a.max() - delta - 1e-12)


def shortlist_grid(chain: Sequence[int], rows: np.ndarray, correct: np.ndarray, cost: np.ndarray,
                   conf: np.ndarray | None, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed correct and cost over `rows` for each threshold in T (cascade in `chain`,
    NaN confidence escalates, the last tier accepts; conf None: first tier only)."""
    if conf is None:
        return np.full(T.size, correct[chain[0], rows].sum()), np.full(T.size, cost[chain[0], rows].sum())
    alive = np.ones((T.size, rows.size))
    acc = np.zeros(T.size)
    tot = np.zeros(T.size)
    with np.errstate(invalid="ignore"):
        for pos, t in enumerate(chain):
            tot += alive @ cost[t, rows]
            if pos == len(chain) - 1:
                acc += alive @ correct[t, rows]
                break
            accept = conf[t, rows][None, :] >= T[:, None]
            acc += (alive * accept) @ correct[t, rows]
            alive = alive * ~accept
    return acc, tot


class SelectThenRouteTuner(Tuner):
    policy = "select-then-route"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 deltas: Sequence[float] = DELTAS, quantiles: int = 60, **options: Any):
        super().__init__(table, infos)
        if options:
            raise TuningError(f"policy 'select-then-route': unknown tuning option(s) {sorted(options)}")
        if signal is None:
            counts = {s: int(np.isfinite(table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
            best = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
            signal = best if counts[best] else None
        elif signal not in table.conf:
            raise TuningError(f"signal {signal!r}: recorded data carry {' or '.join(CONFIDENCE_SIGNALS)}")
        self.signal = signal
        conf = table.conf[signal] if signal else None
        order = cost_order(table)
        cats = [r.category for r in table.records]
        keys = sorted({c for c in cats if c is not None})
        groups = {c: np.flatnonzero(np.array([x == c for x in cats])) for c in keys}
        loose = np.flatnonzero(np.array([c is None for c in cats]))
        if conf is not None:
            v = conf[np.isfinite(conf)]
            T = np.unique(np.quantile(v, np.linspace(0, 1, quantiles), method="lower")) if v.size else np.zeros(1)
        else:
            T = np.zeros(1)
        self.T = T
        self.configs: list[tuple[float, tuple[int, ...], dict[str, tuple[int, ...]]]] = []
        accs, costs = [], []
        seen = set()
        for d in sorted(float(x) for x in deltas):
            default = shortlist(table.correct, order, d)
            lists = {c: shortlist(table.correct[:, g], order, d) for c, g in groups.items()}
            key = (default, tuple(sorted(lists.items())))
            if key in seen:
                continue
            seen.add(key)
            a = np.zeros(T.size)
            t = np.zeros(T.size)
            for c, g in list(groups.items()) + [(None, loose)]:
                if g.size:
                    ga, gt = shortlist_grid(lists.get(c, default) if c is not None else default, g,
                                            table.correct, table.cost, conf, T)
                    a += ga
                    t += gt
            self.configs.append((d, default, lists))
            accs.append(a / table.n)
            costs.append(t / table.n)
        self._acc = np.concatenate(accs)
        self._cost = np.concatenate(costs)
        self.search = {"signal": signal, "deltas": [c[0] for c in self.configs], "thresholds": int(T.size),
                       "categories": len(keys),
                       **({} if keys else {"note": "no category in the data: one class for every query"})}

    def select(self, target):
        i = _select(self._acc, self._cost, self.resolve(target), "select-then-route")
        ci, ti = divmod(i, self.T.size)
        d, default, lists = self.configs[ci]
        name = lambda chain: [self.infos[j].name for j in chain]  # noqa: E731
        params = {"delta": d, "signal": self.signal,
                  "threshold": float(self.T[ti]) if self.signal else None,
                  "default": name(default), "shortlists": {c: name(v) for c, v in sorted(lists.items())}}
        return self._fitted(target, params, self._acc[i], self._cost[i], search=dict(self.search))
