"""Tuners for the cascade-routing and automix policies (registered in
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
- automix: per pair of undominated tiers in cost order (the cheaper with a
  finite p_true), `bins` quantile bins of the cheaper tier's p_true; state
  priors and P(bin | state) with one pseudo-count; the mean accuracy gain of
  escalating per state; lam: 0, the midpoints between the critical values
  E[gain | bin] / cost (where the decision of some bin flips), and one above.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from .labelled import CONFIDENCE_SIGNALS, Table
from .metrics import summarize
from .policy import TierInfo
from .simulate import simulate
from .tuning import MAX_SEARCHED_MODELS, Fitted, NotApplicable, Target, Tuner, TuningError, _select


def _r(x: float) -> float:
    return float(round(float(x), 6))


def _given_chain(chain: Sequence[str], by_name: dict[str, int]) -> tuple[int, ...]:
    """A chain the user named (--chain), as tier indices; unknown names are an error."""
    bad = [c for c in chain if c not in by_name]
    if bad:
        raise TuningError(f"chain tier(s) {bad} are not tiers here; tiers: {', '.join(by_name)}")
    return tuple(by_name[c] for c in chain)


def _pool(table: Table, infos: Sequence[TierInfo], prune: bool) -> tuple[list[int], list[str]]:
    """Tiers not dominated on train (cost, accuracy), in cost order, at most MAX_SEARCHED_MODELS."""
    acc, cost = table.accuracy(), table.mean_cost()
    pool = list(range(len(infos)))
    pruned: list[str] = []
    if prune:
        keep = []
        for i in pool:
            if any(cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j] < cost[i] or acc[j] > acc[i])
                   for j in pool if j != i):
                pruned.append(infos[i].name)
            else:
                keep.append(i)
        pool = keep
    pool.sort(key=lambda i: (cost[i], acc[i], i))
    if len(pool) > MAX_SEARCHED_MODELS:
        pos = set(np.unique(np.round(np.linspace(0, len(pool) - 1, MAX_SEARCHED_MODELS)).astype(int)).tolist())
        pruned += [infos[pool[p]].name for p in range(len(pool)) if p not in pos]
        pool = [pool[p] for p in sorted(pos)]
    return pool, pruned


def _edges(x: np.ndarray, bins: int) -> list[float]:
    v = x[np.isfinite(x)]
    if v.size == 0 or bins < 2:
        return []
    return [float(e) for e in np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1], method="lower"))]


def _bin(x: np.ndarray, edges: list[float]) -> np.ndarray:
    """bisect_right(edges, x) per finite value (what the policies compute); -1 where absent."""
    out = np.searchsorted(np.array(edges, dtype=float), np.nan_to_num(x), side="right")
    return np.where(np.isfinite(x), out, -1)


def pav(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted pooled-adjacent-violators: the closest non-decreasing sequence."""
    blocks: list[list[float]] = []  # [sum w*v, sum w, count]
    for v, w in zip(values, weights):
        blocks.append([v * w, w, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, ww, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += ww
            blocks[-1][2] += c
    out: list[float] = []
    for s, w, c in blocks:
        out += [s / w] * int(c)
    return out


def _run(policy: str, infos: Sequence[TierInfo], table: Table, params: dict[str, Any]) -> tuple[float, float, dict]:
    from .policies import make_policy

    pol = make_policy(policy, infos, params)
    s = summarize(simulate(pol, table.tiers, table.records), table.tiers)
    return s["accuracy"], s["cost"], pol.params()


def _signal(table: Table, signal: str | None, what: str) -> str:
    if signal is None:
        counts = {s: int(np.isfinite(table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
        signal = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
        if counts[signal] == 0:
            raise NotApplicable(f"no confidence signal (logprob or p_true) is recorded, so {what} cannot run")
    elif signal not in table.conf:
        raise TuningError(f"signal {signal!r}: recorded data carry {' or '.join(CONFIDENCE_SIGNALS)}")
    return signal


class _SweepTuner(Tuner):
    """Pool of replayed configurations; `select` picks one for a target."""

    def _sweep(self, configs: list[dict[str, Any]]) -> None:
        acc, cost, params = [], [], []
        for p in configs:
            a, c, pp = _run(self.policy, self.infos, self.table, p)
            acc.append(a)
            cost.append(c)
            params.append(pp)
        self._acc, self._cost, self.configs = np.array(acc), np.array(cost), params
        self.search["configurations"] = len(params)

    def select(self, target: Target) -> Fitted:
        i = _select(self._acc, self._cost, self.resolve(target), self.policy)
        return self._fitted(target, self.configs[i], self._acc[i], self._cost[i], search=dict(self.search))


# -- cascade routing -----------------------------------------------------------------
def fit_estimates(x: np.ndarray, y: np.ndarray, cost: np.ndarray, categories: Sequence[str | None],
                  bins: int = 10, min_category_rows: int = 40) -> dict[str, Any]:
    """One tier's estimates for the cascade-routing params, from its train rows."""
    m = float(y.mean())
    edges = _edges(x, bins)
    b = _bin(x, edges)
    fin = b >= 0
    k = len(edges) + 1
    n_b = np.bincount(b[fin], minlength=k).astype(float)
    s_b = np.bincount(b[fin], weights=y[fin], minlength=k)
    levels = [_r(v) for v in pav(list((s_b + m) / (n_b + 1)), list(n_b + 1))]
    n_m = float((~fin).sum())
    missing = _r((y[~fin].sum() + m) / (n_m + 1))

    def dist(rows: np.ndarray) -> list[list[float]]:
        w: dict[float, float] = {}
        for lv, cnt in zip(levels, np.bincount(b[rows & fin], minlength=k)):
            if cnt:
                w[lv] = w.get(lv, 0.0) + float(cnt)
        cnt_m = float((rows & ~fin).sum())
        if cnt_m:
            w[missing] = w.get(missing, 0.0) + cnt_m
        z = sum(w.values())
        return [[v, _r(c / z)] for v, c in sorted(w.items())]

    every = np.ones(len(y), dtype=bool)
    cats = np.array([c if c is not None else "" for c in categories], dtype=object)
    by_cat = {}
    for c in sorted({c for c in categories if c is not None}):
        rows = cats == c
        if rows.sum() >= min_category_rows:
            by_cat[c] = dist(rows)
    out = {"cost": float(cost.mean()), "accuracy": _r(m), "edges": edges, "levels": levels,
           "missing": missing, "dist": dist(every)}
    if by_cat:
        out["by_category"] = by_cat
    return out


class CascadeRoutingTuner(_SweepTuner):
    policy = "cascade-routing"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 chain: Sequence[str] | None = None, prune: bool = True, bins: int = 10,
                 min_category_rows: int = 40, lambdas: int = 24, **options: Any):
        super().__init__(table, infos)
        if options:
            raise TuningError(f"policy 'cascade-routing': unknown tuning option(s) {sorted(options)}")
        self.signal = _signal(table, signal, "cascade routing")
        conf = table.conf[self.signal]
        if not np.isfinite(conf).any():
            raise NotApplicable(f"no finite {self.signal!r} confidence is recorded, so cascade routing cannot run")
        cats = [r.category for r in table.records]
        est = {infos[i].name: fit_estimates(conf[i], table.correct[i], table.cost[i], cats, bins, min_category_rows)
               for i in range(len(infos))}
        by_name = {t.name: t.index for t in infos}
        self.search: dict[str, Any] = {"signal": self.signal, "bins": bins}
        if chain is not None:
            chains = [_given_chain(chain, by_name)]
        else:
            pool, pruned = _pool(table, infos, prune)
            self.search.update({"models": [infos[i].name for i in pool], "pruned": pruned})
            chains = [tuple(pool)] + [c for c in itertools.combinations(pool, 2) if len(pool) > 2]
        from .policies.cascade_routing import _Estimates

        configs = []
        for c in chains:
            names = [infos[i].name for i in c]
            sub = {n: est[n] for n in names}
            lams = [0.0]
            if len(c) > 1:
                e0 = _Estimates(names[0], sub[names[0]])
                q0 = [e0.post(None if not np.isfinite(v) else float(v)) for v in conf[c[0]]]
                ratios = []
                for n in names[1:]:
                    ej = _Estimates(n, sub[n])
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


# -- automix ----------------------------------------------------------------------
def fit_step(x: np.ndarray, cur: np.ndarray, nxt: np.ndarray, cost_next: np.ndarray, bins: int = 8) -> dict[str, Any]:
    """AutoMix's meta-verifier tables for one step (this tier -> the next), from train rows."""
    edges = _edges(x, bins)
    k = len(edges) + 1
    b = _bin(x, edges)
    right, right_next = cur >= 0.5, nxt >= 0.5
    states = {"good": right, "needy": ~right & right_next, "hopeless": ~right & ~right_next}
    n = len(cur)
    delta = nxt - cur
    default_gain = {"good": -1.0, "needy": 1.0, "hopeless": 0.0}
    prior, lik, gain = {}, {}, {}
    for s, rows in states.items():
        prior[s] = _r((rows.sum() + 1) / (n + 3))
        fin = rows & (b >= 0)
        cnt = np.bincount(b[fin], minlength=k)
        lik[s] = [_r((c + 1) / (fin.sum() + k)) for c in cnt]
        gain[s] = _r(delta[rows].mean()) if rows.any() else default_gain[s]
    return {"edges": edges, "prior": prior, "likelihood": lik, "gain": gain, "cost": float(cost_next.mean())}


class AutoMixTuner(_SweepTuner):
    policy = "automix"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, chain: Sequence[str] | None = None,
                 prune: bool = True, bins: int = 8, max_tiers: int = 2, signal: str | None = None,
                 **options: Any):
        super().__init__(table, infos)
        if options:
            raise TuningError(f"policy 'automix': unknown tuning option(s) {sorted(options)}")
        if signal not in (None, "p_true"):
            raise NotApplicable(f"automix bins a self-verification probability (p_true), not {signal!r}")
        conf = table.conf["p_true"]
        has = np.isfinite(conf).any(axis=1)
        if not has.any():
            raise NotApplicable("automix needs a self-verification probability (p_true) and none is recorded")
        if not 2 <= max_tiers <= 3:
            raise TuningError(f"automix: max_tiers must be 2 or 3, got {max_tiers}")
        by_name = {t.name: t.index for t in infos}
        self.search: dict[str, Any] = {"signal": "p_true", "bins": bins}
        if chain is not None:
            chains = [_given_chain(chain, by_name)]
        else:
            pool, pruned = _pool(table, infos, prune)
            self.search.update({"models": [infos[i].name for i in pool], "pruned": pruned})
            chains = [c for size in range(2, max_tiers + 1) for c in itertools.combinations(pool, size)
                      if all(has[i] for i in c[:-1])]
            if not chains:
                raise NotApplicable(f"automix: no chain of undominated tiers {self.search['models']} has a "
                                    f"cheaper tier with p_true")
        from .policies.automix import _Step

        configs = []
        for c in chains:
            names = [infos[i].name for i in c]
            steps = {names[p]: fit_step(conf[c[p]], table.correct[c[p]], table.correct[c[p + 1]], table.cost[c[p + 1]], bins)
                     for p in range(len(c) - 1)}
            crit = set()
            for n, d in steps.items():
                st = _Step(n, d)
                if st.cost <= 0:
                    continue
                vals = [None] + [st.edges[0] - 1.0 if st.edges else 0.0] + list(st.edges)
                for v in vals:
                    g, _ = st.expected_gain(v)
                    if g > 0:
                        crit.add(g / st.cost)
            cs = sorted(crit)
            lams = [0.0] + [(a + b2) / 2 for a, b2 in zip(cs, cs[1:])] + ([cs[-1] * 2.0] if cs else [])
            for lam in lams:
                configs.append({"signal": "p_true", "lam": lam, "chain": names, "steps": steps})
        self.search["chains"] = len(chains)
        self._sweep(configs)
