"""Tuner of the select-then-route policy: per-category shortlists, then a cascade inside."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.policy import TierInfo
from router.lab.labelled import CONFIDENCE_SIGNALS, Table
from router.lab.tuning import (
    Tuner,
    TuningError,
    cost_order,
    select_index,
)

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
        i = select_index(self._acc, self._cost, self.resolve(target), "select-then-route")
        ci, ti = divmod(i, self.T.size)
        d, default, lists = self.configs[ci]
        name = lambda chain: [self.infos[j].name for j in chain]  # noqa: E731
        params = {"delta": d, "signal": self.signal,
                  "threshold": float(self.T[ti]) if self.signal else None,
                  "default": name(default), "shortlists": {c: name(v) for c, v in sorted(lists.items())}}
        return self._fitted(target, params, self._acc[i], self._cost[i], search=dict(self.search))
