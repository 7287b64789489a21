"""Tuner of the LM Cascades policy: every applicable rule, chain and threshold.

Per rule: Chow-Sum, Chow-Average, Chow-Quantile at 0/0.1/0.25/0.5 compare one
token-level signal with per-tier thresholds (searched like the threshold
cascade: quantiles of the train values, `chain_grid`); the learned rule fits a
logistic regression per tier on the quantile vector and chooses thresholds on
its out-of-fold scores (`router.lab.scoring`), the final models fitted on every
train row. Chains: 2..`max_tiers` undominated tiers in cost order.

Token-level signals come from the rows' replayed attempts. The benchmarks
format records at most a completion's mean log-prob (`logprob`), never the
token log-probs, so on recorded files this tuner says it is not applicable;
traffic logged by the workers (whose backends return token log-probs) carries
them.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core.policies.lm_cascade import DEFERRAL_FEATURES, QUANTILE_SIGNALS, deferral_score
from router.core.policy import TierInfo
from router.core.records import attempt_from_response
from router.lab.labelled import Table
from router.lab.scoring import MIN_ROWS, ScorerError, fit_logistic_scorer, fold_ids, oof_scores
from router.lab.tuning import (
    Fitted,
    NotApplicable,
    Target,
    Tuner,
    given_chain,
    select_index,
    undominated_pool,
)

from .threshold import GRID, _candidates, chain_grid

CHOW = [("chow-sum", None, "sum_logprob"), ("chow-average", None, "mean_logprob")] + [
    ("chow-quantile", q, s) for q, s in QUANTILE_SIGNALS.items()]


def token_signals(table: Table) -> dict[str, np.ndarray]:
    """(k, n) arrays of each deferral feature, NaN where absent: from `table.conf`
    when it holds them, else from the replayed attempts of the rows."""
    k, n = table.correct.shape
    out = {s: table.conf[s] for s in DEFERRAL_FEATURES if s in table.conf}
    todo = [s for s in DEFERRAL_FEATURES if s not in out]
    if todo:
        for s in todo:
            out[s] = np.full((k, n), np.nan)
        for i, t in enumerate(table.tiers):
            for j, r in enumerate(table.records):
                sig = attempt_from_response(t.name, i, t.model, r.responses.get(t.model), price=t.price).signals
                for s in todo:
                    v = sig.get(s)
                    if v is not None and np.isfinite(v):
                        out[s][i, j] = v
    return out


class LMCascadeTuner(Tuner):
    policy = "lm-cascade"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, rules: Sequence[str] | None = None,
                 chain: Sequence[str] | None = None, max_tiers: int = 3, prune: bool = True, folds: int = 5,
                 C: float = 1.0, seed: int = 0, **options: Any):
        super().__init__(table, infos, **options)
        sig = token_signals(table)
        has = {s: np.isfinite(v).any(axis=1) for s, v in sig.items()}
        if not any(h.any() for h in has.values()):
            raise NotApplicable("no token log-probs are recorded (the benchmarks format holds at most a completion's "
                                "mean log-prob, `logprob`: over a whole completion that is Chow-Average, which the "
                                "threshold policy runs with --signal logprob)")
        if chain is not None:
            chains = [given_chain(chain, {t.name: t.index for t in infos})]
        else:
            pool, _ = undominated_pool(table, infos, prune)
            chains = [c for size in range(2, max_tiers + 1) for c in itertools.combinations(pool, size)]
        wanted = set(rules) if rules is not None else {"chow-sum", "chow-average", "chow-quantile", "learned"}
        n = table.n
        self.fold = fold_ids(n, max(2, min(int(folds), n // 10)), seed)
        self.sig, self.C = sig, float(C)
        self.configs: list[tuple[str, float | None, tuple[int, ...], list[np.ndarray]]] = []
        accs, costs, insample = [], [], []
        self._models: dict[int, dict[str, Any]] = {}
        for rule, q, s in [c for c in CHOW if c[0] in wanted] + ([("learned", None, None)] if "learned" in wanted else []):
            if rule == "learned" and n < MIN_ROWS:
                continue
            for c in chains:
                if s is not None:
                    if not all(has[s][i] for i in c[:-1]):
                        continue
                    conf = [sig[s][i] for i in c[:-1]]
                    fit_conf = conf
                else:
                    if not all(i in self._learned() for i in c[:-1]):
                        continue
                    conf = [self._insample[i] for i in c[:-1]]
                    fit_conf = [self._oof[i] for i in c[:-1]]
                cands = [_candidates(x, GRID.get(len(c), 16)) for x in fit_conf]
                if any(x.size == 0 for x in cands):
                    continue
                a, t = chain_grid(fit_conf + [np.zeros(n)], [table.correct[i] for i in c],
                                  [table.cost[i] for i in c], cands)
                self.configs.append((rule, q, c, cands))
                accs.append(a)
                costs.append(t)
                insample.append(conf)
        if not self.configs:
            raise NotApplicable("no chain has token log-probs on every non-last tier")
        self._acc, self._cost = np.concatenate(accs), np.concatenate(costs)
        self._offsets = np.cumsum([0] + [a.size for a in accs])
        self._conf_in = insample
        self.search = {"rules": sorted({r for r, *_ in self.configs}), "chains": len(chains),
                       "configurations": int(self._acc.size),
                       "learned": "thresholds chosen on out-of-fold scores" if self._models else "not fitted"}

    def _learned(self) -> dict[int, dict[str, Any]]:
        """Per tier with every feature on some rows: the deferral model (rows with a
        missing feature are left out of the fit and score None, i.e. escalate)."""
        if not hasattr(self, "_oof"):
            self._oof, self._insample = {}, {}
            X_all = np.stack([self.sig[f] for f in DEFERRAL_FEATURES], axis=-1)  # (k, n, d)
            for i in range(len(self.infos)):
                ok = np.isfinite(X_all[i]).all(axis=1)
                if ok.sum() < MIN_ROWS:
                    continue
                X, y = X_all[i][ok], self.table.correct[i][ok]
                what = f"deferral model of tier {self.infos[i].name!r}"
                try:
                    b, w = fit_logistic_scorer(X, y, self.C, what)
                except ScorerError:
                    continue
                model = {"bias": float(b), "w": [float(x) for x in w]}
                self._models[i] = model
                oof = np.full(self.table.n, np.nan)
                oof[ok] = oof_scores(X, y, self.fold[ok], self.C, what)
                self._oof[i] = oof
                self._insample[i] = np.array([
                    np.nan if not ok[j] else deferral_score(model, dict(zip(DEFERRAL_FEATURES, X_all[i, j])))
                    for j in range(self.table.n)])
        return self._models

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc, self._cost, self.resolve(target), "lm-cascade")
        ci = int(np.searchsorted(self._offsets, i, side="right") - 1)
        rule, q, c, cands = self.configs[ci]
        idx = np.unravel_index(i - self._offsets[ci], tuple(len(x) for x in cands))
        th = [float(cands[p][idx[p]]) for p in range(len(c) - 1)]
        names = [self.infos[t].name for t in c]
        params: dict[str, Any] = {"rule": rule, "chain": names, "thresholds": dict(zip(names, th))}
        if q is not None:
            params["quantile"] = q
        if rule == "learned":
            params["models"] = {self.infos[t].name: self._models[t] for t in c[:-1]}
        a, t = chain_grid(self._conf_in[ci] + [np.zeros(self.table.n)], [self.table.correct[x] for x in c],
                          [self.table.cost[x] for x in c], [np.array([v]) for v in th])
        return self._fitted(target, params, a[0], t[0], search=dict(self.search))
