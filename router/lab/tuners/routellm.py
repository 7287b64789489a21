"""Tuner of the routellm policy: `scorer` mf, sw or linear (the classifier on the
query embedding), fitted on train only; lam calibrated as in `quality_routing`."""
from __future__ import annotations

from typing import Any

import numpy as np

from router.lab.quality_fit import fit_linear, fit_mf, fit_sw
from router.lab.tuning import TuningError

from .quality_routing import QualityRoutingTuner

SCORERS = ("mf", "sw", "linear")
# l2 penalties the classifier chooses between on the inner folds (mean log-loss): on
# routellm-gsm8k (1,000 rows) a stronger penalty than 1e-3 held out better, on routellm-mmlu a weaker one
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


class RouteLLMTuner(QualityRoutingTuner):
    policy = "routellm"

    def configure(self, scorer: str = "mf", l2: float | str | None = None, dim: int = 16, max_rows: int = 2000,
                  **options: Any) -> None:
        if scorer not in SCORERS:
            raise TuningError(f"policy 'routellm': scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
        if l2 is None:  # the classifier's penalty is chosen on the inner folds; mf keeps its own
            l2 = "auto" if scorer == "linear" else 1e-3
        if l2 == "auto":
            self.l2_grid = list(L2_GRID)
        else:
            try:
                self.l2_grid = [float(l2)]
            except (TypeError, ValueError):
                raise TuningError(f"policy 'routellm': l2 must be a number or 'auto', got {l2!r}") from None
        self.scorer, self.l2, self.dim, self.max_rows = scorer, self.l2_grid[0], int(dim), int(max_rows)
        super().configure(**options)

    def candidates(self) -> list[Any]:
        return list(self.l2_grid) if self.scorer == "linear" else [self.l2]

    def use(self, candidate: Any) -> None:
        self.l2 = float(candidate)

    def fit_predictor(self, X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
        if self.scorer == "mf":
            return fit_mf(X, Y, h=self.dim, l2=self.l2, seed=self.seed)
        if self.scorer == "sw":
            return fit_sw(X, Y, max_rows=self.max_rows, seed=self.seed)
        return fit_linear(X, Y, l2=self.l2)
