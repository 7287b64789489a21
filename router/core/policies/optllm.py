"""OptLLM (method 7): per-model success prediction with bootstrap uncertainty,
routing under a cost weight, and the batch-level choice under a budget.

The predictor ("bootstrap") is B logistic regressions per model, each fitted on a
bootstrap resample of the train rows; a model's quality for a query is the
members' mean minus `kappa` times their spread (a cautious estimate where the
predictions disagree). One query alone goes to argmax q - lam * relative cost
(`QualityRouter`). A whole batch can instead be assigned at once
(`assign_batch`): the cheapest-per-quality assignment meeting a budget on the
batch's total cost, found by the smallest lam whose routed cost fits, and
`pareto_front` lists every assignment on the batch's (cost, expected quality)
front for a user to pick from. Both are what a queue, which sees the batch
before sending it, can do and a per-request router cannot.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..attempt import Query
from ..errors import PolicyError
from ..policy import Knob, Plan, TierInfo, finite_number
from .quality_router import COMMON_KNOBS, QualityRouter


def route_all(Q: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """(n, k) qualities -> (n,) chosen positions: argmax q - lam * cost, the cheaper on ties."""
    return np.argmax(Q - lam * costs[None, :], axis=1)


def breakpoints(Q: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Every lam at which some query's choice can change, sorted, with 0 and one value
    beyond each end (below the lowest every query goes to its dearest model of the best
    predictions, above the highest to the cheapest)."""
    dq = Q[:, :, None] - Q[:, None, :]
    dc = costs[:, None] - costs[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = dq / dc[None, :, :]
    lam = lam[np.isfinite(lam)]
    if not lam.size:
        return np.array([0.0])
    span = max(1.0, float(np.abs(lam).max()))
    return np.unique(np.concatenate([[0.0, lam.min() - span, lam.max() + span], lam]))


def pareto_front(Q: np.ndarray, costs: np.ndarray) -> list[dict[str, Any]]:
    """The batch's assignments over every lam, reduced to the non-dominated ones:
    [{lam, cost (mean per query), quality (mean predicted), choice (positions)}],
    cheapest first; no point has both a lower cost and a higher quality than another."""
    pts = []
    rows = np.arange(Q.shape[0])
    for lam in breakpoints(Q, costs):
        ch = route_all(Q, costs, lam)
        pts.append((float(costs[ch].mean()), float(Q[rows, ch].mean()), float(lam), ch))
    pts.sort(key=lambda p: (p[0], -p[1]))
    front, best = [], -np.inf
    for c, q, lam, ch in pts:
        if q > best + 1e-12:
            front.append({"lam": lam, "cost": c, "quality": q, "choice": ch})
            best = q
    return front


def assign_batch(Q: np.ndarray, costs: np.ndarray, budget: float) -> dict[str, Any]:
    """The front point of highest predicted quality whose mean cost per query is within
    `budget` (same unit as `costs`); an error naming the cheapest cost when none fits."""
    front = pareto_front(Q, costs)
    fit = [p for p in front if p["cost"] <= budget + 1e-12]
    if not fit:
        raise PolicyError(f"budget {budget:.6g} per query is below the cheapest assignment "
                          f"({front[0]['cost']:.6g} per query)")
    return max(fit, key=lambda p: p["quality"])


class OptLLM(QualityRouter):
    name = "optllm"
    summary = "OptLLM: bootstrap per-model success prediction (mean - kappa*spread); batch assignment under a budget"
    knobs = COMMON_KNOBS + (
        Knob("batch_budget", "float", "a submitted batch's mean relative cost per query (null: per query by lam)", low=0.0),
    )
    predictor_kinds = ("bootstrap",)

    def __init__(self, tiers: Sequence[TierInfo], batch_budget: float | None = None, **kw: Any):
        super().__init__(tiers, **kw)
        self.batch_budget = None if batch_budget is None else finite_number(batch_budget, "batch_budget", low=0.0)

    def plan_batch(self, queries: Sequence[Query]) -> list[Plan]:
        """With `batch_budget`: the batch's best predicted quality within that mean
        relative cost per query (`assign_batch`); else each query by lam."""
        if self.batch_budget is None or not queries:
            return super().plan_batch(queries)
        Q = np.stack([self.qualities(q) for q in queries])
        choice = assign_batch(Q, self.costs, self.batch_budget)["choice"]
        return [Plan(first=self.order[int(j)], allowed=(self.order[int(j)],) + tuple(i for i in self.order if i != self.order[int(j)]),
                     note=f"batch assignment within {self.batch_budget:.4g}") for j in choice]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "batch_budget": self.batch_budget}
