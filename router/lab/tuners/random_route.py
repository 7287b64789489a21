"""Tuner of the `random` baseline: mixtures of neighbouring single models on the train hull."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from router.core.policies import make_policy
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.metrics import hull
from router.lab.tuning import TOL, Fitted, Target, TargetUnreachable, Tuner


class RandomTuner(Tuner):
    policy = "random"

    def __init__(self, table: Table, infos: Sequence[TierInfo], seed: int = 0, **options: Any):
        super().__init__(table, infos, **options)
        self.seed = int(seed)
        acc, cost = table.accuracy(), table.mean_cost()
        pts = {}
        for i in range(len(infos)):
            key = (float(cost[i]), float(acc[i]))
            pts.setdefault(key, i)
        self.vertices = hull(pts)  # (cost, acc), increasing
        self.vertex_tier = [pts[v] for v in self.vertices]

    def _weights(self, target: Target) -> dict[str, float]:
        xs = [v[0] for v in self.vertices]
        ys = [v[1] for v in self.vertices]
        names = [self.infos[i].name for i in self.vertex_tier]
        if target.kind == "budget":
            b = target.value
            if b < xs[0] * (1 - TOL) - 1e-15:
                raise TargetUnreachable(f"random routing: budget {b:.6g} is below the cheapest model (train cost {xs[0]:.6g})")
            if b >= xs[-1]:
                return {names[-1]: 1.0}
            j = max(i for i in range(len(xs)) if xs[i] <= b)
            w = (b - xs[j]) / (xs[j + 1] - xs[j])
        else:
            a = target.value
            if a > ys[-1] + TOL:
                raise TargetUnreachable(
                    f"random routing: target accuracy {a:.4f} is not reachable on the train rows; "
                    f"the most accurate model reaches {ys[-1]:.4f}")
            k = next(i for i in range(len(ys)) if ys[i] >= a - TOL)
            if k == 0:
                return {names[0]: 1.0}
            j = k - 1
            w = (a - ys[j]) / (ys[k] - ys[j])
        w = min(max(w, 0.0), 1.0)
        out = {}
        if w < 1:
            out[names[j]] = 1.0 - w
        if w > 0:
            out[names[j + 1]] = w
        return out

    def realised(self, weights: dict[str, float]) -> tuple[float, float]:
        """Train accuracy and cost of the actual per-query draws."""
        pol = make_policy("random", self.infos, {"weights": weights, "seed": self.seed})
        idx = np.array([pol.route(i) for i in self.table.ids])
        cols = np.arange(self.table.n)
        return float(self.table.correct[idx, cols].mean()), float(self.table.cost[idx, cols].mean())

    def select(self, target: Target) -> Fitted:
        w = self._weights(self.resolve(target))
        acc, cost = self.realised(w)
        return self._fitted(target, {"weights": w, "seed": self.seed}, acc, cost,
                            note="chosen in expectation over the hull of single models")

