"""Tuner of the cascade-routing policy (router.core.policies.cascade_routing).

Everything is fitted on the rows it is given (the train split, or the k-1 tuning
folds), never on evaluation rows:
- the ex-ante predictor: one logistic regression per model on the query vector
  (hashed words by default, `text="embed"` for sentence embeddings); its
  predictions on the train rows are taken out of fold (`inner_folds`), so the
  estimators fitted on them see predictions as good as those on new traffic;
- per pool model, on those out-of-fold predictions: the ex-ante calibration
  (`pre`), the ex-post logistic regression (`post`) on rows augmented with random
  sets of other pool models having answered (agreement counts), and the spread of
  logit q_post - logit q_pre per number of other models run;
- pools: the models not dominated on train (cost, accuracy) (at most `max_pool`),
  the most accurate model with the `max_pool` - 1 most accurate of those costing at
  most a fifth of it (cheap second opinions), and every pair of the first pool;
  `chain=` names one pool instead;
- lam: 0 and `lambdas` - 1 values from 1e-3 to 10 (geometric; costs are relative to
  the dearest pool model).
Each (pool, lam) is replayed on the train rows with the out-of-fold ex-ante
predictions to choose (so lam is not chosen on in-sample predictions); the chosen
configuration's reported train figures are its replay with the final predictor, the
policy's own arithmetic (`confirm` re-checks them with router.simulate).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

from router.core.answers import infer_kind, normalize_answer
from router.core.policies import make_policy
from router.core.policies.cascade_routing import SPREAD_KEYS, Model, SetValues, logit, post_estimates
from router.core.policy import TierInfo
from router.core.quality import QueryEncoder, pack, predictor_from_params, unpack
from router.lab.labelled import CONFIDENCE_SIGNALS, Table
from router.lab.quality_fit import check_trainable, fit_linear
from router.lab.tuning import (
    Fitted,
    Target,
    Tuner,
    TuningError,
    bin_index,
    given_chain,
    pav,
    quantile_edges,
    round6,
    select_index,
    undominated_pool,
)

from .quality_routing import default_text, folds_of

QUANTILES = 16


def _logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def calibration(x: np.ndarray, y: np.ndarray, bins: int) -> dict[str, Any]:
    """P(correct | signal) on train: `bins` quantile bins, one pseudo-count towards the
    mean, pooled-adjacent-violators for monotonicity; `missing` where x is absent."""
    m = float(y.mean())
    edges = quantile_edges(x, bins)
    b = bin_index(x, edges)
    fin = b >= 0
    k = len(edges) + 1
    n_b = np.bincount(b[fin], minlength=k).astype(float)
    s_b = np.bincount(b[fin], weights=y[fin], minlength=k)
    levels = [round6(v) for v in pav(list((s_b + m) / (n_b + 1)), list(n_b + 1))]
    missing = round6((y[~fin].sum() + m) / (float((~fin).sum()) + 1))
    return {"edges": edges, "levels": levels, "missing": missing}


def _fit_logistic(F: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    if y.min() == y.max():
        p = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
        return np.zeros(F.shape[1]), float(np.log(p / (1 - p)))
    lr = LogisticRegression(C=1.0, max_iter=300, tol=1e-6).fit(F, y)
    return lr.coef_[0], float(lr.intercept_[0])


class CascadeRoutingTuner(Tuner):
    policy = "cascade-routing"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 chain: Sequence[str] | None = None, prune: bool = True, text: str | None = None,
                 buckets: int = 512, inner_folds: int = 3, holdout_above: int = 1500, lambdas: int = 24,
                 max_pool: int = 6, bins: int = 10, seed: int = 0, **options: Any):
        super().__init__(table, infos, **options)
        k, n = len(infos), table.n
        names = [t.name for t in infos]
        check_trainable(table.correct, names, "policy 'cascade-routing'")
        self.signal = self._signal(table, signal)
        self.rng = np.random.default_rng(seed)
        self.bins = bins
        self._pre_cache: dict[int, np.ndarray] = {}
        self._in_sample: dict[int, tuple[float, float]] = {}
        self._a_in: dict[tuple[int, ...], np.ndarray] = {}
        # -- ex ante: out-of-fold on train (to fit on), and the final predictor --------
        text = text or default_text()
        if text == "none":  # no ex-ante predictor: each model's estimate before a call is its train accuracy
            sel, enc, final = np.arange(n), None, None
            self.a_oof = np.zeros((n, k))
        else:
            cats = sorted({r.category for r in table.records if r.category is not None})
            enc = QueryEncoder(text, buckets, cats)
            X = enc.matrix([r.prompt for r in table.records], [r.category for r in table.records])
            Y = table.correct
            oof = np.full((n, k), np.nan)
            for tr, te in folds_of(n, inner_folds, holdout_above, seed):
                oof[te] = predictor_from_params(fit_linear(X[tr], Y[:, tr]), k, enc.dim).predict(X[te])
            sel = np.flatnonzero(np.isfinite(oof[:, 0]))
            self.a_oof = _logits(oof[sel])  # (m, k)
            final = fit_linear(X, Y)
        self.sel = sel
        # -- what each call returns on each row -----------------------------------------
        texts = [[r.responses[t.model].text for r in table.records] for t in table.tiers]
        self.kind = infer_kind([x for row in texts for x in row]) if any(x for row in texts for x in row) else "auto"
        self.answers = [[normalize_answer(x, self.kind) for x in row] for row in texts]
        conf = table.conf[self.signal] if self.signal is not None else np.full((k, n), np.nan)
        self.sig = [[float(v) if np.isfinite(v) else None for v in row] for row in conf]
        by_name = {t.name: t.index for t in infos}
        if chain is not None:
            pools = [given_chain(chain, by_name)]
            pruned: list[str] = []
        else:
            pools, pruned = self._pools(table, infos, prune, max_pool)
        self.search: dict[str, Any] = {"signal": self.signal, "text": text, "answer_kind": self.kind,
                                       "pools": [[names[i] for i in p] for p in pools], "pruned": pruned,
                                       "lam_chosen_on": f"out-of-fold ex-ante predictions on {sel.size} of {n} "
                                                        f"train rows"}
        lams = [0.0] + [float(x) for x in np.geomspace(1e-3, 10.0, max(lambdas, 2) - 1)]
        self.configs: list[dict[str, Any]] = []
        acc, cost = [], []
        self._runs: list[tuple[list[Model], list[float], tuple[int, ...], float]] = []
        mean_cost = table.mean_cost()
        for pool in pools:
            est = {names[i]: self._estimates(i, [j for j in pool if j != i], conf[i], mean_cost[i]) for i in pool}
            base = {"signal": self.signal, "chain": [names[i] for i in pool], "answer_kind": self.kind,
                    "estimates": est}
            if final is not None:
                base["features"] = enc.params()
                base["ante"] = {**final, "W": _rows(final["W"], pool), "b": _rows(final["b"], pool)}
            pol = make_policy(self.policy, list(infos), {**base, "lam": 0.0})
            a, c = self._replay(pol.models, pol.costs, pool, lams, self.a_oof[:, pool], sel)
            acc += list(a)
            cost += list(c)
            for lam in lams:
                self.configs.append({**base, "lam": lam})
                self._runs.append((pol.models, pol.costs, tuple(pool), lam))
        self._acc_sel, self._cost_sel = np.array(acc), np.array(cost)
        self.search["configurations"] = len(self.configs)

    # -- pieces -------------------------------------------------------------------------
    @staticmethod
    def _signal(table: Table, signal: str | None) -> str | None:
        if signal is not None:
            if signal not in table.conf:
                raise TuningError(f"signal {signal!r}: recorded data carry {' or '.join(CONFIDENCE_SIGNALS)}")
            return signal
        counts = {s: int(np.isfinite(table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
        best = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
        return best if counts[best] else None

    @staticmethod
    def _pools(table: Table, infos: Sequence[TierInfo], prune: bool, max_pool: int) -> tuple[list[tuple[int, ...]], list[str]]:
        acc, cost = table.accuracy(), table.mean_cost()
        und, pruned = undominated_pool(table, infos, prune)
        if len(und) > max_pool:  # keep the cheapest and the most accurate, spread between
            pos = np.unique(np.round(np.linspace(0, len(und) - 1, max_pool)).astype(int))
            und = [und[p] for p in pos]
        best = min(range(len(infos)), key=lambda i: (-acc[i], cost[i], i))
        cheap = sorted((i for i in range(len(infos)) if i != best and cost[i] <= cost[best] / 5),
                       key=lambda i: (-acc[i], cost[i], i))[: max_pool - 1]
        pools = [tuple(sorted(und, key=lambda i: (cost[i], i)))]
        second = tuple(sorted(cheap + [best], key=lambda i: (cost[i], i)))
        pools += [p for p in [second] + list(itertools.combinations(pools[0], 2)) if len(p) > 1 and p not in pools]
        return list(dict.fromkeys(pools)), pruned

    def _estimates(self, i: int, others: list[int], sig_row: np.ndarray, cost: float) -> dict[str, Any]:
        """Model i's calibration, ex-post weights and spread, from the out-of-fold rows."""
        sel = self.sel
        y = self.table.correct[i, sel]
        a = self.a_oof[:, i]
        w_pre, b_pre = _fit_logistic(a[:, None], y)
        pre = [round6(b_pre), round6(w_pre[0])]
        cal = calibration(sig_row[sel], y, self.bins)
        lv = np.array([logit(v) for v in cal["levels"]])
        b_idx = bin_index(sig_row[sel], cal["edges"])
        s_feat = np.where(b_idx >= 0, lv[np.maximum(b_idx, 0)], logit(cal["missing"]))
        # augmented rows: i alone, with one other pool model, with two
        q_pre_all = {j: 1 / (1 + np.exp(-(self._pre_of(j) @ np.stack([np.ones(sel.size), self.a_oof[:, j]]))))
                     for j in others}
        feats, labels, group = [], [], []
        for r in range(sel.size):
            row = sel[r]
            base = [a[r], s_feat[r], 1.0 if b_idx[r] < 0 else 0.0]
            for g in range(min(3, len(others) + 1)):
                sub = list(self.rng.choice(others, g, replace=False)) if g else []
                ans = self.answers[i][row]
                agree = [q_pre_all[j][r] for j in sub if ans is not None and self.answers[j][row] == ans]
                dis = sum(1 for j in sub if self.answers[j][row] is not None and (ans is None or self.answers[j][row] != ans))
                feats.append(base + [float(len(agree)), float(dis), max(agree, default=0.0)])
                labels.append(y[r])
                group.append(g)
        F, L, G = np.array(feats), np.array(labels), np.array(group)
        w, b = _fit_logistic(F, L)
        post = [round6(v) for v in w] + [round6(b)]
        zpost = F @ np.array(post[:-1]) + post[-1]
        zpre = pre[0] + pre[1] * F[:, 0]
        res = zpost - zpre
        qs = (np.arange(QUANTILES) + 0.5) / QUANTILES
        spread = {}
        for key in SPREAD_KEYS:
            g = res[G == int(key)] if (G == int(key)).any() else res[G == G.max()]
            spread[key] = [round6(v) for v in np.quantile(g, qs)]
        return {"cost": float(cost), "accuracy": round6(float(y.mean())), "pre": pre, "post": post,
                "spread": spread, **cal}

    def _pre_of(self, j: int) -> np.ndarray:
        if j not in self._pre_cache:
            w, b = _fit_logistic(self.a_oof[:, j][:, None], self.table.correct[j, self.sel])
            self._pre_cache[j] = np.array([b, w[0]])
        return self._pre_cache[j]

    def _replay(self, models: list[Model], costs: list[float], pool: Sequence[int], lams: Sequence[float],
                a_logits: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean correct and cost per lam of the policy's decisions on `rows` given ex-ante
        logits (one row of a_logits per row): the arithmetic of CascadeRouting.plan and
        decide, each state's set values computed once for every lam that reaches it."""
        C, Yc = self.table.cost, self.table.correct
        L = len(lams)
        lam_arr = np.asarray(lams, dtype=float)
        tot_c, tot_a = np.zeros(L), np.zeros(L)
        for r, row in enumerate(rows):
            a = [float(x) for x in a_logits[r]]
            q_pres = [m.q_pre(x) for m, x in zip(models, a)]

            def walk(run: list[tuple[int, Any, Any]], q_run: list[float], spent: float, which: list[int]) -> None:
                vals = SetValues(models, costs, q_pres, [p for p, _, _ in run], q_run)
                groups: dict[int | None, list[int]] = {}
                for li, nxt in zip(which, vals.pick_many(lam_arr[which])[0]):
                    groups.setdefault(nxt, []).append(li)
                for nxt, lis in groups.items():
                    if nxt is None:
                        b = max(range(len(q_run)), key=lambda i: (q_run[i], i))
                        tot_a[lis] += Yc[pool[run[b][0]], row]
                        tot_c[lis] += spent
                        continue
                    t = pool[nxt]
                    run2 = run + [(nxt, self.sig[t][row], self.answers[t][row])]
                    walk(run2, post_estimates(models, a, run2, q_pres), spent + C[t, row], lis)

            walk([], [], 0.0, list(range(L)))
        return tot_a / len(rows), tot_c / len(rows)

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc_sel, self._cost_sel, self.resolve(target), "cascade-routing (out-of-fold on train)")
        models, costs, pool, lam = self._runs[i]
        params = self.configs[i]
        if pool not in self._a_in:
            pol = make_policy(self.policy, list(self.infos), params)
            self._a_in[pool] = np.array([pol.ante_logits(r.query()) for r in self.table.records])
        if i not in self._in_sample:
            a, c = self._replay(models, costs, pool, [lam], self._a_in[pool], np.arange(self.table.n))
            self._in_sample[i] = (float(a[0]), float(c[0]))
        acc, cost = self._in_sample[i]
        return self._fitted(target, params, acc, cost, search=dict(self.search),
                            note="lam chosen on out-of-fold ex-ante predictions; train figures: final model in-sample")


def _rows(packed: dict[str, Any], pool: Sequence[int]) -> dict[str, Any]:
    """A packed (k, ...) array restricted to the pool's rows, packed again."""
    arr = unpack(packed, "ante")
    return pack(arr[list(pool)])
