"""Tuner of the `rational` policy: thresholds chosen from the fitted Markov-copula
model of the chain's confidences (`router.lab.copula`), not from the raw train rows.

Chains: the tiers not dominated on train, in cost order (as the threshold tuner
prunes), every chain of `min_tiers`..`max_tiers` (2-3) of them whose non-last
tiers record the signal. Per chain the model is fitted on the train rows; the
threshold candidates are `grid` quantiles of each stage's train confidences (a
2-tier chain: 4 x grid). Every candidate's accuracy and cost come from the model,
and the target is met on those figures (so the choice is as smooth as the model,
not as jagged as 300 rows); the Fitted's train figures are the replayed ones.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core.policy import TierInfo
from router.lab.copula import CascadeModel, ModelError
from router.lab.labelled import Table
from router.lab.tuning import (
    Fitted,
    NotApplicable,
    Target,
    Tuner,
    TuningError,
    given_chain,
    pick_signal,
    select_index,
    undominated_pool,
)

from .threshold import fast_threshold


class RationalTuner(Tuner):
    policy = "rational"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 chain: Sequence[str] | None = None, min_tiers: int = 2, max_tiers: int = 3, grid: int = 12,
                 samples: int = 10_000, prune: bool = True, seed: int = 0, **options: Any):
        super().__init__(table, infos, **options)
        if not 2 <= min_tiers <= max_tiers <= 3:
            raise TuningError(f"rational: need 2 <= min_tiers <= max_tiers <= 3, got {min_tiers}, {max_tiers}")
        self.signal = pick_signal(table, signal, "a rational-tuning cascade")
        conf = table.conf[self.signal]
        has_conf = np.isfinite(conf).any(axis=1)
        if chain is not None:
            chains = [given_chain(chain, {t.name: t.index for t in infos})]
            pruned: list[str] = []
        else:
            pool, pruned = undominated_pool(table, infos, prune)
            chains = [c for size in range(min_tiers, max_tiers + 1) for c in itertools.combinations(pool, size)
                      if all(has_conf[i] for i in c[:-1])]
        self.search: dict[str, Any] = {"signal": self.signal, "pruned": pruned, "model": "markov-gaussian-copula"}
        self.configs: list[tuple[tuple[int, ...], tuple[float, ...]]] = []
        acc, cost, skipped = [], [], {}
        for c in chains:
            try:
                # the last stage's confidence is modelled too (it carries the copula onward), so it
                # must be recorded; a last tier without one is modelled by its accuracy alone
                if not has_conf[c[-1]]:
                    raise ModelError("the last tier records no confidence")
                m = CascadeModel(self.signal, [conf[i] for i in c], [table.correct[i] for i in c],
                                 [table.cost[i] for i in c], samples=samples, seed=seed)
            except ModelError as e:
                skipped[" > ".join(infos[i].name for i in c)] = str(e)
                continue
            q = grid * 4 if len(c) == 2 else grid
            axes = [np.unique(np.quantile(m.stages[j].values, np.linspace(0, 1, q), method="lower"))
                    for j in range(len(c) - 1)]
            for th in itertools.product(*axes):
                a, t = m.evaluate(th)
                acc.append(a)
                cost.append(t)
                self.configs.append((c, tuple(float(x) for x in th)))
        if not self.configs:
            raise NotApplicable(f"rational: no chain could be modelled ({'; '.join(f'{k}: {v}' for k, v in skipped.items()) or 'no chain'})")
        if skipped:
            self.search["skipped"] = skipped
        self.search["configurations"] = len(self.configs)
        self._acc, self._cost = np.array(acc), np.array(cost)

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc, self._cost, self.resolve(target), "rational cascade (model figures)")
        chain, th = self.configs[i]
        names = [self.infos[j].name for j in chain]
        a, c = fast_threshold(self.table, chain, th, self.signal)
        params = {"signal": self.signal, "thresholds": dict(zip(names, th)), "chain": names}
        return self._fitted(target, params, a, c, search=dict(self.search) | {
            "model_accuracy": float(self._acc[i]), "model_cost": float(self._cost[i])})
