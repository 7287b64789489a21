"""Tuner of the `single` policy: each tier on its own."""
from __future__ import annotations

from typing import Any, Sequence

from router.core.policy import TierInfo
from router.lab.labelled import Table
from router.lab.tuning import Fitted, Target, Tuner, select_index


class SingleTuner(Tuner):
    policy = "single"

    def __init__(self, table: Table, infos: Sequence[TierInfo], **options: Any):
        super().__init__(table, infos, **options)
        self.acc = table.accuracy()
        self.cost = table.mean_cost()

    def select(self, target: Target) -> Fitted:
        i = select_index(self.acc, self.cost, self.resolve(target), "single model")
        return self._fitted(target, {"tier": self.infos[i].name}, self.acc[i], self.cost[i])

