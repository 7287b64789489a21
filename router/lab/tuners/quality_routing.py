"""Tuning shared by the routers of `router.core.policies.quality_router` (routellm,
optllm, cargo): fit the predictor on the train rows only, then calibrate lam.

In-sample predictions of a learned router are optimistic, so lam is chosen on
out-of-fold predictions within the train rows (`inner_folds` folds; above
`holdout_above` rows one fold only, as a hold-out); the reported train accuracy
and cost are those of the final predictor (fitted on every train row) on the
train rows, replayed with the policy's own arithmetic, i.e. what
`router.lab.simulate` gives. On a file without prices the cost is the share of
calls to the strong model, so a budget target is RouteLLM's calibration "a share
p of calls go strong".
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.policies import make_policy
from router.core.policies.optllm import breakpoints, route_all
from router.core.policy import TierInfo
from router.core.quality import QueryEncoder, predictor_from_params
from router.lab.labelled import Table
from router.lab.quality_fit import check_trainable
from router.lab.tuning import Fitted, Target, Tuner, TuningError, cost_order, select_index

MAX_LAMS = 400


def default_text() -> str:
    """Hashed words by default: embedding a benchmark's queries the first time takes
    minutes on a small CPU (about 3 queries/s here); `text="embed"` opts in."""
    return "hashed"


def folds_of(n: int, inner_folds: int, holdout_above: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    k = max(2, min(int(inner_folds), n // 5))
    perm = np.random.default_rng(seed).permutation(n)
    fold = np.empty(n, dtype=int)
    fold[perm] = np.arange(n) % k
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in ([0] if n > holdout_above else range(k))]


class Encoded:
    """The train rows as the routers see them: X (n, dim), outcomes Y (k, n) and costs
    C (k, n) of the tiers in cost order, and the encoder."""

    def __init__(self, table: Table, infos: Sequence[TierInfo], what: str, text: str | None, buckets: int):
        self.order = cost_order(table)
        self.names = [infos[i].name for i in self.order]
        self.Y, self.C = table.correct[self.order], table.cost[self.order]
        check_trainable(self.Y, self.names, what)
        cats = sorted({r.category for r in table.records if r.category is not None})
        self.encoder = QueryEncoder(text or default_text(), buckets, cats)
        self.X = self.encoder.matrix([r.prompt for r in table.records], [r.category for r in table.records])
        mean = table.mean_cost()[self.order]
        self.rel_cost = mean / mean.max() if mean.max() > 0 else np.zeros_like(mean)


class QualityRoutingTuner(Tuner):
    """Subclasses set `policy` and implement `fit_predictor(X, Y) -> params`."""

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, text: str | None = None, buckets: int = 512,
                 inner_folds: int = 3, holdout_above: int = 1500, seed: int = 0, **options: Any):
        super().__init__(table, infos)
        self.seed = seed
        self.configure(**options)
        e = self.enc = Encoded(table, infos, f"policy {self.policy!r}", text, buckets)
        n, k = table.n, len(e.order)
        folds = folds_of(n, inner_folds, holdout_above, seed)
        tried: dict[Any, tuple[float, np.ndarray, list[tuple[dict[str, Any], np.ndarray]]]] = {}
        for cand in self.candidates():  # e.g. the l2 penalty, chosen on the inner folds' log-loss
            self.use(cand)
            oof = np.full((n, k), np.nan)
            fits: list[tuple[dict[str, Any], np.ndarray]] = []
            for tr, te in folds:
                fits.append((self.fit_predictor(e.X[tr], e.Y[:, tr]), te))
                oof[te] = predictor_from_params(fits[-1][0], k, e.encoder.dim).predict(e.X[te])
            ok = np.isfinite(oof[:, 0])
            p = np.clip(oof[ok], 1e-6, 1 - 1e-6)
            y = e.Y[:, ok].T
            tried[cand] = (float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()), oof, fits)
        best = min(tried, key=lambda c: (tried[c][0], str(c)))
        self.use(best)
        _, oof, self.fold_fits = tried[best]
        sel = np.flatnonzero(np.isfinite(oof[:, 0]))
        self.base = {"order": e.names, "costs": {m: float(c) for m, c in zip(e.names, e.rel_cost)},
                     "features": e.encoder.params(), "predictor": self.fit_predictor(e.X, e.Y)}
        pol = make_policy(self.policy, infos, {**self.base, "lam": 0.0, **self.extra_params()})
        q_in = np.stack([pol.qualities(r.query()) for r in table.records])
        lams = breakpoints(oof[sel], e.rel_cost)
        if lams.size > MAX_LAMS:
            lams = np.unique(np.quantile(lams, np.linspace(0, 1, MAX_LAMS), method="lower"))
        self.configs, acc_in, cost_in, acc_sel, cost_sel = [], [], [], [], []
        for extra, route_in, route_sel in self.decision_rules(pol, q_in, oof[sel], sel):
            for lam in lams:
                ci, cs = route_in(lam), route_sel(lam)
                acc_in.append(e.Y[ci, np.arange(n)].mean())
                cost_in.append(e.C[ci, np.arange(n)].mean())
                acc_sel.append(e.Y[cs, sel].mean())
                cost_sel.append(e.C[cs, sel].mean())
                self.configs.append({"lam": float(lam), **extra})
        self._acc_in, self._cost_in = np.array(acc_in), np.array(cost_in)
        self._acc_sel, self._cost_sel = np.array(acc_sel), np.array(cost_sel)
        self.search = {"predictor": self.base["predictor"]["kind"], "text": e.encoder.text, "order": e.names,
                       **({"chosen_on_inner_folds": {"value": best, "log_loss": {str(c): round(v[0], 5)
                                                                                  for c, v in tried.items()}}}
                          if len(tried) > 1 else {}),
                       "lams": int(lams.size), "configurations": len(self.configs),
                       "lam_chosen_on": f"out-of-fold predictions on {sel.size} of {n} train rows"}

    # -- hooks ------------------------------------------------------------------------
    def configure(self, **options: Any) -> None:
        if options:
            raise TuningError(f"policy {self.policy!r}: unknown tuning option(s) {sorted(options)}")

    def candidates(self) -> list[Any]:
        """Values of one fitting option to choose between on the inner folds (log-loss of
        the out-of-fold predictions); `use(c)` sets one. Default: nothing to choose."""
        return [None]

    def use(self, candidate: Any) -> None:
        pass

    def fit_predictor(self, X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def extra_params(self) -> dict[str, Any]:
        return {}

    def decision_rules(self, pol: Any, q_in: np.ndarray, q_sel: np.ndarray, sel: np.ndarray):
        """(extra params, lam -> in-sample choices, lam -> out-of-fold choices) per rule searched."""
        c = self.enc.rel_cost
        yield {}, (lambda lam: route_all(q_in, c, lam)), (lambda lam: route_all(q_sel, c, lam))

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc_sel, self._cost_sel, self.resolve(target), f"{self.policy} (out-of-fold on train)")
        params = {**self.base, **self.extra_params(), **self.configs[i]}
        return self._fitted(target, params, self._acc_in[i], self._cost_in[i], search=dict(self.search),
                            note="lam chosen on out-of-fold train predictions; train figures: final model in-sample")
