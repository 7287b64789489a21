"""Tuner of the threshold cascade: a vectorised search over chains and per-tier thresholds."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core.policy import TierInfo
from router.lab.labelled import CONFIDENCE_SIGNALS, Table
from router.lab.tuning import (
    Fitted,
    NotApplicable,
    Target,
    Tuner,
    TuningError,
    given_chain,
    select_index,
    undominated_pool,
)

GRID = {2: 400, 3: 40, 4: 16}


def _candidates(values: np.ndarray, q: int) -> np.ndarray:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return np.array([])
    u = np.unique(v)
    if u.size <= q:
        return u
    return np.unique(np.quantile(v, np.linspace(0.0, 1.0, q), method="lower"))


def chain_grid(conf: Sequence[np.ndarray], correct: Sequence[np.ndarray], cost: Sequence[np.ndarray],
               cands: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Train accuracy and mean cost of a chain for every threshold combination.

    conf/correct/cost: one (n,) array per chain tier; cands: one array of
    thresholds per tier but the last. Result arrays are indexed like
    np.ravel_multi_index over the candidate arrays. A tier accepts where
    conf >= threshold (NaN never does: the query escalates), the last always.
    """
    n = correct[0].shape[0]
    k = len(conf)
    if k == 1:
        return np.array([correct[0].mean()]), np.array([cost[0].mean()])
    alive = np.ones((1, n))
    acc = np.zeros(1)
    tot = np.zeros(1)
    with np.errstate(invalid="ignore"):
        for i in range(k - 1):
            accept = (conf[i][None, :] >= cands[i][:, None]).astype(float)  # (Q, n)
            q = accept.shape[0]
            paid = alive @ cost[i]  # every query alive here pays tier i
            acc = (acc[:, None] + (alive * correct[i]) @ accept.T).ravel()
            tot = np.repeat(tot + paid, q)
            rest = 1.0 - accept
            if i < k - 2:
                alive = (alive[:, None, :] * rest[None, :, :]).reshape(-1, n)
            else:
                acc = acc + ((alive * correct[k - 1]) @ rest.T).ravel()
                tot = tot + ((alive * cost[k - 1]) @ rest.T).ravel()
    return acc / n, tot / n


def fast_threshold(table: Table, chain: Sequence[int], thresholds: Sequence[float], signal: str) -> tuple[float, float]:
    """Accuracy and mean cost of one threshold configuration on `table` (vectorised)."""
    conf = table.conf[signal]
    acc, cost = chain_grid([conf[i] for i in chain], [table.correct[i] for i in chain],
                           [table.cost[i] for i in chain], [np.array([t]) for t in thresholds])
    return float(acc[0]), float(cost[0])


class ThresholdTuner(Tuner):
    policy = "threshold"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 min_tiers: int = 2, max_tiers: int = 4, chain: Sequence[str] | None = None,
                 prune: bool = True, **options: Any):
        super().__init__(table, infos, **options)
        if signal is None:
            counts = {s: int(np.isfinite(table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
            signal = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
            if counts[signal] == 0:
                raise NotApplicable("no confidence signal (logprob or p_true) is recorded, so a threshold cascade cannot run")
        elif signal not in table.conf:
            raise TuningError(f"signal {signal!r} is not recorded; recorded: {', '.join(table.conf)}")
        self.signal = signal
        conf = table.conf[signal]
        has_conf = np.isfinite(conf).any(axis=1)
        if not has_conf.any():
            raise NotApplicable(f"no finite {signal!r} confidence is recorded, so a threshold cascade cannot run")
        by_name = {t.name: t.index for t in infos}
        self.search: dict[str, Any] = {"signal": signal}
        if chain is not None:
            chains = [given_chain(chain, by_name)]
            self.search["chain"] = list(chain)
        else:
            if not 1 <= min_tiers <= max_tiers:
                raise TuningError(f"need 1 <= min_tiers <= max_tiers, got {min_tiers}, {max_tiers}")
            if max_tiers > 4:
                raise TuningError("chains of more than 4 tiers are not searched (max_tiers <= 4)")
            pool, pruned = undominated_pool(table, infos, prune)
            self.search.update({"models": [infos[i].name for i in pool], "pruned": pruned,
                                "tiers": [min_tiers, max_tiers]})
            chains = []
            for size in range(min_tiers, max_tiers + 1):
                for c in itertools.combinations(pool, size):
                    if all(has_conf[i] for i in c[:-1]):
                        chains.append(c)
            if not chains:
                raise NotApplicable(
                    f"no chain of {min_tiers}..{max_tiers} tiers can be formed from the "
                    f"{len(pool)} candidate model(s) {self.search['models']}"
                    + (f" (dominated on train, pruned: {pruned})" if pruned else ""))
        self.chains = chains
        self.grids: list[tuple[list[np.ndarray], np.ndarray, np.ndarray]] = []
        for c in chains:
            q = GRID.get(len(c), 16)
            cands = [_candidates(conf[i], q) for i in c[:-1]]
            if any(cd.size == 0 for cd in cands):
                raise NotApplicable(f"chain {[infos[i].name for i in c]}: a non-last tier has no finite {signal!r}")
            a, t = chain_grid([conf[i] for i in c], [table.correct[i] for i in c], [table.cost[i] for i in c], cands)
            self.grids.append((cands, a, t))
        self.search["chains"] = len(chains)
        self.search["configurations"] = int(sum(g[1].size for g in self.grids))
        self._acc = np.concatenate([g[1] for g in self.grids])
        self._cost = np.concatenate([g[2] for g in self.grids])
        self._offsets = np.cumsum([0] + [g[1].size for g in self.grids])

    def params_of(self, flat: int) -> dict[str, Any]:
        ci = int(np.searchsorted(self._offsets, flat, side="right") - 1)
        local = flat - self._offsets[ci]
        chain = self.chains[ci]
        cands = self.grids[ci][0]
        idx = np.unravel_index(local, tuple(len(c) for c in cands)) if cands else ()
        names = [self.infos[i].name for i in chain]
        return {
            "signal": self.signal,
            "thresholds": {names[j]: float(cands[j][idx[j]]) for j in range(len(cands))},
            "chain": names,
        }

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc, self._cost, self.resolve(target), f"threshold cascade ({self.signal})")
        p = self.params_of(i)
        return self._fitted(target, p, self._acc[i], self._cost[i], search=dict(self.search))

