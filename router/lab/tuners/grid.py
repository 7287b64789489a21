"""The generic tuner: a grid over a policy's bounded scalar knobs, each point replayed with simulate."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core.errors import PolicyError
from router.core.policies import POLICIES, make_policy
from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.metrics import summarize
from router.lab.simulate import simulate
from router.lab.tuning import Fitted, NotApplicable, Target, Tuner, select_index


class GridTuner(Tuner):
    def __init__(self, table: Table, infos: Sequence[TierInfo], *, policy: str, base: dict[str, Any] | None = None,
                 points: int | None = None, **options: Any):
        super().__init__(table, infos)

        self.policy = policy
        cls = POLICIES[policy]
        knobs = list(cls.knobs)
        bad = [kn.name for kn in knobs if kn.kind not in ("float", "int") or kn.low is None or kn.high is None]
        if bad or not knobs:
            raise NotApplicable(
                f"policy {policy!r} has no tuner: its knob(s) {bad or '(none)'} are not bounded scalars; "
                f"register one in router.lab.tuners.TUNERS")
        if len(knobs) > 3:
            raise NotApplicable(f"policy {policy!r}: the generic grid searches at most 3 knobs, it has {len(knobs)}")
        g = points or {1: 25, 2: 9, 3: 5}[len(knobs)]
        axes = []
        for kn in knobs:
            vals = np.linspace(kn.low, kn.high, g)
            axes.append(sorted({int(round(v)) for v in vals}) if kn.kind == "int" else [float(v) for v in vals])
        tiers = table.tiers
        self.configs: list[dict[str, Any]] = []
        acc, cost = [], []
        for combo in itertools.product(*axes):
            params = dict(base or {})
            params.update({kn.name: v for kn, v in zip(knobs, combo)})
            try:
                pol = make_policy(policy, self.infos, params)
            except PolicyError as e:
                raise NotApplicable(f"policy {policy!r}: cannot build it for the grid: {e}") from None
            try:
                s = summarize(simulate(pol, tiers, table.records), tiers)
            except (ValueError, KeyError, TypeError) as e:
                raise NotApplicable(f"policy {policy!r} cannot be replayed on these records: {e}") from None
            self.configs.append(pol.params())
            acc.append(s["accuracy"])
            cost.append(s["cost"])
        self._acc, self._cost = np.array(acc), np.array(cost)

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc, self._cost, self.resolve(target), self.policy)
        return self._fitted(target, self.configs[i], self._acc[i], self._cost[i], note="generic grid search")

