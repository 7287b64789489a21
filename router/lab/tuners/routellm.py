"""Tuner of the routellm policy: `scorer` mf, sw or linear (the classifier on the
query embedding), fitted on train only; lam calibrated as in `quality_routing`."""
from __future__ import annotations

from typing import Any

import numpy as np

from router.lab.quality_fit import fit_linear, fit_mf, fit_sw
from router.lab.tuning import TuningError

from .quality_routing import QualityRoutingTuner

SCORERS = ("mf", "sw", "linear")


class RouteLLMTuner(QualityRoutingTuner):
    policy = "routellm"

    def configure(self, scorer: str = "mf", l2: float = 1e-3, dim: int = 16, max_rows: int = 2000, **options: Any) -> None:
        if scorer not in SCORERS:
            raise TuningError(f"policy 'routellm': scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
        self.scorer, self.l2, self.dim, self.max_rows = scorer, float(l2), int(dim), int(max_rows)
        super().configure(**options)

    def fit_predictor(self, X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
        if self.scorer == "mf":
            return fit_mf(X, Y, h=self.dim, l2=self.l2, seed=self.seed)
        if self.scorer == "sw":
            return fit_sw(X, Y, max_rows=self.max_rows, seed=self.seed)
        return fit_linear(X, Y, l2=self.l2)
