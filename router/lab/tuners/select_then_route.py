"""Tuner of the select-then-route policy: per-class shortlists (shrunk toward the
global ranking), then a cascade inside, with or without judges.

Searched exhaustively with a vectorised copy of the policy's rule (it only
chooses knobs; `confirm` replays the choice): delta, shrink (pseudo-rows of the
global accuracy added to each class), judges on/off (accept when two consecutive
shortlisted models' answers agree), and the confidence threshold where the data
record a confidence.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.policies.select_then_route import taxonomy_class
from router.core.policy import TierInfo
from router.core.taxonomy import answer_key
from router.lab.labelled import CONFIDENCE_SIGNALS, Table
from router.lab.tuning import Tuner, TuningError, cost_order, select_index

DELTAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
SHRINKS = (0.0, 10.0, 40.0)


def shortlist(correct: np.ndarray, order: Sequence[int], delta: float, shrink: float = 0.0,
              prior: np.ndarray | None = None) -> tuple[int, ...]:
    """Tiers (in `order`) whose accuracy on these rows (k, rows), shrunk toward `prior`
    by `shrink` pseudo-rows, is within delta of the best."""
    n = correct.shape[1]
    a = correct.sum(axis=1)
    a = (a + shrink * prior) / (n + shrink) if shrink > 0 and prior is not None else a / max(n, 1)
    return tuple(i for i in order if a[i] >= a.max() - delta - 1e-12)


def shortlist_grid(chain: Sequence[int], rows: np.ndarray, correct: np.ndarray, cost: np.ndarray,
                   conf: np.ndarray | None, T: np.ndarray,
                   agree: dict[tuple[int, int], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed correct and cost over `rows` for each threshold in T: the cascade in `chain`
    (NaN confidence escalates, the last tier accepts), where with `agree` (judges) a tier
    after the first also accepts when its answer agrees with the previous tier's; without
    a confidence and without judges only the first tier is called."""
    if conf is None and agree is None:
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
            accept = np.zeros((T.size, rows.size), dtype=bool)
            if agree is not None and pos >= 1:
                accept |= agree[(chain[pos - 1], t)][rows][None, :]
            if conf is not None:
                accept |= conf[t, rows][None, :] >= T[:, None]
            acc += (alive * accept) @ correct[t, rows]
            alive = alive * ~accept
    return acc, tot


def agreement(table: Table, order: Sequence[int]) -> dict[tuple[int, int], np.ndarray]:
    """(i, j) -> per row, whether tiers i and j gave the same answer key (`answer_key`)."""
    models = [t.model for t in table.tiers]
    keys = [[answer_key(r.responses[m].text) if r.responses.get(m) is not None else None for r in table.records]
            for m in models]
    out = {}
    for i in order:
        for j in order:
            if i != j:
                out[(i, j)] = np.array([a is not None and a == b for a, b in zip(keys[i], keys[j])])
    return out


class SelectThenRouteTuner(Tuner):
    policy = "select-then-route"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, signal: str | None = None,
                 deltas: Sequence[float] = DELTAS, shrinks: Sequence[float] = SHRINKS, quantiles: int = 60,
                 **options: Any):
        super().__init__(table, infos, **options)
        if signal is None:
            counts = {s: int(np.isfinite(table.conf[s]).sum()) for s in CONFIDENCE_SIGNALS}
            best = max(CONFIDENCE_SIGNALS, key=lambda s: counts[s])
            signal = best if counts[best] else None
        elif signal not in table.conf:
            raise TuningError(f"signal {signal!r}: recorded data carry {' or '.join(CONFIDENCE_SIGNALS)}")
        self.signal = signal
        conf = table.conf[signal] if signal else None
        order = cost_order(table)
        classes = [taxonomy_class(r.query()) for r in table.records]
        keys = sorted(set(classes))
        groups = {c: np.flatnonzero(np.array([x == c for x in classes])) for c in keys}
        prior = table.correct.mean(axis=1)
        if conf is not None:
            v = conf[np.isfinite(conf)]
            T = np.unique(np.quantile(v, np.linspace(0, 1, quantiles), method="lower")) if v.size else np.zeros(1)
        else:
            T = np.zeros(1)
        self.T = T
        agree = agreement(table, order)
        self.configs: list[tuple[float, float, bool, tuple[int, ...], dict[str, tuple[int, ...]]]] = []
        accs, costs = [], []
        seen = set()
        for d in sorted(float(x) for x in deltas):
            default = shortlist(table.correct, order, d)
            for m in sorted(float(x) for x in shrinks):
                lists = {c: shortlist(table.correct[:, g], order, d, m, prior) for c, g in groups.items()}
                for judges in (False, True):
                    key = (default, tuple(sorted(lists.items())), judges)
                    if key in seen:
                        continue
                    seen.add(key)
                    a = np.zeros(T.size)
                    t = np.zeros(T.size)
                    for c, g in groups.items():
                        ga, gt = shortlist_grid(lists[c], g, table.correct, table.cost, conf, T,
                                                agree if judges else None)
                        a += ga
                        t += gt
                    self.configs.append((d, m, judges, default, lists))
                    accs.append(a / table.n)
                    costs.append(t / table.n)
        self._acc = np.concatenate(accs)
        self._cost = np.concatenate(costs)
        self.search = {"signal": signal, "deltas": sorted({c[0] for c in self.configs}),
                       "shrinks": sorted({c[1] for c in self.configs}), "judges": [False, True],
                       "thresholds": int(T.size), "classes": len(keys),
                       "detected_classes": sorted(k for k in keys if k.startswith("auto:"))}

    def select(self, target):
        i = select_index(self._acc, self._cost, self.resolve(target), "select-then-route")
        ci, ti = divmod(i, self.T.size)
        d, m, judges, default, lists = self.configs[ci]
        name = lambda chain: [self.infos[j].name for j in chain]  # noqa: E731
        params = {"delta": d, "shrink": m, "judges": judges, "signal": self.signal,
                  "threshold": float(self.T[ti]) if self.signal else None,
                  "default": name(default), "shortlists": {c: name(v) for c, v in sorted(lists.items())}}
        return self._fitted(target, params, self._acc[i], self._cost[i], search=dict(self.search))
